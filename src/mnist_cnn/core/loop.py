"""Train stage: the seed CNN with Adadelta, early stopping on validation loss, best weights kept."""

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
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from mnist_cnn.core.augment import Distortions, random_distort
from mnist_cnn.core.checkpoint import CHECKPOINT_FORMAT, Checkpointing, save_torch
from mnist_cnn.core.data import Tensors
from mnist_cnn.core.distributed import (
    SINGLE,
    World,
    all_sum,
    from_main,
    gathered,
    shard,
    shard_size,
)
from mnist_cnn.core.errors import ProjectError
from mnist_cnn.core.inference import prepare_model, validate
from mnist_cnn.core.model import Net
from mnist_cnn.core.optim import make_optimizer, monitor_value
from mnist_cnn.core.params import Params, TrainConfig
from mnist_cnn.core.runtime import autocast, memory_format, seed_everything

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


@dataclass
class Augmentation:
    """Random distortions of each training batch, drawn from their own seeded generator."""

    distortions: Distortions
    generator: torch.Generator
    background: float  # the normalised value of a blank pixel

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return random_distort(x, self.distortions, self.generator, self.background)


def batch_per_process(batch_size: int, world: World) -> int:
    """``train.batch_size`` is the global batch: N processes take a 1/N share of it each."""
    return -(-batch_size // world.size)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Tensors,
    cfg: TrainConfig,
    precision: str,
    generator: torch.Generator,
    batch_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    progress: tqdm | None = None,
    world: World = SINGLE,
    augmentation: Augmentation | None = None,
    ema: AveragedModel | None = None,
) -> tuple[float, float]:
    """One pass over ``data`` in a seeded random order; returns (mean train loss, accuracy %).

    Loss and correct counts accumulate on the device and are read once, so a GPU never waits on
    the host inside the epoch. With several processes, each takes its shard of the same permutation.
    """
    model.train()
    device = data.x.device
    layout_of_batches = memory_format(device)
    order = shard(torch.randperm(len(data.y), generator=generator), world).to(device)
    batch_size = batch_per_process(cfg.batch_size, world)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        x = data.x.index_select(0, idx)
        if augmentation is not None:
            x = augmentation(x)
        x = x.contiguous(memory_format=layout_of_batches)
        y = data.y.index_select(0, idx)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            output = model(x)
            loss = F.cross_entropy(output, y, label_smoothing=cfg.label_smoothing)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if ema is not None:
            ema.update_parameters(model)  # a DDP or compiled wrapper yields the net's parameters, in order
        if batch_scheduler is not None:
            batch_scheduler.step()
        loss_sum += loss.detach().float() * len(idx)
        correct += (output.detach().argmax(dim=1) == y).sum()
        if progress is not None:
            progress.update(1)
    count = torch.tensor(float(len(order)), device=device, dtype=torch.float64)
    loss_sum, correct, count = all_sum(torch.stack([loss_sum.double(), correct.double(), count]), world).tolist()
    return loss_sum / count, 100.0 * correct / count


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
    seed_everything(cfg.seed)
    net = prepare_model(Net(params.model), device)
    if world.distributed:
        torch.manual_seed(cfg.seed + world.rank)  # same initial weights, but each rank its own dropout masks
    if world.distributed:
        trained = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        trained = net
    model = trained if cfg.compile == "none" else torch.compile(trained, mode=cfg.compile)
    steps = -(-shard_size(len(train_data.y), world) // batch_per_process(cfg.batch_size, world))
    optimizer, scheduler = make_optimizer(net, cfg, steps)
    per_batch = scheduler if cfg.scheduler == "onecycle" else None
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    generator = torch.Generator().manual_seed(cfg.seed)
    distortions = Distortions(
        shift=cfg.augment_shift,
        rotate=cfg.augment_rotate,
        scale=cfg.augment_scale,
        shear=cfg.augment_shear,
        erase=cfg.augment_erase,
        elastic_alpha=cfg.augment_elastic,
        elastic_sigma=cfg.augment_elastic_sigma,
    )
    augmentation = None
    if distortions.active:
        augment_rng = torch.Generator(device=device).manual_seed(cfg.seed + 1_000_003 * world.rank)
        augmentation = Augmentation(distortions, augment_rng, background=train_data.x.amin().item())
    # The average follows the weights every step; validation, early stopping and the saved weights use it.
    ema = (
        AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if cfg.ema_decay
        else None
    )
    scored = ema.module if ema is not None else net
    loop = _Loop(net, optimizer, scheduler, scaler, generator, history=[], augmentation=augmentation, ema=ema)
    # Rank 0 read the checkpoint under the stage lock; the other ranks take its copy rather than race a
    # concurrent training's file.
    resume = from_main(checkpointing.state, world) if checkpointing is not None else None
    if resume is not None:
        loop.restore(resume, world.rank)
        log.info("resuming after epoch %d from %s", loop.history[-1].epoch, checkpointing.path)
    history = loop.history
    first = history[-1].epoch + 1 if history else 1
    if history and _early_stop(history[-1].epoch, loop.best_epoch, cfg.patience):
        first = cfg.epochs + 1  # the interrupted run had already stopped early
    started = time.perf_counter()
    for epoch in range(first, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        # disable=None: tqdm shows the bar on a terminal only, so logs keep just the epoch lines.
        disable = None if show_progress is None else not show_progress
        if not world.is_main:
            disable = True
        with tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False, disable=disable) as bar:
            train_loss, train_acc = train_epoch(
                model,
                optimizer,
                train_data,
                cfg,
                precision,
                generator,
                per_batch,
                scaler,
                bar,
                world,
                augmentation if epoch <= cfg.epochs - cfg.augment_clean_epochs else None,
                ema,
            )
        val_loss, val_acc = validate(scored, val_data, params.evaluate.batch_size, precision, world)
        if cfg.scheduler == "plateau":
            scheduler.step(monitor_value(cfg, val_loss, val_acc))
        elif scheduler is not None and per_batch is None:
            scheduler.step()
        stats = EpochStats(epoch, train_loss, train_acc, val_loss, val_acc, lr, time.perf_counter() - epoch_start)
        history.append(stats)
        improved = loop.improves(stats, cfg.monitor)
        if improved:
            loop.best_loss, loop.best_acc, loop.best_epoch = val_loss, val_acc, epoch
            loop.best_state = copy.deepcopy(scored.state_dict())
        if checkpointing is not None:
            streams = gathered(loop.random_streams(), world)
            if world.is_main:
                seconds = loop.seconds_before + time.perf_counter() - started
                save_torch(
                    checkpointing.path, loop.state(checkpointing.fingerprint, checkpointing.run_id, seconds, streams)
                )
        if world.is_main:
            log.info(_format_epoch(stats, cfg.epochs, improved))
        if reporter is not None:
            reporter.log_epoch(stats)
        if _early_stop(epoch, loop.best_epoch, cfg.patience):
            log.log(
                logging.INFO if world.is_main else logging.DEBUG,
                "early stop: no better %s in %d epoch%s; best epoch %d",
                "validation loss" if cfg.monitor == "val_loss" else "validation accuracy",
                cfg.patience,
                "" if cfg.patience == 1 else "s",
                loop.best_epoch,
            )
            break
    if loop.best_state is None:
        raise TrainingDiverged(
            f"train.lr = {cfg.lr}: validation loss was never finite (training diverged); try a lower train.lr"
        )
    net.load_state_dict(loop.best_state)  # an EMA's state_dict has the net's keys
    result = TrainResult(
        best_epoch=loop.best_epoch,
        stopped_epoch=history[-1].epoch,
        best_val_loss=loop.best_loss,
        best_val_acc=loop.best_acc,
        device=device.type,
        precision=precision,
        train_seconds=loop.seconds_before + time.perf_counter() - started,
        history=history,
    )
    return net.eval(), result
