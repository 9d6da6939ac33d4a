"""Cohort-scale inference over several processes and machines: ``torchrun ... -m flare_c2f_extensions segment``.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set), each rank takes a deterministic share of the cases
(:meth:`Ranks.shard`: sorted by output path, dealt round-robin, so every case goes to exactly one rank on every
rerun), runs on its own device (GPU ``LOCAL_RANK``, or on CPUs its share of the machine's cores) and skips cases
whose outputs exist (so a killed run resumes). At the end every rank hands its part of the run report to rank 0
(:meth:`Ranks.gather`, a ``torch.distributed`` gather after which rank 0 merges): one report for the whole run.

Only small Python objects cross ranks (no tensors), so the process group is gloo on CPUs and GPUs alike; its timeout
(``FLARE_C2F_DIST_TIMEOUT_H`` hours, default 24) must outlast the slowest rank's share of the cases. Without
``torchrun`` (``WORLD_SIZE`` unset or 1) nothing here changes anything.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Ranks", "available_cores"]


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks: global ``rank`` of ``world_size``, ``local_rank`` of ``local_world_size``
    on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> Ranks:
        """What ``torchrun`` set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``); else one rank."""
        env = os.environ
        world = int(env.get("WORLD_SIZE", 1))
        local = int(env.get("LOCAL_WORLD_SIZE", world))
        return cls(int(env.get("RANK", 0)), world, int(env.get("LOCAL_RANK", 0)), local)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence, key: Callable = str) -> list:
        """This rank's share of ``items``: distinct keys sorted and dealt round-robin, items with one key kept
        together (two inputs that would write one output stay on one rank, which then refuses the second)."""
        keys = sorted({key(item) for item in items})
        mine = set(keys[self.rank :: self.world_size])
        return [item for item in items if key(item) in mine]

    def device(self, requested=None):
        """The device of this rank: as ``requested`` (a bare ``cuda`` becomes ``cuda:LOCAL_RANK``), else
        ``cuda:LOCAL_RANK`` where CUDA is available, else the CPU. One rank: ``requested`` as it is."""
        import torch

        if not self.distributed:
            return requested
        if requested is None:
            return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        return f"cuda:{self.local_rank}" if str(requested) == "cuda" else requested

    def threads(self, requested=None, device=None):
        """Torch threads of this rank on a CPU device: ``requested``, else its share of the machine's cores."""
        if requested is not None or not self.distributed or (device is not None and str(device) != "cpu"):
            return requested
        cores = available_cores()
        return max(1, cores // self.local_world_size)

    def start(self) -> None:
        """Join the process group (gloo) when there are several ranks and no group exists yet."""
        import torch.distributed as dist

        if self.distributed and not dist.is_initialized():
            hours = float(os.environ.get("FLARE_C2F_DIST_TIMEOUT_H", 24))
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=hours))

    def gather(self, part):
        """Every rank's ``part`` as a list on rank 0 (``None`` on the others); ``[part]`` for one rank. A barrier:
        rank 0 returns only when every rank has handed its part in."""
        import torch.distributed as dist

        if not self.distributed:
            return [part]
        parts = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(part, parts, dst=0)
        return parts

    def stop(self) -> None:
        import torch.distributed as dist

        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
