"""Writing a cache: one unit pack per finished video, then compaction into content-named packs.
``FeatureCache`` is the reader (reader.py) plus this; unit-pack writes live here because they
are what compaction absorbs and, once absorbed, deletes.

Life of an entry:

- ``write`` stores one video as a unit pack named from its id, written under ``.tmp/`` and
  renamed into ``packs/``: a finished video is durable at once and a process killed mid-write
  (kill -9) loses only the video in progress. That makes extraction resumable per video.
- ``close`` of the primary writer compacts: every entry, sorted by id, goes into consecutive
  packs of at most ``videos_per_pack`` videos (and ~256 MB), each named from a hash of its
  content, so the same entries give byte-identical packs whatever order or processes wrote them
  and DVC sees no change; a pack that already exists is kept once its files check out. Then
  cache.json is replaced atomically and absorbed unit packs and obsolete packs are deleted.

Several processes (torchrun ranks) may write different videos into one cache: the primary opens
it first (it alone creates, empties, cleans or repairs a cache), the others open it after it
with ``primary=False``, and the primary closes (compacts) after all the others have closed.

Crash safety is against killed processes: compacted packs and cache.json are fsynced before
anything they replace is deleted; unit packs are not (a power loss may cost the videos written
in the last seconds, as with any page-cached write).
"""

from __future__ import annotations

import hashlib
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


def groups(entries: list[tuple[str, dict[str, Any]]], videos_per_pack: int) -> list[Group]:
    """Consecutive runs of the id-sorted ``entries``: at most ``videos_per_pack`` videos, at
    most PACK_BYTES (a bigger video gets a pack of its own) and one dtype per pack."""
    out: list[Group] = []
    cur: Group = []
    size = 0
    for vid, entry in entries:
        n = nbytes(entry)
        if cur and (
            len(cur) >= videos_per_pack
            or size + n > PACK_BYTES
            or entry["dtype"] != cur[0][1]["dtype"]
        ):
            out.append(cur)
            cur, size = [], 0
        cur.append((vid, entry))
        size += n
    if cur:
        out.append(cur)
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
        """Repack every entry (the latest version of each video) into content-named packs of at
        most ``videos_per_pack`` videos, then list them in cache.json and delete the rest.

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
