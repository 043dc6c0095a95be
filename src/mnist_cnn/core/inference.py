"""Batched prediction and the loss and accuracy of a model on tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnist_cnn.core.data import Tensors
from mnist_cnn.core.distributed import all_sum
from mnist_cnn.core.model import NUM_CLASSES
from mnist_cnn.core.runtime import autocast, memory_format
from mnist_cnn.core.world import SINGLE, World


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
