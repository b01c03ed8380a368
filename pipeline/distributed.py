"""Sharding a stage over processes and machines started by ``torchrun``.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for every process; without them (plain
``python -m stages.features``) the world is one process and nothing here talks to anyone.
Each rank takes every WORLD_SIZE-th video of the sorted list, writes its own videos into the
shared cache (per-video files: no two ranks write the same file), and rank 0 finishes the cache
(compaction, failures file, counts) after a barrier. Rank 0 alone checks the entries a resumed
run keeps and tells the others which they are, so every rank shards the same list.
``sharded_run`` is that protocol, as the flow and features stages both use it.

"Shared" is proved, not assumed: each rank opens the output at the path given on its own
machine, and on machines without a shared filesystem a rank that finds a cache of the same
settings there (an earlier run, a ``dvc pull``) would write its videos into that copy and exit 0
while rank 0's cache lacks them. So before any video ``check_shared_dir`` (pipeline/world.py) has
every rank read a token rank 0 just wrote, and after the run rank 0 checks that every video assigned to any rank
is in its cache or recorded as failed (``check_arrived``); either stops every rank with a
``SharedDirError``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import CacheError, FeatureCache, open_cache
from pipeline.config import CacheConfig
from pipeline.runner import Counts, Failure, finish
from pipeline.world import SHARED_HINT, SharedDirError, World, check_shared_dir, close_world

log = logging.getLogger(__name__)


def check_arrived(
    path: Path,
    assigned: Sequence[Sequence[str]],
    *,
    sources: Mapping[str, str],
    failed: Collection[str],
) -> None:
    """Check that every video ``assigned`` to a rank (``assigned[r]``: rank r's todo) is in the
    cache at ``path``, computed from ``sources[id]``, or is among the ``failed`` ids; raise a
    SharedDirError naming how many are missing, the first few and the ranks that computed
    them. Run by rank 0 once every rank has written and the cache is compacted: a rank whose
    writes went to another directory has sent its counts, but not its videos."""
    rank_of = {v: r for r, ids in enumerate(assigned) for v in ids}
    want = {v: sources[v] for v in rank_of if v not in failed}
    # Listed with the source it was computed from, in packs whose headers check out on open.
    # The entries are not read again: compaction read each new one with its sha1 checked.
    with open_cache(path, "r") as c:
        missing = sorted(set(want) - c.up_to_date(want))
    if missing:
        ranks = sorted({rank_of[v] for v in missing})
        first = ", ".join(f"{v} (rank {rank_of[v]})" for v in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        # rank 0 writes into this cache itself: its videos missing is a stage that neither
        # wrote nor failed them, not a filesystem that is not shared
        why = (
            f"they were written where rank 0 does not see them: {SHARED_HINT}"
            if ranks != [0]
            else "the stage neither wrote them nor recorded them as failed"
        )
        raise SharedDirError(
            f"{path}: {len(missing)} of the {len(rank_of)} videos computed by rank(s) "
            f"{', '.join(map(str, ranks))} are neither in the cache nor recorded as failed: "
            f"{first}{more}; {why}"
        )


def open_shared_cache(
    world: World, path: Path, *, sources: Mapping[str, str], **kw: Any
) -> tuple[FeatureCache, set[str]]:
    """Open the cache every rank writes into -> (cache, ids already done).

    ``sources``: {video id: fingerprint of its input}. A video is done when its entry was
    computed from that input and reads back sound: the primary opens first (it alone may start
    the cache over, clean a killed run's leftovers or drop damaged packs), reads every entry it
    would keep with its digest checked (``up_to_date(verify=True)``; a damaged one is logged,
    naming the video and the file, and recomputed), then sends the done ids to the others.
    Every rank then proves it sees the primary's cache at its own ``path``
    (``check_shared_dir``: a SharedDirError on every rank otherwise, before any rank opens a
    cache of its own machine), and the others open it. Videos not in ``sources`` are dropped
    when the primary compacts (``FeatureCache.retain``)."""
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
    try:
        check_shared_dir(world, path)
    except BaseException:
        if cache is not None:
            cache.close(compact=False)  # left as it is, for the next run
        raise
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
    (``open_shared_cache``, which proves every rank sees it; ``ids`` in the order they are
    computed, ``sources`` their input fingerprints), give this rank its share of the videos not
    done, and after the body gather every rank's failures and counts, leave the cache (the
    primary compacts it, now that every rank's videos are in), check that every rank's videos
    arrived (``check_arrived``: a SharedDirError on every rank otherwise) and close the world.
    On an exception the cache is left as it is, for the resume, and the exception goes on."""
    cache, done = open_shared_cache(
        world,
        path,
        sources=sources,
        attrs=attrs,
        backend=cache_cfg.backend,
        videos_per_pack=cache_cfg.videos_per_pack,
    )
    rest = [k for k in ids if k not in done]
    with cache:
        run = ShardedRun(world, cache, done, world.shard(rest))
        yield run
        run.failures, run.written = collect(world, run.failures, run.written)
        verdict: tuple[str, str] | None = None
        if world.primary:
            try:
                cache.close()  # compacts: every rank has written (collect)
                assigned = [World(rank=r, size=world.size).shard(rest) for r in range(world.size)]
                failed = {f.video_id for f in run.failures}
                check_arrived(path, assigned, sources=sources, failed=failed)
            except SharedDirError as e:
                verdict = ("missing", str(e))
            except BaseException as e:
                # the others wait for the verdict below: tell them rather than leave them waiting
                world.broadcast(("failed", f"rank 0 could not finish {path}: {e}"))
                raise
        verdict = world.broadcast(verdict)
        if verdict is not None:
            kind, message = verdict
            raise SharedDirError(message) if kind == "missing" else CacheError(message)
    close_world(world)
