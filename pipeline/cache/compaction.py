"""Writing a cache: one unit pack per finished video, then compaction into content-named packs.
``FeatureCache`` is the reader (reader.py) plus this; unit-pack writes live here because they
are what compaction absorbs and, once absorbed, deletes.

Life of an entry:

- ``write`` stores one video as a unit pack named from its id, written under ``.tmp/`` and
  renamed into ``packs/``: a finished video is durable at once and a process killed mid-write
  (kill -9) loses only the video in progress. That makes extraction resumable per video.
- ``close`` of the primary writer compacts: every entry, sorted by id, goes into consecutive
  packs (``groups``), each named from a hash of its content; a pack that already exists is kept
  once its files check out. Then cache.json is replaced atomically and absorbed unit packs and
  obsolete packs are deleted.

Where packs begin (``groups``): content-defined boundaries. A pack starts before a video whose
id's blake2b hash (``id_hash``; stable across machines and runs, unlike ``hash()``) falls in
the lowest 1/``videos_per_pack`` of its range, and before a change of dtype (one dtype per
pack). A run between two boundaries that breaks a hard limit (more than MAX_PACK_FACTOR *
``videos_per_pack`` videos, or more than PACK_BYTES) is cut into parts from its start, each
cut before the id of least hash among those that leave the part between half full and full
(``cut_run``). Why: the rule before (runs of exactly ``videos_per_pack`` from the first id)
made every boundary depend on every id before it, so adding one video that sorts first
rewrote every pack, and DVC re-hashed and re-pushed the whole cache (UCF101: 209 packs, GBs). Here a boundary depends on the id it stands before (and on its neighbours' dtypes), so:

- history-independent: ``groups`` is a function of the set of entries, whatever order or
  processes wrote them; the same entries give byte-identical packs and DVC sees no change.
- local: adding, changing or removing a video rewrites only pack(s) of its run, which ends at
  the next content boundary; a removed or added boundary id merges or splits the two runs it
  separates. Within a run cut by a limit, the cuts after the edit fall on the same ids again
  within a part or two (each cut depends on the ids of one part's span). Every other pack
  keeps its bytes. bench/bench_compaction.py, on the 13,320 UCF101 ids: adding a video that
  sorts first rewrote 1 pack of 203 (0.06 of 8.8 MB), where the rule before rewrote all 209
  (9.6 MB); at flow size (21.8 MB a video, so PACK_BYTES ends packs) one video added at a
  random place replaced 1.7 packs on average (at most 11) of 1,452, against 516 of 1,110.
- sizes: run lengths are geometric with mean ``videos_per_pack``, cut at MAX_PACK_FACTOR times
  it. On the 13,320 UCF101 split-1 ids with ``videos_per_pack`` 64 (and no byte limit
  reached): 203 packs (the rule before: 209), 65.6 videos on average, 1 to 227; 43 packs
  hold fewer than 16, 29 more than 128. Small packs cost DVC a file each, no more; the count
  stays what it was.

Where PACK_BYTES ends packs (flow of UCF101 at 256 px) the parts are 3/4 full on average, so
a cache has more packs than packing them full (flow-sized UCF101: 1,452 against 1,110, 1.3x);
splitting an overflowing run in two at its least hash, again until the parts fit, made 1.8x
(uneven halves; measured at 25 MB a video).

The pack and cache.json formats are unchanged (FORMAT stays 2): which videos share a pack is
not part of the format, and a cache grouped by the rule before is read as it is; its next
compaction regroups it, rewriting its packs once.

Several processes (torchrun ranks) may write different videos into one cache: the primary opens
it first (it alone creates, empties, cleans or repairs a cache), the others open it after it
with ``primary=False``, and the primary closes (compacts) after all the others have closed.

Crash safety is against killed processes: compacted packs and cache.json are fsynced before
anything they replace is deleted; unit packs are not (a power loss may cost the videos written
in the last seconds, as with any page-cached write).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.files import fsync_one, remove
from pipeline.cache.layout import (
    DOC,
    PACK_BYTES,
    PACKS,
    TMP,
    UNIT,
    CacheError,
    Damaged,
    Group,
    Mode,
    Stale,
    compact_name,
    ids_text,
    nbytes,
    norm,
    unit_name,
    valid_id,
    write_doc,
)
from pipeline.cache.reader import CacheReader
from pipeline.cache.storage import write_pack

log = logging.getLogger(__name__)


# A pack holds at most this many times ``videos_per_pack`` videos: the cap that splits a long
# run of ids without a content boundary (with 4, 1.8% of the runs, e^-4, are split).
MAX_PACK_FACTOR = 4


def id_hash(video_id: str) -> int:
    """A stable 64-bit hash of ``video_id`` (blake2b of its UTF-8 bytes, big-endian): the same
    on every machine and Python run, unlike ``hash()``, which is salted per process."""
    return int.from_bytes(hashlib.blake2b(video_id.encode(), digest_size=8).digest(), "big")


def starts_pack(video_id: str, videos_per_pack: int) -> bool:
    """Whether a content boundary falls before ``video_id``: its hash is in the lowest
    1/``videos_per_pack`` of the range, so packs hold ``videos_per_pack`` videos on average and
    the decision depends on this id alone (always true for ``videos_per_pack`` 1)."""
    return id_hash(video_id) < (1 << 64) // videos_per_pack


def groups(entries: list[tuple[str, dict[str, Any]]], videos_per_pack: int) -> list[Group]:
    """The id-sorted ``entries`` as consecutive packs with content-defined boundaries (see the
    module docstring): a run starts before an id that ``starts_pack`` and before a change of
    dtype; a run over a hard limit (MAX_PACK_FACTOR * ``videos_per_pack`` videos, PACK_BYTES)
    is cut by ``cut_run``. A video over PACK_BYTES gets a pack of its own. A pure function of
    the entries: the same entries always give the same groups."""
    runs: list[Group] = []
    for vid, entry in entries:
        if (
            not runs
            or entry["dtype"] != runs[-1][-1][1]["dtype"]
            or starts_pack(vid, videos_per_pack)
        ):
            runs.append([])
        runs[-1].append((vid, entry))
    return [part for run in runs for part in cut_run(run, MAX_PACK_FACTOR * videos_per_pack)]


def cut_run(run: Group, max_videos: int) -> list[Group]:
    """``run`` as parts of at most ``max_videos`` videos and PACK_BYTES (or one video), cut one
    after another from its start, each before the id of least ``id_hash`` among the cuts that
    leave the part at least half full (half the videos or half the bytes) and within the
    limits. A run within them is one part."""
    sizes = list(itertools.accumulate((nbytes(e) for _, e in run), initial=0))
    keys = [(id_hash(v), v) for v, _ in run]

    def fits(lo: int, hi: int) -> bool:
        return hi - lo == 1 or (hi - lo <= max_videos and sizes[hi] - sizes[lo] <= PACK_BYTES)

    out: list[Group] = []
    lo = 0
    while not fits(lo, len(run)):
        hi = lo + 1
        while fits(lo, hi + 1):
            hi += 1  # [lo, hi): the longest part that fits (hi < len(run))
        first = lo + 1
        while (
            first < hi
            and 2 * (first - lo) < max_videos
            and 2 * (sizes[first] - sizes[lo]) < PACK_BYTES
        ):
            first += 1  # the first cut that leaves the part half full
        # The least hash, not the longest part: a cut that depends on the ids around it, so
        # after an edit earlier in the run the cuts fall on the same ids again within a part
        # or two. Cutting at the half-full mark or later keeps the packs full (3/4 on
        # average): cutting at the least hash of the whole part made 1.8x as many packs.
        cut = min(range(first, hi + 1), key=keys.__getitem__)
        out.append(run[lo:cut])
        lo = cut
    out.append(run[lo:])
    return out


class FeatureCache(CacheReader):
    """Per-video arrays (any shape of >= 1 dimension, numeric dtype) plus cache-level metadata.
    Use ``open_cache``, not this constructor.

    Picklable: a cache opened in a parent process can be handed to spawned or forked workers,
    each of which opens (and checks) the pack files it reads itself.
    """

    def __init__(
        self, root: Path, mode: Mode, *, videos_per_pack: int = 64, primary: bool = True
    ) -> None:
        super().__init__(root, mode, videos_per_pack=videos_per_pack, primary=primary)
        self._closed = False
        self._retain: set[str] | None = None  # set by retain(): the videos compaction keeps

    def _check_writable(self) -> None:
        if self.mode == "r":
            raise CacheError(f"{self.root}: opened read-only")
        if self._closed:
            raise CacheError(f"{self.root}: cache is closed")

    def _write_pack(
        self, name: str, flat: np.ndarray, videos: dict[str, Any], *, durable: bool
    ) -> None:
        """storage.write_pack into this cache; a damaged pack of that name is replaced."""
        write_pack(self.root, self._storage, name, flat, videos, durable=durable)
        self._damaged.pop(name, None)  # replaced by a sound one

    def write(
        self, video_id: str, array: np.ndarray, meta: Mapping[str, Any] | None = None
    ) -> None:
        """Store ``array`` (any shape of at least one dimension, numeric dtype; kept as given,
        in native byte order) for ``video_id``, replacing an older one. Durable on return."""
        self._check_writable()
        if not valid_id(video_id):
            raise CacheError(f"{self.root}: invalid video id {video_id!r}")
        array = np.asarray(array)
        if array.ndim == 0:
            raise CacheError(
                f"{self.root}: '{video_id}': a 0-d array is not a feature; give (T, ...)"
            )
        if array.dtype.kind not in "biufc":
            raise CacheError(
                f"{self.root}: '{video_id}': cannot store dtype {array.dtype}; give a numeric array"
            )
        flat = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")).reshape(-1)
        entry = {
            "offset": 0,
            "shape": list(array.shape),
            "dtype": flat.dtype.str,
            "digest": hashlib.sha1(flat.view(np.uint8)).hexdigest(),
            "meta": norm(meta or {}),
        }
        name = unit_name(video_id)
        self._forget(name)
        self._write_pack(name, flat, {video_id: entry}, durable=False)
        entry = norm(entry)
        self._units[name] = {video_id: entry}
        self._index[video_id] = (name, entry)
        self._dropped.pop(video_id, None)

    def _write_groups(self, todo: list[Group]) -> tuple[list[str], int]:
        """Make sure each group is a pack -> (names, packs written). An existing pack of the
        name is kept once its files check out; the entries of a new one are read with their
        sha1 checked, so no damaged entry is copied. Damaged when one is."""
        names: list[str] = []
        written = 0
        for group in todo:
            name = compact_name(group, self._storage.codec)
            names.append(name)
            if self._pack_path(name).exists() and name not in self._damaged:
                try:
                    self._open(name)  # checked once per process: free after a verified resume
                    continue
                except (Damaged, Stale):
                    pass  # rewritten below, from wherever its entries are now
            dtype = np.dtype(group[0][1]["dtype"])
            flat = np.empty(sum(math.prod(e["shape"]) for _, e in group), dtype)
            videos, offset = {}, 0
            for vid, entry in group:
                n = math.prod(entry["shape"])
                flat[offset : offset + n] = self._read(vid, verify=True).reshape(-1)
                videos[vid] = {**entry, "offset": offset}
                offset += n
            self._forget(name)
            self._write_pack(name, flat, videos, durable=True)
            written += 1
        return names, written

    def retain(self, video_ids: Iterable[str]) -> None:
        """Keep only ``video_ids`` at the next compaction; entries of other videos (left by a
        manifest or plan that no longer lists them) are dropped then. Without it a persisted
        cache keeps every video it ever held, and a stage reading its keys (features of the
        flow cache) would compute videos that are no longer planned. Primary writer only."""
        self._check_writable()
        if not self.primary:
            raise CacheError(f"{self.root}: only the primary writer decides what a cache keeps")
        self._retain = set(video_ids)

    def compact(self) -> None:
        """Repack every entry (the latest version of each video) into content-named packs
        (``groups``: ``videos_per_pack`` videos on average, boundaries set by the ids, so a
        pack whose videos did not change is kept as it is), then list them in cache.json and
        delete the rest.

        Primary writer only, and only once no other process writes: a unit pack another process
        writes meanwhile is kept (never deleted unless absorbed), but may be left unabsorbed.
        A damaged entry found here is left out (with the other videos of its pack) and, once
        the rest is compacted, reported as a CacheError: the stage fails, and its next run
        recomputes those videos, rather than a cache missing them being recorded as complete.
        """
        self._check_writable()
        if not self.primary:
            raise CacheError(f"{self.root}: only the primary writer compacts")
        t0 = time.perf_counter()
        before = dict(self._dropped)
        self._refresh()  # other processes' unit packs too
        while True:
            absorbed = {name: dict(videos) for name, videos in self._units.items()}
            kept = sorted(
                (v, e)
                for v, (_, e) in self._index.items()
                if self._retain is None or v in self._retain
            )
            if len(kept) < len(self._index):
                log.info(
                    "%s: dropping %d videos no longer planned",
                    self.root,
                    len(self._index) - len(kept),
                )
            todo = groups(kept, self.videos_per_pack)
            try:
                names, written = self._write_groups(todo)
                break
            except Damaged as e:
                if not self._drop({e.video or e.pack: e}):  # nothing left out: no progress
                    raise CacheError(f"{e.message()}; compaction cannot go on") from None
        if names != self._listed:
            fsync_one(self.root / PACKS)  # the renames above, before cache.json points at them
            by_name = {n: [v for v, _ in g] for n, g in zip(names, todo, strict=True)}
            write_doc(self.root, self._doc([{"name": n, "videos": by_name[n]} for n in names]))
        keep = set(names)
        removed = 0
        for e in os.scandir(self.root / PACKS):
            if not e.name.endswith(self._storage.suffix):
                continue  # not ours to judge (cleaned on open by the primary)
            name = e.name[: -len(self._storage.suffix)]
            if name in keep:
                continue
            if name.startswith(UNIT):
                # Delete a unit pack only if what it holds now is what went into the packs.
                try:
                    now = self._videos(name)
                except (FileNotFoundError, Damaged):
                    continue
                if absorbed.get(name) != now:
                    continue
            self._forget(name)
            remove(Path(e.path))
            removed += 1
        self._refresh()
        log.info(
            "%s: compacted %d videos into %d packs (%d written, %d files removed) in %.1f s",
            self.root,
            len(self._index),
            len(names),
            written,
            removed,
            time.perf_counter() - t0,
        )
        lost = {v: why for v, why in self._dropped.items() if v not in before}
        lost = {v: why for v, why in lost.items() if v not in self._index}
        if lost:
            first = next(iter(lost.values()))
            raise CacheError(
                f"{self.root}: damaged entries found while compacting were left out "
                f"({first}; {ids_text(lost)}); re-run the stage to recompute them"
            )

    def _clean(self) -> None:
        """Remove what killed processes left: .tmp/, cache.json's temporary files and packs that
        are neither listed nor unit packs (a compaction killed before it wrote cache.json).
        Primary only, on open."""
        remove(self.root / TMP)
        for p in self.root.glob(f"{DOC}.*.tmp"):
            log.info("%s: removing %s left by an interrupted run", self.root, p.name)
            p.unlink(missing_ok=True)
        keep = set(self._listed)
        for e in os.scandir(self.root / PACKS):
            name, suffix = os.path.splitext(e.name)
            if suffix == self._storage.suffix and (name in keep or name.startswith(UNIT)):
                continue
            log.info("%s: removing %s left by an interrupted run", self.root, e.name)
            remove(Path(e.path))

    def close(self, *, compact: bool = True) -> None:
        """Close this process's open packs. The primary writer first compacts (unless
        ``compact=False``) and removes the empty .tmp/; other writers never touch shared state."""
        if self._closed:
            return
        try:
            if self.mode != "r" and self.primary and compact:
                self.compact()
        finally:
            if self.mode != "r" and self.primary:  # also when compaction failed (full disk)
                try:
                    (self.root / TMP).rmdir()
                except OSError:  # absent, or holds another process's write in progress
                    pass
            self._drop_state()
            self._closed = True

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # On an error (or Ctrl-C) skip compaction: the finished videos are durable as unit
        # packs already, and the next run compacts them.
        self.close(compact=exc_type is None)
