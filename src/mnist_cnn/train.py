"""Train stage: the seed CNN with Adadelta, early stopping on validation loss, best weights kept."""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import random
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from . import layout
from .augment import Distortions, random_distort
from .config import Params, TrainConfig, flatten
from .data import load_split, normalise, split_indices, verified_md5s
from .distributed import SINGLE, World, all_sum, device_for, from_main, gathered, process_group, shard, shard_size
from .model import NUM_CLASSES, Net
from .runtime import autocast, memory_format, seed_everything, select_device, select_precision

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


CHECKPOINT_FORMAT = 4


@dataclass(frozen=True)
class Checkpointing:
    """Where to save a checkpoint after every epoch, what identifies this training, and (``state``) a
    checkpoint of the same training to continue from."""

    path: Path
    fingerprint: str
    run_id: str | None = None
    state: dict[str, Any] | None = None


def training_fingerprint(params: Params, data_md5s: Mapping[str, str], processes: int = 1) -> str:
    """What a checkpoint must match to be continued: every data/model/train value, the data's MD5s and
    the number of processes (each keeps random streams of its own). Plain JSON, not a hash: a
    checkpoint that does not match can then say what changed."""
    values = {
        k: v
        for k, v in flatten(params).items()
        if k.split(".")[0] in ("data", "model", "train") and k != "train.resume"
    }
    return json.dumps(
        {"params": values, "data": dict(sorted(data_md5s.items())), "processes": processes}, sort_keys=True
    )


def fingerprint_difference(old: str, new: str, shown: int = 3) -> str:
    """What differs between two ``training_fingerprint`` values, for a log line."""
    try:
        before, after = json.loads(old), json.loads(new)
        changes = []
        for key in sorted(set(before["params"]) | set(after["params"])):
            if key not in before["params"]:
                changes.append(f"no {key} (a newer param)")
            elif key not in after["params"]:
                changes.append(f"{key} (no longer a param)")
            elif before["params"][key] != after["params"][key]:
                changes.append(f"{key} = {before['params'][key]!r} (now {after['params'][key]!r})")
        if before["data"] != after["data"]:
            changes.append("other data files")
        if before["processes"] != after["processes"]:
            changes.append(f"{before['processes']} processes (now {after['processes']})")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):  # older ones kept a hash
        return "other params or data"
    if not changes:  # the same values written another way
        return "other params or data"
    more = f" and {len(changes) - shown} more" if len(changes) > shown else ""
    return ", ".join(changes[:shown]) + more


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to this very training, else None (and a line saying why)."""
    if not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file means "start over", never a crash
        log.warning("%s: unreadable checkpoint (%s); training from scratch", path, type(exc).__name__)
        return None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        log.warning("%s: not a checkpoint of this version; training from scratch", path)
        return None
    if state.get("fingerprint") != fingerprint:
        difference = fingerprint_difference(str(state.get("fingerprint")), fingerprint)
        log.info("%s: from a training with %s; training from scratch", path, difference)
        return None
    return state


@dataclass(frozen=True)
class Tensors:
    """Normalised images (N, 1, 28, 28) and labels, resident on the training device."""

    x: torch.Tensor
    y: torch.Tensor


def load_train_val(
    data_dir: Path, dataset: str, val_split: float, seed: int, device: torch.device
) -> tuple[Tensors, Tensors]:
    """The 60k training images once, normalised, on ``device``, cut by the seeded 80/20 split."""
    split = load_split(data_dir, train=True)
    x = normalise(split.images, dataset).to(device)
    y = split.labels.to(device)
    train_idx, val_idx = split_indices(len(y), val_split, seed)
    train_idx, val_idx = train_idx.to(device), val_idx.to(device)
    return Tensors(x[train_idx], y[train_idx]), Tensors(x[val_idx], y[val_idx])


def prepare_model(net: nn.Module, device: torch.device) -> nn.Module:
    return net.to(device, memory_format=memory_format(device))


@torch.no_grad()
def predict_log_probs(model: nn.Module, x: torch.Tensor, batch_size: int, precision: str = "fp32") -> torch.Tensor:
    """Log-probabilities (N, 10) in float32, in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    layout_of_batches = memory_format(x.device)
    outputs = []
    with autocast(x.device, precision):
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size].contiguous(memory_format=layout_of_batches)
            outputs.append(model(batch).float())
    model.train(was_training)
    if not outputs:  # a rank's share of a tiny validation set can be empty
        return torch.empty((0, NUM_CLASSES), device=x.device)
    return torch.cat(outputs)


def validate(
    model: nn.Module, data: Tensors, batch_size: int, precision: str, world: World = SINGLE
) -> tuple[float, float]:
    """(mean NLL loss, accuracy %) over ``data``; with several processes each scores its share and the
    sums are added up, so every rank sees the same numbers and takes the same early-stopping decision."""
    x, y = data.x[world.rank :: world.size], data.y[world.rank :: world.size]
    log_probs = predict_log_probs(model, x, batch_size, precision)
    sums = torch.stack(
        [
            F.nll_loss(log_probs, y, reduction="sum").double(),
            (log_probs.argmax(dim=1) == y).sum().double(),
            torch.tensor(float(len(y)), dtype=torch.float64, device=y.device),
        ]
    )
    loss_sum, correct, count = all_sum(sums, world).tolist()
    return loss_sum / count, 100.0 * correct / count


def loss_and_accuracy(log_probs: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean NLL loss, accuracy in percent)."""
    loss = F.nll_loss(log_probs, y).item()
    accuracy = 100.0 * (log_probs.argmax(dim=1) == y).float().mean().item()
    return loss, accuracy


# Accuracy moves in steps of one validation image (1/12,000 of 100 at the default split): any gain counts,
# where the loss keeps ReduceLROnPlateau's default relative threshold.
PLATEAU_MODE = {"val_loss": {"mode": "min"}, "val_acc": {"mode": "max", "threshold": 0.0}}


def monitor_value(cfg: TrainConfig, val_loss: float, val_acc: float) -> float:
    """What ``plateau`` follows: the value that keeps weights and stops early (``train.monitor``)."""
    return val_acc if cfg.monitor == "val_acc" else val_loss


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The optimizer and its schedule: ``step`` decays every epoch, ``plateau`` when the monitored
    value (``monitor_value``) stalls for ``lr_patience`` epochs, ``onecycle`` moves every batch."""
    if cfg.optimizer == "adadelta":
        optimizer = torch.optim.Adadelta(model.parameters(), lr=cfg.lr)
    elif cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True)
    if cfg.scheduler == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=cfg.lr_gamma)
    elif cfg.scheduler == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=cfg.lr_gamma, patience=cfg.lr_patience, **PLATEAU_MODE[cfg.monitor]
        )
    elif cfg.scheduler == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            total_steps=cfg.epochs * steps_per_epoch,
            cycle_momentum=cfg.optimizer != "adadelta",  # Adadelta has no momentum to cycle
        )
    else:
        scheduler = None
    return optimizer, scheduler


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
        raise RuntimeError(
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


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` atomically. Serialised in memory first: written straight to a full disk, torch
    fails with an internal assertion ("unexpected pos") instead of the OSError that names the cause."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    layout.write_atomic(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))


def history_csv(history: list[EpochStats]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(asdict(history[0])), lineterminator="\n")
    writer.writeheader()
    for stats in history:
        writer.writerow({k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(stats).items()})
    return buffer.getvalue()


def train(
    params: Params,
    data_dir: Path = layout.DATA_DIR,
    model_dir: Path = layout.MODEL_DIR,
    reports_dir: Path = layout.REPORTS_DIR,
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
    train_data, val_data = load_train_val(
        data_dir, params.data.dataset, params.train.val_split, params.train.seed, device
    )
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
    save_torch(Path(model_dir) / layout.WEIGHTS.name, cpu_state)
    layout.write_text_atomic(Path(reports_dir) / layout.HISTORY.name, history_csv(result.history))
    return result


def write_train_info(result: TrainResult, model_dir: Path, run_id: str | None, cfg: TrainConfig) -> None:
    """``train.json``: the result, the MLflow run, and the split the weights were trained on (evaluate
    refuses another split: its "validation" set would overlap the training data)."""
    info = {k: v for k, v in asdict(result).items() if k != "history"}
    info.update(run_id=run_id, val_split=cfg.val_split, seed=cfg.seed, monitor=cfg.monitor)
    layout.write_text_atomic(Path(model_dir) / layout.TRAIN_INFO.name, json.dumps(info, indent=2) + "\n")
