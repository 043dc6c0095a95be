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
