"""Which process of a data-parallel training this is: the world torchrun describes in the environment
(RANK, WORLD_SIZE, LOCAL_RANK). Apart from ``distributed`` so that what only asks "am I under torchrun?"
(the signal semantics, the command line) does not import torch."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs to MLflow and writes models/ and reports/."""
        return self.rank == 0


SINGLE = World()


def from_env() -> World:
    """The world torchrun set up for this process (a single process when not under torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def under_torchrun() -> bool:
    return from_env().distributed
