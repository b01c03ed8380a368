"""Sharding a stage over processes and machines started by ``torchrun``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for every process; without them (plain
``python -m stages.features``) the world is one process and nothing here talks to anyone.
Each rank takes every WORLD_SIZE-th video of the sorted list, writes its own videos into the
shared cache (per-video files: no two ranks write the same file), and rank 0 finishes the cache
(compaction, failures file, counts) after a barrier.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pipeline.cache import FeatureCache, open_cache

T = TypeVar("T")

# A barrier waits for the slowest rank to finish its whole shard, which can take hours on a
# large dataset; the default 30-minute collective timeout would kill a healthy run.
TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # ranks on this machine, which share its cores

    @property
    def primary(self) -> bool:
        return self.rank == 0

    def cores(self, n: int) -> int:
        """``n`` workers or threads, where 0 means this rank's share of the machine's cores."""
        return n if n > 0 else max((os.cpu_count() or 1) // self.local_size, 1)

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every size-th item from position rank."""
        return list(items[self.rank :: self.size])

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (a list of one without torchrun)."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def init_world(device: torch.device) -> World:
    """The torchrun world from the environment, with its process group started (gloo on CPU,
    nccl on CUDA, where each process takes GPU LOCAL_RANK)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return World(rank=rank, size=size, local_rank=local, local_size=local_size)


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def open_shared_cache(world: World, path: Path, **kw: Any) -> FeatureCache:
    """Open the cache every rank writes into: the primary first (it alone may start the cache
    over or clean a killed run's leftovers), then, after a barrier, the others."""
    cache = open_cache(path, "a", primary=True, **kw) if world.primary else None
    world.barrier()
    return cache if cache is not None else open_cache(path, "a", primary=False, **kw)


def collect(world: World, failures: list[Any], written: int) -> tuple[list[Any], int]:
    """Every rank's failures and written count (a collective: all ranks have finished writing
    when it returns, so the primary may compact)."""
    return [f for part in world.gather(failures) for f in part], sum(world.gather(written))
