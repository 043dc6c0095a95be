"""``python -m mnist_cnn download|train|evaluate|all [--params FILE] [--KEY VALUE ...]``.

Any ``--KEY VALUE`` (or ``KEY=VALUE``) pair overrides ``params.yaml`` for this call only: dotted keys
(``--train.lr 0.2``) or the seed's short names (``--lr 0.2``). An empty value means "keep params.yaml's",
which is how ``MLproject`` passes parameters the user did not set.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from . import layout
from .config import ConfigError, Params, load_params, load_section

STAGES = ("download", "train", "evaluate", "all", "runs", "server")


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
    parser.add_argument(
        "--root", type=Path, default=Path("."), help="project directory holding data/, models/, reports/"
    )
    parser.add_argument(
        "--mirror",
        default=None,
        help="local directory or base URL with the four .gz files (default: $MNIST_MIRROR, else torchvision's mirrors)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars, only per-epoch lines")
    parser.add_argument(
        "--clean", action="store_true", help="runs: end as KILLED the runs whose process on this host is gone"
    )
    return parser


def run_stages(stage: str, args: argparse.Namespace, overrides: dict[str, str]) -> None:
    # Imported here so that --help, argument errors and the download stage answer without MLflow.
    from .download import download

    if stage == "download":
        # Only the section it reads: `dvc exp run -S train.lr=-1` must fail in train, not here.
        download(load_section(args.params, "data", overrides), args.root / layout.DATA_DIR, args.mirror or None)
        return
    if stage == "runs":
        show_runs(load_section(args.params, "mlflow", overrides).experiment, args)
        return
    params = load_params(args.params, overrides)
    with layout.stage_lock(args.root / layout.MODEL_DIR):
        _train_and_evaluate(stage, params, args)


def _train_and_evaluate(stage: str, params: Params, args: argparse.Namespace) -> None:
    from .download import download

    if stage == "all":
        download(params.data, args.root / layout.DATA_DIR, args.mirror or None)
    from . import pipeline

    paths = pipeline.Paths(root=args.root, params_file=args.params)
    if stage in ("train", "all"):
        pipeline.run_train(params, paths, False if args.no_progress else None, stage=stage)
    if stage in ("evaluate", "all"):
        _, result = pipeline.run_evaluate(params, paths)
        for split, values in result.metrics.items():
            print(f"{split:>5}: loss {values['loss']:.4f}  accuracy {values['accuracy']:.2f}%")


def show_runs(experiment: str, args: argparse.Namespace) -> None:
    from . import runs, tracking

    root = tracking.project_root(args.root.resolve())
    if args.clean:
        closed = runs.clean(experiment, root)
        print(f"closed {len(closed)} stale run(s) as KILLED" + "".join(f"\n  {run_id}" for run_id in closed))
    listed = runs.running(experiment, root)
    print(f"{len(listed)} RUNNING run(s) in experiment {experiment!r}")
    for run in listed:
        print(f"  {run.run_id}  {run.state:<7}  {run.host}:{run.pid}  {run.name}")


def _interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt(f"signal {signum}")


def server_main(argv: list[str]) -> int:
    """``mnist-cnn server start|stop|status|add-user NAME``: the team's tracking server."""
    from . import server

    parser = argparse.ArgumentParser(prog="mnist-cnn server", description=server.__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop", "status", "add-user"))
    parser.add_argument("username", nargs="?", help="add-user: the login to create (its password on stdin)")
    defaults = server.ServerConfig()
    parser.add_argument("--home", type=Path, default=defaults.home, help="PostgreSQL data, artifacts, logs")
    parser.add_argument("--host", default=defaults.host, help="the MLflow server's address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--db-port", type=int, default=defaults.db_port, help="PostgreSQL, on 127.0.0.1")
    parser.add_argument("--artifacts-destination", default=None, help="default: HOME/artifacts; or s3://...")
    parser.add_argument("--allowed-hosts", default=None, help="host names clients use, when not an IP")
    args = parser.parse_args(argv)
    cfg = server.ServerConfig(
        home=args.home,
        host=args.host,
        port=args.port,
        db_port=args.db_port,
        artifacts_destination=args.artifacts_destination,
        allowed_hosts=args.allowed_hosts,
    )
    try:
        if args.action == "start":
            print(f"MLflow server at {server.start(cfg)} (PostgreSQL on 127.0.0.1:{cfg.db_port}, home {cfg.home})")
        elif args.action == "stop":
            server.stop(cfg)
            print("stopped")
        elif args.action == "status":
            for name, state in server.status(cfg).items():
                print(f"{name}: {state}")
        else:
            if not args.username:
                parser.error("add-user needs a USERNAME")
            password = sys.stdin.readline().rstrip("\n")
            if not password:
                raise server.ServerError("add-user: give the new user's password on stdin")
            server.add_user(cfg.url, args.username, password)
            print(f"user {args.username!r} created")
    except server.ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["server"]:
        return server_main(argv[1:])
    args, extra = build_parser().parse_known_args(argv)
    # SIGTERM (kill, dvc queue kill, a scheduler) unwinds like Ctrl-C: temporary files are removed and
    # the MLflow run ends KILLED.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_stages(args.stage, args, parse_overrides(extra))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _is_expected(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _is_expected(exc: Exception) -> bool:
    """Errors with a message meant for the user (bad data, no network, no device, store refused)."""
    from .data import DataError
    from .download import DownloadError

    if isinstance(exc, (DataError, DownloadError, RuntimeError, OSError)):
        return True
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    return mlflow_exceptions is not None and isinstance(exc, mlflow_exceptions.MlflowException)
