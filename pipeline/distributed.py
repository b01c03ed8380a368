"""Sharding a stage over processes and machines started by ``torchrun``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for every process; without them (plain
``python -m stages.features``) the world is one process and nothing here talks to anyone.
Each rank takes every WORLD_SIZE-th video of the sorted list, writes its own videos into the
shared cache (per-video files: no two ranks write the same file), and rank 0 finishes the cache
(compaction, failures file, counts) after a barrier. Rank 0 alone checks the entries a resumed
run keeps and tells the others which they are, so every rank shards the same list.
``sharded_run`` is that protocol, as the flow and features stages both use it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from pipeline.cache import CacheError, FeatureCache, open_cache
from pipeline.config import CacheConfig
from pipeline.runner import Counts, Failure, finish

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

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a collective: every rank waits for rank 0)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

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


def open_shared_cache(
    world: World, path: Path, *, sources: Mapping[str, str], **kw: Any
) -> tuple[FeatureCache, set[str]]:
    """Open the cache every rank writes into -> (cache, ids already done).

    ``sources``: {video id: fingerprint of its input}. A video is done when its entry was
    computed from that input and reads back sound: the primary opens first (it alone may start
    the cache over, clean a killed run's leftovers or drop damaged packs), reads every entry it
    would keep with its digest checked (``up_to_date(verify=True)``; a damaged one is logged,
    naming the video and the file, and recomputed), then sends the done ids to the others,
    which open the cache after it. Videos not in ``sources`` are dropped when the primary
    compacts (``FeatureCache.retain``)."""
    done: set[str] = set()
    cache = None
    if world.primary:
        try:
            cache = open_cache(path, "a", primary=True, **kw)
            cache.retain(sources)  # videos no longer planned leave the cache at compaction
            done = cache.up_to_date(sources, verify=True)
        except BaseException as e:
            # The other ranks wait in the broadcast below: tell them, rather than leave them
            # waiting for days (TIMEOUT).
            world.broadcast(f"rank 0 could not open {path}: {e}")
            raise
    got = world.broadcast(done)
    if isinstance(got, str):
        raise CacheError(got)
    if cache is None:
        cache = open_cache(path, "a", primary=False, **kw)
    return cache, got


def collect(world: World, failures: list[Any], written: int) -> tuple[list[Any], int]:
    """Every rank's failures and written count (a collective: all ranks have finished writing
    when it returns, so the primary may compact)."""
    return [f for part in world.gather(failures) for f in part], sum(world.gather(written))


@dataclass
class ShardedRun:
    """This rank's part of a per-video stage that writes a cache shared by every rank.

    ``todo``: this rank's share of the videos not ``done`` (kept from an earlier run). The
    stage computes each of them and calls ``write`` or ``fail``; after the run, ``failures`` and
    ``written`` are every rank's (``collect``)."""

    world: World
    cache: FeatureCache
    done: set[str]
    todo: list[str]
    failures: list[Failure] = field(default_factory=list)
    written: int = 0

    def write(self, video_id: str, entry: np.ndarray, meta: dict) -> None:
        # a failed write (full disk: CacheError naming the file) stops the stage: the videos
        # after it could not be stored either; those written stay, for the resume
        self.cache.write(video_id, entry, meta)
        self.written += 1

    def fail(self, failure: Failure) -> None:
        self.failures.append(failure)

    def finish(self, stage: str, failures_file: Path) -> Counts:
        """The stage's counts; the primary alone writes ``failures_file`` (every rank's
        failures) and stops the stage when no video succeeded (runner.finish)."""
        if not self.world.primary:
            return Counts(done=self.written, skipped=len(self.done), failed=len(self.failures))
        return finish(
            stage, failures_file, self.failures, done=self.written, skipped=len(self.done)
        )


@contextlib.contextmanager
def sharded_run(
    world: World,
    path: Path,
    *,
    ids: Sequence[str],
    sources: Mapping[str, str],
    attrs: dict,
    cache_cfg: CacheConfig,
) -> Iterator[ShardedRun]:
    """The protocol the flow and features stages share: open the shared cache at ``path``
    (``open_shared_cache``; ``ids`` in the order they are computed, ``sources`` their input
    fingerprints), give this rank its share of the videos not done, and after the body gather
    every rank's failures and counts, leave the cache (the primary compacts it, now that every
    rank's videos are in) and close the world. On an exception the cache is left as it is,
    for the resume, and the exception goes on."""
    cache, done = open_shared_cache(
        world,
        path,
        sources=sources,
        attrs=attrs,
        backend=cache_cfg.backend,
        videos_per_pack=cache_cfg.videos_per_pack,
    )
    with cache:
        run = ShardedRun(world, cache, done, world.shard([k for k in ids if k not in done]))
        yield run
        run.failures, run.written = collect(world, run.failures, run.written)
    close_world(world)
