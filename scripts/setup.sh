#!/usr/bin/env bash
# Create .venv in the repo root with the pinned dependencies and the package (editable), once;
# later calls return at once unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.mnist-cnn-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[dev,server,s3]"
    echo "$want" > "$stamp"
fi
# Create the default MLflow store (mlflow.db) under the project's lock: `mlflow run` started several
# times at once on a store that does not exist yet races in MLflow's own table creation.
[ -f mlflow.db ] || .venv/bin/python -m mnist_cnn runs >/dev/null
