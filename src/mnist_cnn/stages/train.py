"""Train stage: the weights, the per-epoch history and ``train.json``, inside one MLflow run that the
evaluate stage completes. ``dvc.yaml`` (through the CLI), ``MLproject`` and the tests call ``run_train``."""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from mnist_cnn.core import files
from mnist_cnn.core.checkpoint import Checkpointing, load_checkpoint, save_torch, training_fingerprint
from mnist_cnn.core.data import (
    verified_md5s,
)
from mnist_cnn.core.data_checks import check_data, training_and_validation
from mnist_cnn.core.distributed import device_for, process_group
from mnist_cnn.core.files import Paths
from mnist_cnn.core.loop import EpochStats, Reporter, TrainResult, fit
from mnist_cnn.core.params import Params
from mnist_cnn.core.runtime import select_device, select_precision
from mnist_cnn.core.world import SINGLE, World, from_env
from mnist_cnn.tracking import records, runs, store

log = logging.getLogger(__name__)


def run_train(
    params: Params,
    paths: Paths,
    show_progress: bool | None = None,
    stage: str = "train",
    world: World | None = None,
) -> tuple[str | None, TrainResult]:
    """Train inside a new MLflow run (or the one ``mlflow run`` made); return (run id, result).

    The run is named after ``stage`` (``train`` or ``all``) and what differs from the params file,
    samples system metrics while it trains, and gets a description evaluate completes later.
    With ``train.resume: auto``, a checkpoint of this same training (left by a killed or crashed
    run) is continued, in the MLflow run it was started in. Under torchrun only rank 0 tracks and
    writes; the other ranks train their shards and return (None, result).
    """
    world = world or from_env()
    root = store.project_root(paths.root.resolve())
    md5s = verified_md5s(paths.data, params.data.dataset)
    fingerprint = training_fingerprint(params, md5s, world.size)
    checkpoint_path = paths.models / files.CHECKPOINT.name
    if not world.is_main:  # rank 0 alone holds the lock and reads the checkpoint; fit hands it on
        checkpointing = Checkpointing(checkpoint_path, fingerprint)
        return None, train(params, paths.data, paths.models, paths.reports, None, False, checkpointing, world)
    checks = check_data(paths.data)  # before any run or training: a failed check is one line
    log.info(
        "data checked: %d train / %d test images, classes %.1f-%.1f%%, %d test images also in the training file%s",
        checks.train_images,
        checks.test_images,
        checks.smallest_class_share,
        checks.largest_class_share,
        checks.test_duplicates,
        " (left out of training)" if params.data.drop_test_duplicates and checks.test_duplicates else "",
    )
    state = load_checkpoint(checkpoint_path, fingerprint) if params.train.resume == "auto" else None
    resumed_run = state["run_id"] if state is not None and runs.run_exists(state["run_id"], root) else None
    name = records.run_name(stage, params, paths)
    try:
        with runs.run(
            params.mlflow.experiment, run_id=resumed_run, root=root, name=name, system_metrics=True
        ) as active:
            run_id = active.info.run_id
            records.training_started(params, paths, root, md5s, resumed_run is not None, checks)
            if state is not None:
                records.training_resumed(state["history"], state["epoch"])
            checkpointing = Checkpointing(checkpoint_path, fingerprint, run_id, state)
            # The old train.json names the run of the weights about to be replaced: a kill after the new
            # weights are written must not let evaluate file them under that run.
            (paths.models / files.TRAIN_INFO.name).unlink(missing_ok=True)
            epochs = runs.EpochLogger()
            result = train(params, paths.data, paths.models, paths.reports, epochs, show_progress, checkpointing, world)
            epochs.wait()  # the last epoch's metrics are in the run before the run is called done
            records.training_finished(result, world.size)
            write_train_info(result, paths.models, run_id, params)
            # Last: a kill before this line leaves the checkpoint, and the rerun records what is missing.
            checkpoint_path.unlink(missing_ok=True)
    except (runs.ServerLost, store.ArtifactsNotStored) as lost:
        if params.train.resume != "auto" or not checkpoint_path.is_file():
            raise
        raise type(lost)(f"{lost}; rerun then: the training resumes from {checkpoint_path}") from None
    return run_id, result


def history_csv(history: list[EpochStats]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(asdict(history[0])), lineterminator="\n")
    writer.writeheader()
    for stats in history:
        writer.writerow({k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(stats).items()})
    return buffer.getvalue()


def train(
    params: Params,
    data_dir: Path = files.DATA_DIR,
    model_dir: Path = files.MODEL_DIR,
    reports_dir: Path = files.REPORTS_DIR,
    reporter: Reporter | None = None,
    show_progress: bool | None = None,
    checkpointing: Checkpointing | None = None,
    world: World = SINGLE,
) -> TrainResult:
    """Train on ``data_dir``; write the best weights (a state_dict) and the per-epoch history.

    The data files are checked against their expected MD5s first. With ``checkpointing``, the
    checkpoint stays: the caller removes it once everything of the run is recorded (a kill before
    that resumes, with nothing left to train). Of several processes, rank 0 writes.
    """
    verified_md5s(data_dir, params.data.dataset)
    device = device_for(world, select_device(params.train.device))
    precision = select_precision(params.train.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_data, val_data = training_and_validation(params, data_dir, device)
    log.info(
        "training on %s (%s): %d train / %d validation samples%s",
        device,
        precision,
        len(train_data.y),
        len(val_data.y),
        f", rank {world.rank} of {world.size} processes" if world.distributed else "",
    )
    with process_group(world, device):
        net, result = fit(
            params, train_data, val_data, device, precision, reporter, show_progress, checkpointing, world
        )
    if not world.is_main:
        return result
    cpu_state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    save_torch(Path(model_dir) / files.WEIGHTS.name, cpu_state)
    files.write_text_atomic(Path(reports_dir) / files.HISTORY.name, history_csv(result.history))
    return result


def write_train_info(result: TrainResult, model_dir: Path, run_id: str | None, params: Params) -> None:
    """``train.json``: the result, the MLflow run, and the split the weights were trained on (evaluate
    refuses another split: its "validation" set would overlap the training data)."""
    info = {k: v for k, v in asdict(result).items() if k != "history"}
    info.update(
        run_id=run_id,
        val_split=params.train.val_split,
        split_seed=params.data.split_seed,
        monitor=params.train.monitor,
    )
    files.write_text_atomic(Path(model_dir) / files.TRAIN_INFO.name, json.dumps(info, indent=2) + "\n")
