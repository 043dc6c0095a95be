"""``python -m mnist_cnn download|train|evaluate|all|tune [--params FILE] [--KEY VALUE ...]``; ``predict``,
``server`` and ``ui`` have their own options.

Any ``--KEY VALUE`` (or ``KEY=VALUE``) pair overrides ``params.yaml`` for this call only: dotted keys
(``--train.lr 0.2``) or the seed's short names (``--lr 0.2``). An empty value means "keep params.yaml's",
which is how ``MLproject`` passes parameters the user did not set. ``tune`` also takes ``--tune.KEY VALUE``
(``--tune.n_trials 10``, ``--tune.storage URL``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path

# Light imports only: --help, argument errors and the download stage answer without torch or MLflow;
# every stage imports what it needs when it runs.
from mnist_cnn.core import errors, files, startup
from mnist_cnn.core.errors import masked, one_line
from mnist_cnn.core.params import ConfigError, Params, load_params, load_section
from mnist_cnn.ops import lock, signals

STAGES = ("download", "train", "evaluate", "all", "tune", "runs", "server", "predict", "ui", "promote")


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
    parser = argparse.ArgumentParser(
        prog="mnist-cnn",
        description="Run a stage of the pipeline (download, train, evaluate, or all three), a tuning study, or "
        "list the MLflow runs left RUNNING. Any --KEY VALUE overrides params.yaml for this call.",
        allow_abbrev=False,
    )
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--params", type=Path, default=files.PARAMS, help="The params file (default: params.yaml).")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("."),
        help="The project directory holding data/, models/ and reports/ (default: here).",
    )
    parser.add_argument(
        "--mirror",
        default=None,
        help="A local directory or base URL with the four .gz files (default: $MNIST_MIRROR, else torchvision's "
        "mirrors).",
    )
    parser.add_argument("--no-progress", action="store_true", help="Print one line per epoch, no progress bars.")
    parser.add_argument(
        "--clean", action="store_true", help="With runs: end as KILLED the runs whose process on this host is gone."
    )
    return parser


def run_stages(stage: str, args: argparse.Namespace, overrides: dict[str, str]) -> None:
    with startup.collector_paused():
        from mnist_cnn.core import world as distributed
        from mnist_cnn.stages.download import download
    if stage == "download":
        # Only the section it reads: `dvc exp run -S train.lr=-1` must fail in train, not here.
        download(load_section(args.params, "data", overrides), args.root / files.DATA_DIR, args.mirror or None)
        return
    if stage == "runs":
        show_runs(load_section(args.params, "mlflow", overrides).experiment, args)
        return
    if stage == "tune":
        run_tune(args, overrides)
        return
    params = load_params(args.params, overrides)
    world = distributed.from_env()
    if world.distributed:
        if stage != "train":
            raise ConfigError(
                f"{stage}: under torchrun only the train stage runs "
                f"(run `python -m mnist_cnn {stage}` without torchrun)"
            )
        # Rank 0 alone writes models/: it alone takes the directory's lock.
        with lock.stage_lock(args.root / files.MODEL_DIR) if world.is_main else contextlib.nullcontext():
            _train_and_evaluate(stage, params, args)
        return
    if stage in ("train", "all") and params.train.processes > 1:
        _launch_training(stage, params, args, overrides)
        return
    with lock.stage_lock(args.root / files.MODEL_DIR):
        _train_and_evaluate(stage, params, args)


def _launch_training(stage: str, params: Params, args: argparse.Namespace, overrides: dict[str, str]) -> None:
    """``train.processes: N``: the train stage runs as N torchrun workers; evaluate follows here."""
    from mnist_cnn.ops import torchrun
    from mnist_cnn.stages.download import download

    _check_processes(params.train.processes, params.train.device)
    if stage == "all":
        download(params.data, args.root / files.DATA_DIR, args.mirror or None)
    argv = ["train", "--params", str(args.params), "--root", str(args.root)]
    argv += ["--no-progress"] * args.no_progress + [f"{key}={value}" for key, value in overrides.items()]
    ended = torchrun.launch(params.train.processes, argv)
    if ended.code != 0:
        _close_runs_of_dead_workers(params, args.root)
        raise torchrun.TrainingFailed(
            f"training with train.processes = {params.train.processes} failed (torchrun exit {ended.code}"
            + (f": {ended.cause})" if ended.cause else ")")
        )
    if stage == "all":
        with lock.stage_lock(args.root / files.MODEL_DIR):
            _train_and_evaluate("evaluate", params, args)


def _close_runs_of_dead_workers(params: Params, root: Path) -> None:
    """Rank 0 killed outright (kill -9, the OOM killer) could not end its run: its process is gone now,
    so the run is closed here (KILLED) rather than left RUNNING until the next training."""
    from mnist_cnn.tracking import owners, store

    owners.clean(params.mlflow.experiment, store.project_root(root.resolve()))


def _check_processes(processes: int, device_name: str) -> None:
    """Said once, here, before torchrun starts workers that would each fail with a traceback."""
    from mnist_cnn.core import runtime

    device = runtime.select_device(device_name)
    limit = runtime.process_limit(device)
    if processes > limit:
        raise ConfigError(
            f"train.processes = {processes}: expected at most {limit} on {device.type} here "
            f"({runtime.PROCESS_LIMIT_REASON[device.type]})"
        )


def _train_and_evaluate(stage: str, params: Params, args: argparse.Namespace) -> None:
    with startup.collector_paused():
        from mnist_cnn.stages import evaluate, train
        from mnist_cnn.stages.download import download

        if stage != "evaluate":
            import torch._dynamo  # noqa: F401  (torch.optim loads it at the first step)

    if stage == "all":
        download(params.data, args.root / files.DATA_DIR, args.mirror or None)
    paths = files.Paths(root=args.root, params_file=args.params)
    if stage in ("train", "all"):
        train.run_train(params, paths, False if args.no_progress else None, stage=stage)
    if stage in ("evaluate", "all"):
        _, result = evaluate.run_evaluate(params, paths)
        for split, values in result.metrics.items():
            print(f"{split:>5}: loss {values['loss']:.4f}  accuracy {values['accuracy']:.2f}%")


def tune_parser() -> argparse.ArgumentParser:
    """``mnist-cnn tune``'s own options (``tune --help``); the rest are ``--KEY VALUE`` overrides."""
    parser = argparse.ArgumentParser(
        prog="mnist-cnn tune",
        description="Run trials of the Optuna study of params.yaml's tune section (several workers may share it), "
        "each trial a real training; the last worker writes reports/best_params.yaml.",
        epilog="Any --KEY VALUE overrides params.yaml for this call: --tune.n_trials 10, --tune.storage URL, "
        "--tune.study_name NAME, --tune.timeout SECONDS, --train.device cuda, ...",
        allow_abbrev=False,
    )
    parser.add_argument("--params", type=Path, default=files.PARAMS, help="The params file (default: params.yaml).")
    parser.add_argument(
        "--root", type=Path, default=Path("."), help="The project directory holding data/ and reports/ (default: here)."
    )
    parser.add_argument("--no-progress", action="store_true", help="Print one line per epoch, no progress bars.")
    return parser


def run_tune(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    """Both the base params and the tune section are checked before any trial (or MLflow) starts."""
    tune_overrides = {k: v for k, v in overrides.items() if k.startswith("tune.")}
    params = load_params(args.params, {k: v for k, v in overrides.items() if k not in tune_overrides})
    from mnist_cnn.core.search import load_tune

    cfg = load_tune(args.params, params, tune_overrides)
    with startup.collector_paused():
        import torch._dynamo  # noqa: F401  (torch.optim loads it at the first step)

        from mnist_cnn.stages.tune import describe, tune

    print(describe(tune(params, cfg, args.root, False if args.no_progress else None)))


def show_runs(experiment: str, args: argparse.Namespace) -> None:
    with startup.collector_paused():
        from mnist_cnn.tracking import owners, store

    root = store.project_root(args.root.resolve())
    print(f"MLflow store: {masked(store.configure(root))}")  # which one: a UI started elsewhere shows another
    if args.clean:
        closed = owners.clean(experiment, root)
        print(f"closed {len(closed)} stale run(s) as KILLED" + "".join(f"\n  {run_id}" for run_id in closed))
    listed = owners.running(experiment, root)
    print(f"{len(listed)} RUNNING run(s) in experiment {experiment!r}")
    for run in listed:
        print(f"  {run.run_id}  {run.state:<7}  {run.host}:{run.pid}  {run.name}")


def server_main(argv: list[str]) -> int:
    """``mnist-cnn server start|stop|status|add-user NAME|grant NAME``: the team's tracking server."""
    from mnist_cnn.ops import server, server_users
    from mnist_cnn.ops.server_state import SETTINGS, recorded_config

    description = " ".join(server.__doc__.split("\n\n")[0].split())  # the docstring's first paragraph, whole
    parser = argparse.ArgumentParser(prog="mnist-cnn server", description=description)
    parser.add_argument("action", choices=("start", "stop", "status", "add-user", "grant"))
    parser.add_argument(
        "username",
        nargs="?",
        help="With add-user: the login to create (its password is read from stdin). With grant: the user who may "
        "then log runs into the experiment mnist-cnn and add versions to the registered model mnist-cnn.",
    )
    defaults = server.ServerConfig()
    parser.add_argument(
        "--home",
        type=Path,
        default=defaults.home,
        help="The directory holding PostgreSQL's data, the artifacts, the logs and server.json (what start started).",
    )
    # No defaults below: an option left out means "as start recorded it in --home" (else the default
    # shown), and an option given to stop, status or add-user must agree with the running server's.
    parser.add_argument(
        "--host", default=None, help=f"The address the MLflow server listens on (default: {defaults.host})."
    )
    parser.add_argument("--port", type=int, default=None, help=f"The MLflow server's port (default: {defaults.port}).")
    parser.add_argument(
        "--db-port", type=int, default=None, help=f"PostgreSQL's port, on 127.0.0.1 only (default: {defaults.db_port})."
    )
    parser.add_argument(
        "--artifacts-destination",
        default=None,
        help="Where the server stores artifacts: HOME/artifacts by default, or s3://...",
    )
    parser.add_argument(
        "--allowed-hosts", default=None, help="The host names clients use to reach the server, when not an IP address."
    )
    args = parser.parse_args(argv)
    if args.action in ("add-user", "grant") and not args.username:
        parser.error(f"{args.action} needs a USERNAME")
    given = {key: getattr(args, key) for key in SETTINGS if getattr(args, key) is not None}

    def act() -> None:
        cfg = recorded_config(args.home, given, starting=args.action == "start")
        if args.action == "start":
            print(f"MLflow server at {server.start(cfg)} (PostgreSQL on 127.0.0.1:{cfg.db_port}, home {cfg.home})")
        elif args.action == "stop":
            print(server.stop(cfg))
        elif args.action == "status":
            for name, state in server.status(cfg).items():
                print(f"{name}: {state}")
        elif args.action == "grant":
            print("\n".join(server_users.grant(cfg.admin_url, args.username)))
        else:
            password = sys.stdin.readline().rstrip("\n")
            if not password:
                raise server.ServerError("add-user: give the new user's password on stdin")
            server_users.add_user(cfg.admin_url, args.username, password)
            print(f"user {args.username!r} created")

    return shown_errors(act)


def predict_main(argv: list[str]) -> int:
    """``mnist-cnn predict PATH... [--model-uri URI] [--json]``: the digit in each image file."""
    with startup.collector_paused():
        from mnist_cnn.stages.predict import DEFAULT_MODEL_URI, predict_and_record, print_predictions

    parser = argparse.ArgumentParser(prog="mnist-cnn predict", description=predict_main.__doc__.split(": ", 1)[1])
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="Image files (PNG, JPEG, ...), or directories of them."
    )
    parser.add_argument("--model-uri", default="", help=f"An MLflow model URI (default: {DEFAULT_MODEL_URI}).")
    parser.add_argument("--json", action="store_true", help="Print one JSON list on stdout instead of a table.")
    args = parser.parse_args(argv)
    model_uri = args.model_uri or DEFAULT_MODEL_URI
    return shown_errors(lambda: print_predictions(predict_and_record(args.paths, model_uri), args.json))


def promote_main(argv: list[str]) -> int:
    """``mnist-cnn promote VERSION --force [--reason TEXT]``: move the champion alias by hand."""
    parser = argparse.ArgumentParser(
        prog="mnist-cnn promote",
        description="Move the registered model's champion alias to VERSION by hand. The evaluate stage moves it "
        "only when a new version beats the champion on the validation images (McNemar's exact test, "
        "mlflow.promote_alpha); this overrides that rule and records who did it and why in the version's tags.",
    )
    parser.add_argument("version", help="The model version that becomes @champion.")
    parser.add_argument("--force", action="store_true", required=True, help="Required: this overrides the rule.")
    parser.add_argument("--reason", default="", help="Why, for the version's promotion.reason tag.")
    parser.add_argument("--params", type=Path, default=files.PARAMS, help="The params file (default: params.yaml).")
    args = parser.parse_args(argv)
    return shown_errors(lambda: _force_champion(args.version, args.reason, args.params))


def _force_champion(version: str, reason: str, params_file: Path) -> None:
    with startup.collector_paused():
        from mnist_cnn.tracking import registry, store

    model = load_section(params_file, "mlflow").registered_model
    store.configure(store.project_root())
    before = registry.force_champion(model, version, store.current_user(), reason)
    print(f"{model} v{version} is now @champion" + (f" (was v{before})" if before else ""))


def ui_main(argv: list[str]) -> int:
    """``mnist-cnn ui``: MLflow's UI on the project's store, from wherever it is started."""
    parser = argparse.ArgumentParser(
        prog="mnist-cnn ui",
        description="Start MLflow's UI on this project's store: $MLFLOW_TRACKING_URI, else the mlflow.db of the "
        "project this directory is in (or of this package's clone). A plain `mlflow ui` started in another "
        "directory would open a new, empty store there.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="The address the UI listens on (default: 127.0.0.1).")
    parser.add_argument("--port", type=int, default=5000, help="The UI's port (default: 5000).")
    parser.add_argument(
        "--workers", type=int, default=1, help="Server processes (default: 1, for one user; MLflow's own is 4)."
    )
    args = parser.parse_args(argv)
    return shown_errors(lambda: _exec_ui(args.host, args.port, args.workers))


def _exec_ui(host: str, port: int, workers: int) -> None:
    import os

    from mnist_cnn.tracking import store

    uri = store.tracking_uri(files.find_project(store.project_root()))
    if uri.startswith(("http://", "https://")):
        print(f"the team server is its own UI: open {masked(uri)}")
        return
    path = store.sqlite_path(uri)
    if path is not None and not path.is_file():
        raise files.NoProjectError(f"{path}: no MLflow store yet; run the pipeline first (dvc repro)")
    print(f"MLflow UI on {masked(uri)}: http://{host}:{port}", flush=True)
    # MLflow's job runner (GenAI judges, trace roll-ups) would add eight processes this project never uses.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    command += ["--host", host, "--port", str(port), "--workers", str(workers)]
    os.execve(sys.executable, command, env)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["server"]:
        return server_main(argv[1:])
    if argv[:1] == ["predict"]:
        return predict_main(argv[1:])
    if argv[:1] == ["ui"]:
        return ui_main(argv[1:])
    if argv[:1] == ["promote"]:
        return promote_main(argv[1:])
    if argv[:1] == ["tune"] and {"-h", "--help"} & set(argv[1:]):
        tune_parser().print_help()
        return 0
    args, extra = build_parser().parse_known_args(argv)
    # SIGTERM and SIGHUP unwind like Ctrl-C: temporary files go, the MLflow run ends KILLED.
    return shown_errors(lambda: run_stages(args.stage, args, parse_overrides(extra)), stop_signals=True)


def shown_errors(body: Callable[[], int | None], stop_signals: bool = False) -> int:
    """Run ``body``; the one place that decides how an error is shown. A project error (or an outside
    engine's refusal registered as one, see core/errors.py) is ``error: <one line>`` and its exit code
    (2 for bad params, else 1); Ctrl-C is ``interrupted`` and 130; anything else is a bug in the code and
    keeps its traceback."""
    try:
        with signals.stop_signals_interrupt() if stop_signals else contextlib.nullcontext():
            return body() or 0
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not errors.is_user_facing(exc):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return errors.exit_code(exc)
