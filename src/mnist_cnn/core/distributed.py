"""Data-parallel training across processes: the world torchrun describes (launching it: ops/torchrun.py).

torchrun (``torch.distributed.run``) starts the processes and sets RANK, WORLD_SIZE and LOCAL_RANK;
this module only reads them, joins the process group and sums (or shares) values across it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from mnist_cnn.core.errors import ProjectError, register_user_facing
from mnist_cnn.core.world import World

# A peer that died or a rendezvous that failed is a message for the user, not a bug of ours.
register_user_facing(dist.DistError)

# What Gloo raises (a plain RuntimeError, with a 300-character text and a traceback) in a collective
# when another rank died: torchrun reports which one; this rank says only that it lost it.
PEER_LOST = re.compile(r"Connection (?:reset|closed) by peer|Broken pipe|Connection refused")


class PeerLost(ProjectError, RuntimeError):
    """Another process of the training died mid-collective."""


def device_for(world: World, device: torch.device) -> torch.device:
    """One GPU per process: LOCAL_RANK picks it."""
    if world.distributed and device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return device


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the group (NCCL on GPUs, Gloo on CPUs) for the block; nothing to do for one process."""
    if not world.distributed:
        yield
        return
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    except RuntimeError as exc:
        lost = PEER_LOST.search(str(exc))
        if lost is None:
            raise
        raise PeerLost(f"rank {world.rank}: another rank of this training is gone (Gloo: {lost.group(0)})") from None
    finally:
        dist.destroy_process_group()


def all_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """``values`` summed over every process (in place); unchanged for one process."""
    if world.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def from_main(value: Any, world: World) -> Any:
    """Rank 0's ``value``, on every rank (a picklable object); unchanged for one process."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(value: Any, world: World) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (a picklable object)."""
    if not world.distributed:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def shard_size(n: int, world: World) -> int:
    """How many of ``n`` samples each rank takes: the same number on every rank (DDP hangs otherwise)."""
    return n // world.size


def shard(order: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's share of an epoch's permutation: every ``size``-th index from ``rank``, cut to
    ``shard_size`` so that all ranks take the same number of steps."""
    if not world.distributed:
        return order
    return order[world.rank : shard_size(len(order), world) * world.size : world.size]
