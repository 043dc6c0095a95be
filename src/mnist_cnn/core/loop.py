"""The training loop: epochs, validation, early stopping on the ``monitor`` value, the best weights kept,
and what a checkpoint saves of it (resumed to the last bit)."""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from mnist_cnn.core.augment import Distortions
from mnist_cnn.core.checkpoint import CHECKPOINT_FORMAT, Checkpointing, save_torch
from mnist_cnn.core.data import Tensors
from mnist_cnn.core.distributed import from_main, gathered, shard_size
from mnist_cnn.core.epoch import Augmentation, batch_per_process, train_epoch
from mnist_cnn.core.errors import ProjectError
from mnist_cnn.core.inference import prepare_model, validate
from mnist_cnn.core.model import Net
from mnist_cnn.core.optim import make_optimizer, monitor_value
from mnist_cnn.core.params import Params, TrainConfig
from mnist_cnn.core.runtime import seed_everything
from mnist_cnn.core.world import SINGLE, World

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    epoch_seconds: float


@dataclass(frozen=True)
class TrainResult:
    best_epoch: int
    stopped_epoch: int
    best_val_loss: float  # the kept epoch's (the lowest only with monitor val_loss)
    best_val_acc: float  # the kept epoch's
    device: str
    precision: str
    train_seconds: float
    history: list[EpochStats]


class Reporter(Protocol):
    """Where per-epoch metrics go (MLflow in the pipeline; nothing in a bare call)."""

    def log_epoch(self, stats: EpochStats) -> None: ...


class TrainingDiverged(ProjectError, RuntimeError):
    """No epoch gave a finite validation loss: no weights to keep."""


def _format_epoch(stats: EpochStats, epochs: int, improved: bool) -> str:
    return (
        f"epoch {stats.epoch:>3}/{epochs} | train loss {stats.train_loss:.4f} acc {stats.train_acc:6.2f}%"
        f" | val loss {stats.val_loss:.4f} acc {stats.val_acc:6.2f}% | lr {stats.lr:.4g}"
        f" | {stats.epoch_seconds:5.1f}s{' *' if improved else ''}"
    )


@dataclass
class _Loop:
    """Everything an epoch changes: what a checkpoint saves and a resume restores."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    generator: torch.Generator
    history: list[EpochStats]
    augmentation: Augmentation | None = None
    ema: AveragedModel | None = None
    best_loss: float = float("inf")
    best_acc: float = 0.0
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    seconds_before: float = 0.0  # training time of the epochs a resumed run had done

    def random_streams(self) -> dict[str, Any]:
        """This process's random state: each rank has its own dropout masks and augmentation draws."""
        return {
            "augment_rng": self.augmentation.generator.get_state() if self.augmentation is not None else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": random.getstate(),
            # as a list: torch.load(weights_only=True) refuses numpy arrays
            "numpy_rng": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        }

    def restore_random_streams(self, streams: dict[str, Any]) -> None:
        if self.augmentation is not None:
            self.augmentation.generator.set_state(streams["augment_rng"])
        torch.set_rng_state(streams["torch_rng"])
        if torch.cuda.is_available() and streams["cuda_rng"]:
            torch.cuda.set_rng_state_all(streams["cuda_rng"])
        random.setstate(_as_tuple(streams["python_rng"]))
        kind, keys, pos, has_gauss, gauss = streams["numpy_rng"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))

    def state(self, fingerprint: str, run_id: str | None, seconds: float, streams: list[dict]) -> dict[str, Any]:
        """The checkpoint; ``streams``: every rank's ``random_streams``, in rank order."""
        return {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "run_id": run_id,
            "epoch": self.history[-1].epoch,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "generator": self.generator.get_state(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "random_streams": streams,
            "history": [asdict(h) for h in self.history],
            "best_loss": self.best_loss,
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "train_seconds": seconds,
        }

    def improves(self, stats: EpochStats, monitor: str) -> bool:
        """Whether ``stats`` beats the best epoch so far. A non-finite loss never does: accuracy alone
        would keep a diverged net. By accuracy, a tie goes to the lower loss: 12k validation images
        move in steps of 0.008%, so ties are common."""
        if not math.isfinite(stats.val_loss):
            return False
        if monitor == "val_loss":
            return stats.val_loss < self.best_loss
        return (stats.val_acc, -stats.val_loss) > (self.best_acc, -self.best_loss)

    def record(self, stats: EpochStats, monitor: str, scored: nn.Module) -> bool:
        """Add the epoch to the history; keep ``scored``'s weights if it is the best so far."""
        self.history.append(stats)
        improved = self.improves(stats, monitor)
        if improved:
            self.best_loss, self.best_acc, self.best_epoch = stats.val_loss, stats.val_acc, stats.epoch
            self.best_state = copy.deepcopy(scored.state_dict())
        return improved

    def restore(self, state: dict[str, Any], rank: int = 0) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.restore_random_streams(state["random_streams"][rank])
        self.history = [EpochStats(**h) for h in state["history"]]
        self.best_loss, self.best_acc, self.best_epoch = state["best_loss"], state["best_acc"], state["best_epoch"]
        self.best_state = state["best_state"]
        self.seconds_before = state["train_seconds"]


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _early_stop(epoch: int, best_epoch: int, patience: int) -> bool:
    return epoch - best_epoch >= patience


def fit(
    params: Params,
    train_data: Tensors,
    val_data: Tensors,
    device: torch.device,
    precision: str,
    reporter: Reporter | None = None,
    show_progress: bool | None = None,
    checkpointing: Checkpointing | None = None,
    world: World = SINGLE,
) -> tuple[nn.Module, TrainResult]:
    """Train until ``epochs`` or ``patience`` epochs without a better ``monitor`` value (validation loss
    or accuracy); restore the best epoch's weights.

    With ``checkpointing``, every epoch ends with a checkpoint, and ``checkpointing.state`` (one of the
    same training) is continued: the same epochs follow, to the last bit on the same machine.
    With ``world`` of several processes (torchrun), the net is wrapped in DistributedDataParallel and
    only rank 0 saves checkpoints.
    """
    cfg = params.train
    loop, run = _build(params, train_data, device, precision, world)
    first = _resume(loop, cfg, checkpointing, world)
    started = time.perf_counter()
    for epoch in range(first, cfg.epochs + 1):
        stats = _one_epoch(loop, run, epoch, params, train_data, val_data, show_progress, world)
        improved = loop.record(stats, cfg.monitor, run.scored)
        if checkpointing is not None:
            _save_checkpoint(loop, checkpointing, loop.seconds_before + time.perf_counter() - started, world)
        if world.is_main:
            log.info(_format_epoch(stats, cfg.epochs, improved))
        if reporter is not None:
            reporter.log_epoch(stats)
        if _early_stop(epoch, loop.best_epoch, cfg.patience):
            _log_early_stop(cfg, loop.best_epoch, world)
            break
    if loop.best_state is None:
        raise TrainingDiverged(
            f"train.lr = {cfg.lr}: validation loss was never finite (training diverged); try a lower train.lr"
        )
    loop.net.load_state_dict(loop.best_state)  # an EMA's state_dict has the net's keys
    result = TrainResult(
        best_epoch=loop.best_epoch,
        stopped_epoch=loop.history[-1].epoch,
        best_val_loss=loop.best_loss,
        best_val_acc=loop.best_acc,
        device=device.type,
        precision=precision,
        train_seconds=loop.seconds_before + time.perf_counter() - started,
        history=loop.history,
    )
    return loop.net.eval(), result


@dataclass(frozen=True)
class _Run:
    """What stays the same for every epoch: the model the batches go through and the schedule's pace."""

    model: nn.Module  # the net, wrapped in DistributedDataParallel and/or compiled
    scored: nn.Module  # what validation scores and the kept weights come from: the net or its EMA
    steps: int  # batches per epoch, per process
    per_batch: Any  # the scheduler when it steps every batch (onecycle), else None
    precision: str


def _build(
    params: Params, train_data: Tensors, device: torch.device, precision: str, world: World
) -> tuple[_Loop, _Run]:
    """The net, its wrappers, optimizer, schedule, augmentation and EMA, seeded in this order: the random
    draws (initial weights first) are the same as in every earlier version of this loop."""
    cfg = params.train
    seed_everything(cfg.seed)
    net = prepare_model(Net(params.model), device)
    if world.distributed:
        torch.manual_seed(cfg.seed + world.rank)  # same initial weights, but each rank its own dropout masks
        trained = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        trained = net
    model = trained if cfg.compile == "none" else torch.compile(trained, mode=cfg.compile)
    steps = -(-shard_size(len(train_data.y), world) // batch_per_process(cfg.batch_size, world))
    optimizer, scheduler = make_optimizer(net, cfg, steps)
    per_batch = scheduler if cfg.scheduler.name == "onecycle" else None
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    generator = torch.Generator().manual_seed(cfg.seed)
    augmentation = _augmentation(cfg, train_data, device, world)
    # The average follows the weights every step; validation, early stopping and the saved weights use it.
    ema = (
        AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if cfg.ema_decay
        else None
    )
    loop = _Loop(net, optimizer, scheduler, scaler, generator, history=[], augmentation=augmentation, ema=ema)
    scored = ema.module if ema is not None else net
    return loop, _Run(model, scored, steps, per_batch, precision)


def _augmentation(cfg: TrainConfig, train_data: Tensors, device: torch.device, world: World) -> Augmentation | None:
    distortions = Distortions(
        shift=cfg.augment_shift,
        rotate=cfg.augment_rotate,
        scale=cfg.augment_scale,
        shear=cfg.augment_shear,
        erase=cfg.augment_erase,
        elastic_alpha=cfg.augment_elastic,
        elastic_sigma=cfg.augment_elastic_sigma,
    )
    if not distortions.active:
        return None
    augment_rng = torch.Generator(device=device).manual_seed(cfg.seed + 1_000_003 * world.rank)
    return Augmentation(distortions, augment_rng, background=train_data.x.amin().item())


def _resume(loop: _Loop, cfg: TrainConfig, checkpointing: Checkpointing | None, world: World) -> int:
    """Restore the checkpoint's state, if any; return the first epoch still to train."""
    # Rank 0 read the checkpoint under the stage lock; the other ranks take its copy rather than race a
    # concurrent training's file.
    resume = from_main(checkpointing.state, world) if checkpointing is not None else None
    if resume is None:
        return 1
    loop.restore(resume, world.rank)
    log.info("resuming after epoch %d from %s", loop.history[-1].epoch, checkpointing.path)
    last = loop.history[-1].epoch
    if _early_stop(last, loop.best_epoch, cfg.patience):
        return cfg.epochs + 1  # the interrupted run had already stopped early
    return last + 1


def _one_epoch(
    loop: _Loop,
    run: _Run,
    epoch: int,
    params: Params,
    train_data: Tensors,
    val_data: Tensors,
    show_progress: bool | None,
    world: World,
) -> EpochStats:
    """Train one epoch, validate, step the per-epoch schedule."""
    cfg = params.train
    epoch_start = time.perf_counter()
    lr = loop.optimizer.param_groups[0]["lr"]
    # disable=None: tqdm shows the bar on a terminal only, so logs keep just the epoch lines.
    disable = True if not world.is_main else None if show_progress is None else not show_progress
    augmentation = loop.augmentation if epoch <= cfg.epochs - cfg.augment_clean_epochs else None
    with tqdm(total=run.steps, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False, disable=disable) as bar:
        train_loss, train_acc = train_epoch(
            run.model,
            loop.optimizer,
            train_data,
            cfg,
            run.precision,
            loop.generator,
            run.per_batch,
            loop.scaler,
            bar,
            world,
            augmentation,
            loop.ema,
        )
    val_loss, val_acc = validate(run.scored, val_data, params.evaluate.batch_size, run.precision, world)
    if cfg.scheduler.name == "plateau":
        loop.scheduler.step(monitor_value(cfg, val_loss, val_acc))
    elif loop.scheduler is not None and run.per_batch is None:
        loop.scheduler.step()
    return EpochStats(epoch, train_loss, train_acc, val_loss, val_acc, lr, time.perf_counter() - epoch_start)


def _save_checkpoint(loop: _Loop, checkpointing: Checkpointing, seconds: float, world: World) -> None:
    streams = gathered(loop.random_streams(), world)  # every rank takes part; rank 0 writes
    if world.is_main:
        save_torch(checkpointing.path, loop.state(checkpointing.fingerprint, checkpointing.run_id, seconds, streams))


def _log_early_stop(cfg: TrainConfig, best_epoch: int, world: World) -> None:
    log.log(
        logging.INFO if world.is_main else logging.DEBUG,
        "early stop: no better %s in %d epoch%s; best epoch %d",
        "validation loss" if cfg.monitor == "val_loss" else "validation accuracy",
        cfg.patience,
        "" if cfg.patience == 1 else "s",
        best_epoch,
    )
