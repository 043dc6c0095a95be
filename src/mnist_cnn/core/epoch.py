"""One epoch of training: the batches in a seeded order, each one augmented, stepped and counted."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from mnist_cnn.core.augment import Distortions, random_distort
from mnist_cnn.core.data import Tensors
from mnist_cnn.core.distributed import all_sum, shard
from mnist_cnn.core.params import TrainConfig
from mnist_cnn.core.runtime import autocast, memory_format
from mnist_cnn.core.world import SINGLE, World


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
