"""Reading entries: pack handles per process, the pack checks on open, a cache of decoded chunks.

Checks: silent wrongness is the failure that matters (a deleted shard read as zeros by Zarr, a
flipped bit read as a slightly different feature), so every byte a reader relies on is checked.

- When a process first reads from a pack, the whole file is read and checked against the size
  and CRC-32C its header records, before zarr or h5py see it (storage.py says why). The check
  makes a sequential read of a whole cache (training) 4-6% slower on Zarr, 0-2% on HDF5
  (bench/bench_cache.py, pooled and conv-map features).
- Each entry's sha1 is checked when asked: ``read(id, verify=True)``, ``verify(ids)`` and
  ``up_to_date(sources, verify=True)``, which the resumed flow and features stages use for the
  entries they keep, and always by compaction for the entries it copies. Not on every read:
  sha1 made that read 22-25% (Zarr) and 7-14% (HDF5) slower.

Open packs, checked files and decoded chunks are kept per process id: after a fork (DataLoader
workers) a child opens its own files and never uses its parent's HDF5 handles, and a cache
pickled to a spawned worker takes no open file with it.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.index import CacheIndex
from pipeline.cache.layout import CacheError, Damaged, Mode, Stale

_OPEN_PACKS = 64  # open packs per process (HDF5 keeps a file descriptor per open pack)
_CACHED_CHUNKS = 16  # decoded chunks kept per process, so reading videos in order decodes once
# Whether a pack's files are checked against their CRC when first read. Only
# bench/bench_cache.py turns it off, to measure what the check costs.
CHECK_FILES = True


@dataclass
class _OpenPack:
    handle: Any
    header: dict[str, Any]
    token: tuple[Any, ...]  # idents of the files checked and opened
    gen: int  # distinguishes a re-opened pack's chunks from the old ones in the chunk cache


@dataclass
class _ProcessState:
    """Open packs, checked files and decoded chunks of one process. Kept per pid: after a fork
    (DataLoader workers) a child must open its own files, never use its parent's HDF5 handles."""

    packs: OrderedDict[str, _OpenPack] = field(default_factory=OrderedDict)
    checked: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # pack -> idents checked
    chunks: OrderedDict[tuple[str, int, int], np.ndarray] = field(default_factory=OrderedDict)
    gen: int = 0


class CacheReader(CacheIndex):
    """A cache index that reads its entries, each pack checked when first opened in a process.

    Picklable: a cache opened in a parent process can be handed to spawned or forked workers,
    each of which opens (and checks) the pack files it reads itself."""

    def __init__(
        self, root: Path, mode: Mode, *, videos_per_pack: int = 64, primary: bool = True
    ) -> None:
        # Before indexing: a damaged pack found then is forgotten by this process (_forget).
        self._by_pid: dict[int, _ProcessState] = {}
        super().__init__(root, mode, videos_per_pack=videos_per_pack, primary=primary)

    # -- per-process open packs and decoded chunks ---------------------------------------------
    def _state(self) -> _ProcessState:
        pid = os.getpid()
        state = self._by_pid.get(pid)
        if state is None:
            # Packs opened by the parent stay in their own entry, untouched: closing an HDF5
            # handle inherited over fork would act on the parent's file state.
            state = self._by_pid[pid] = _ProcessState()
        return state

    def _drop_state(self) -> None:
        state = self._by_pid.pop(os.getpid(), None)
        if state is not None:
            for p in state.packs.values():
                self._storage.close(p.handle)

    def _refresh(self) -> None:
        self._drop_state()
        self._scan()

    def _forget(self, name: str) -> None:
        """Close pack ``name`` in this process and drop its chunks (it is being replaced)."""
        state = self._state()
        state.checked.pop(name, None)
        p = state.packs.pop(name, None)
        if p is not None:
            self._storage.close(p.handle)
            for key in [k for k in state.chunks if k[0] == name]:
                del state.chunks[key]

    def _open(self, name: str) -> _OpenPack:
        """Pack ``name``, open in this process; its files are checked (size and CRC-32C) the
        first time this process opens this version of them. Damaged or Stale."""
        state = self._state()
        p = state.packs.get(name)
        if p is not None:
            state.packs.move_to_end(name)
            return p
        path = self._pack_path(name)
        s = self._storage
        token = None
        try:
            header = self._header(name)
            token = s.idents(path, header)
            if CHECK_FILES and state.checked.get(name) != token:
                s.check(path, header)
                state.checked[name] = token
            handle = s.open(path)
        except FileNotFoundError as e:  # the pack is gone: compacted away meanwhile?
            raise Stale(name) from e
        except (Damaged, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            # Damage, unless the pack was replaced while we read it (another process's
            # compaction or rewrite), so that what we read mixed two versions of it.
            try:
                again = s.idents(path, s.header(path))
            except FileNotFoundError:
                raise Stale(name) from None
            except (Damaged, OSError):
                again = None
            if again is not None and again != token:
                raise Stale(name) from None
            if not isinstance(e, Damaged):
                e = Damaged(s.data_file(path), f"cannot open ({type(e).__name__}: {e})")
            raise self._damage(e, name) from None
        state.gen += 1
        p = state.packs[name] = _OpenPack(handle, header, token, state.gen)
        if not self._unchanged(name, p):  # replaced between the check and the open
            self._forget(name)
            raise Stale(name)
        if len(state.packs) > _OPEN_PACKS:
            _, q = state.packs.popitem(last=False)
            self._storage.close(q.handle)
        return p

    def _unchanged(self, name: str, p: _OpenPack) -> bool:
        try:
            return self._storage.idents(self._pack_path(name), p.header) == p.token
        except (FileNotFoundError, Damaged):
            return False

    def _file_read(self, name: str, p: _OpenPack, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of an open pack, from its file. Checked unchanged before (h5py
        reads through its open handle: a file changed under it is no longer the one checked)
        and after (zarr opens the shard file anew on every read)."""
        if not self._unchanged(name, p):
            raise Stale(name)
        try:
            x = self._storage.read(p.handle, start, stop)
        except (OSError, ValueError, RuntimeError) as e:
            if not self._unchanged(name, p):
                raise Stale(name) from None
            path = self._storage.data_file(self._pack_path(name))
            raise self._damage(Damaged(path, f"{type(e).__name__}: {e}"), name) from None
        if not self._unchanged(name, p):
            raise Stale(name)
        return x

    def _chunk(self, name: str, p: _OpenPack, i: int) -> np.ndarray:
        """Decoded inner chunk ``i`` of an open pack, cached per process."""
        state = self._state()
        key = (name, p.gen, i)
        c = state.chunks.get(key)
        if c is None:
            size = p.header["chunk"]
            c = self._file_read(name, p, i * size, min((i + 1) * size, p.header["size"]))
            state.chunks[key] = c
            if len(state.chunks) > _CACHED_CHUNKS:
                state.chunks.popitem(last=False)
        else:
            state.chunks.move_to_end(key)
        return c

    # -- entries ----------------------------------------------------------------------------
    def _read_once(self, video_id: str, verify: bool) -> np.ndarray:
        name, entry = self._index[video_id]
        p = self._open(name)
        if p.header["videos"].get(video_id) != entry:  # the pack was rewritten since indexed
            raise Stale(name)
        shape, dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
        count, start = math.prod(shape), entry["offset"]
        size = p.header["chunk"]
        if count == 0:
            flat = np.empty(0, dtype)
        elif count >= size:
            # Large video (conv maps, flow): read its range directly, which decodes only the
            # chunks it covers, without filling the chunk cache with chunks read once.
            flat = self._file_read(name, p, start, start + count)
        else:
            # Small video (pooled features): many share a chunk; decode each chunk once.
            first, last = start // size, (start + count - 1) // size
            parts = [self._chunk(name, p, i) for i in range(first, last + 1)]
            lo = start - first * size
            flat = (parts[0] if len(parts) == 1 else np.concatenate(parts))[lo : lo + count]
            flat = flat.copy()  # the caller may modify it; the cached chunk must not change
        if verify and hashlib.sha1(flat.view(np.uint8)).hexdigest() != entry["digest"]:
            path = self._storage.data_file(self._pack_path(name))
            e = Damaged(path, f"video '{video_id}' does not match its stored sha1", video_id)
            raise self._damage(e, name)
        return flat.reshape(shape)

    def _read(self, video_id: str, verify: bool) -> np.ndarray:
        """``read`` that raises Damaged (with the videos affected)."""
        if video_id not in self:
            raise CacheError(f"{self.root}: no entry for video '{video_id}'")
        try:
            return self._read_once(video_id, verify)
        except Stale:
            # Another process compacted or rewrote the pack since we indexed: look again once.
            self._refresh()
            if video_id not in self:
                raise CacheError(f"{self.root}: no entry for video '{video_id}'") from None
            try:
                return self._read_once(video_id, verify)
            except Stale as e:
                raise CacheError(
                    f"{self.root}: '{video_id}' changed while being read ({e}); "
                    "is another process compacting this cache?"
                ) from None

    def read(self, video_id: str, *, verify: bool = False) -> np.ndarray:
        """The array stored for ``video_id``, with its shape and dtype. The pack's files are
        checked when this process first reads from it; ``verify`` also checks the entry's sha1.
        CacheError, naming the file, the reason and the videos, when anything does not match."""
        try:
            return self._read(video_id, verify)
        except Damaged as e:
            raise CacheError(f"{e.message()}; re-run the stage that writes this cache") from None

    def up_to_date(self, sources: Mapping[str, str], *, verify: bool = False) -> set[str]:
        """Ids whose stored entry was computed from ``sources[id]`` (a content fingerprint kept
        in the entry's meta as ``source``). An entry from other input bytes is not up to date.

        ``verify``: also read each of them with every check (``verify``); a damaged one is not
        up to date, and is left out of the cache with a warning naming the video and the file
        (with the other videos of its pack: see pipeline/cache/index.py)."""
        ids = {
            v
            for v, s in sources.items()
            if v in self._index and self._index[v][1]["meta"].get("source") == s
        }
        if verify:
            ids -= self._drop(self._check_entries(ids))
        return ids

    def verify(self, ids: Iterable[str] | None = None) -> dict[str, str]:
        """Read ``ids`` (default: every video) with every check: the pack files against their
        recorded size and CRC-32C, each entry against its sha1 -> {id: what is wrong, naming
        the file} for the damaged ones. Changes nothing."""
        return {v: e.message() for v, e in self._check_entries(ids).items()}

    def _check_entries(self, ids: Iterable[str] | None) -> dict[str, Damaged]:
        todo = sorted(
            (v for v in (self._index if ids is None else ids) if v in self._index),
            key=lambda v: (self._index[v][0], self._index[v][1]["offset"]),  # pack order
        )
        bad: dict[str, Damaged] = {}
        dead: dict[str, Damaged] = {}  # packs whose files failed: one check is enough
        for vid in todo:
            if vid not in self._index:  # left the index when a stale pack was re-indexed
                continue
            name = self._index[vid][0]
            if name in dead:
                bad[vid] = dead[name]
                continue
            try:
                self._read(vid, verify=True)
            except Damaged as e:
                bad[vid] = e
                if e.video is None:
                    dead[name] = e
            except CacheError:
                if vid in self:
                    raise
                # else it vanished meanwhile (another process compacted): not damaged
        return bad

    def _drop(self, bad: Mapping[str, Damaged]) -> set[str]:
        """Leave the packs of the ``bad`` entries out (see ``_mark_damaged``) -> every video
        that went with them."""
        lost: set[str] = set()
        for pack, e in {e.pack: e for e in bad.values()}.items():
            entries = {v for v, d in bad.items() if d.pack == pack and d.video is not None}
            lost |= self._mark_damaged(pack, str(e), e.ids, entries or None)
        return lost

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_by_pid"] = {}  # open files do not travel; the receiving process opens its own
        return state
