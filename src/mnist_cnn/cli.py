"""``python -m mnist_cnn download|train|evaluate|all [--params FILE] [--KEY VALUE ...]``.

Any ``--KEY VALUE`` (or ``KEY=VALUE``) pair overrides ``params.yaml`` for this call only: dotted keys
(``--train.lr 0.2``) or the seed's short names (``--lr 0.2``). An empty value means "keep params.yaml's",
which is how ``MLproject`` passes parameters the user did not set.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import layout
from .config import ConfigError, load_params

STAGES = ("download", "train", "evaluate", "all")


def parse_overrides(tokens: list[str]) -> dict[str, str]:
    overrides: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if "=" in token:
            key, value = token.split("=", 1)
            i += 1
        elif token.startswith("--") and i + 1 < len(tokens):
            key, value = token, tokens[i + 1]
            i += 2
        else:
            raise ConfigError(f"{token}: expected --KEY VALUE or KEY=VALUE")
        if value != "":
            overrides[key.lstrip("-")] = value
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-cnn", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--params", type=Path, default=layout.PARAMS, help="params file (default: params.yaml)")
    parser.add_argument("--root", type=Path, default=Path("."), help="project directory holding data/, models/, reports/")
    parser.add_argument("--mirror", default=None, help="local directory or base URL with the four .gz files "
                        "(default: $MNIST_MIRROR, else torchvision's mirrors)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars, only per-epoch lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args, extra = build_parser().parse_known_args(argv)
    # Imported here so that --help and argument errors answer without loading torch and MLflow.
    from mlflow.exceptions import MlflowException

    from . import pipeline
    from .data import DataError
    from .download import DownloadError

    try:
        params = load_params(args.params, parse_overrides(extra))
        paths = pipeline.Paths(root=args.root, params_file=args.params)
        progress = False if args.no_progress else None
        if args.stage in ("download", "all"):
            pipeline.run_download(params, paths, args.mirror or None)
        if args.stage in ("train", "all"):
            pipeline.run_train(params, paths, progress)
        if args.stage in ("evaluate", "all"):
            _, result = pipeline.run_evaluate(params, paths)
            for split, values in result.metrics.items():
                print(f"{split:>5}: loss {values['loss']:.4f}  accuracy {values['accuracy']:.2f}%")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (DataError, DownloadError, RuntimeError, MlflowException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
