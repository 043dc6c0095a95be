"""The optimizer and learning-rate schedule a training config names."""

from __future__ import annotations

import torch
from torch import nn

from mnist_cnn.core.params import TrainConfig

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
    value (``monitor_value``) stalls for ``train.scheduler.patience`` epochs, ``onecycle`` moves every batch."""
    chosen, schedule = cfg.optimizer, cfg.scheduler
    if chosen.name == "adadelta":
        optimizer = torch.optim.Adadelta(model.parameters(), lr=cfg.lr)
    elif chosen.name == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=chosen.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True)
    if schedule.name == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=schedule.gamma)
    elif schedule.name == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=schedule.gamma, patience=schedule.patience, **PLATEAU_MODE[cfg.monitor]
        )
    elif schedule.name == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            total_steps=cfg.epochs * steps_per_epoch,
            cycle_momentum=chosen.name != "adadelta",  # Adadelta has no momentum to cycle
        )
    else:
        scheduler = None
    return optimizer, scheduler
