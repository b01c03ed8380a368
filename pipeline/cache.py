"""Feature caches: per-video arrays, many to a file. The only module that imports zarr or h5py.

Why packs: DVC hashes, lists and transfers every file of an output on its own, so a cache of one
or two files per video (UCF101: 13,320 videos, several caches) makes ``dvc add / status / push /
checkout`` crawl over hundreds of thousands of files. Here a cache is a few hundred files.

Layout of a cache directory::

    cache.json            {"format", "backend": "zarr" | "hdf5", "attrs": {...}, "packs": [...]}
    packs/p-<hash>.zarr   compacted packs, listed in cache.json (hdf5: p-<hash>.h5)
    packs/v-<hash>.zarr   unit packs: one video each, written since the last compaction
    .tmp/                 packs being written (``<name>.<pid>``), renamed into packs/ when complete

``attrs`` is the cache-level metadata (what produced it: backbone, weights, sampling, flow
settings, library versions). A pack holds videos of one dtype as one flat 1-D array, their
arrays raveled and concatenated, plus its own index ``{video_id: {"offset", "shape", "dtype",
"digest", "meta"}}`` (offset in elements, digest = sha1 of the video's bytes, meta = the
per-video dict given to ``write``). Shapes may differ per video: flow (T, L, 2, H, W) uint8
with a video-dependent W, features (T, D), (K, D), (V, T, D) or (T, C, h, w) float16.

- Zarr (default): a pack is one Zarr v3 array with the sharding codec and a single shard, i.e.
  one ``zarr.json`` (the index is in its attributes) plus one shard file of ~1 MiB inner chunks,
  each zstd-compressed on its own; reading a video reads the shard index and only the chunks
  the video covers.
- HDF5: a pack is one ``.h5`` file, a chunked (~1 MiB) gzip-1 dataset with the index as a JSON
  attribute. gzip-1 over lzf: measured on the demo caches, 2x smaller flow and 1.3x smaller
  features for about the same write speed (on incompressible data gzip is slower: see
  bench/bench_cache.py). Files are opened lazily per process: h5py handles must not cross a
  fork.

Life of an entry:

- ``write`` stores one video as a unit pack named from its id, written under ``.tmp/`` and
  renamed into ``packs/``: a finished video is durable at once and a process killed mid-write
  (kill -9) loses only the video in progress. That makes extraction resumable per video.
- ``close`` of the primary writer compacts: every entry, sorted by id, goes into consecutive
  packs of at most ``videos_per_pack`` videos (and ~256 MB), each named from a hash of its
  content, so the same entries give byte-identical packs whatever order or processes wrote them
  and DVC sees no change; a pack that already exists is kept. Then cache.json is replaced
  atomically and absorbed unit packs and obsolete packs are deleted.
- Reading resolves an id to the packs listed in cache.json, overridden by unit packs (a unit
  pack is always newer). Any other pack is the leftover of a crashed compaction: ignored, and
  deleted by the next primary writer.

Several processes (torchrun ranks) may write different videos into one cache: the primary opens
it first (it alone creates, empties or cleans a cache), the others open it after it with
``primary=False``, and the primary closes (compacts) after all the others have closed.

Crash safety is against killed processes: compacted packs and cache.json are fsynced before
anything they replace is deleted; unit packs are not (a power loss may cost the videos written
in the last seconds, as with any page-cached write).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import h5py
import numpy as np
import zarr
from zarr.codecs import ZstdCodec

log = logging.getLogger(__name__)

Mode = Literal["r", "w", "a"]
Backend = Literal["zarr", "hdf5"]

_FORMAT = 1  # of cache.json and of a pack's index; part of every pack's identity
_DOC = "cache.json"
_PACKS = "packs"
_TMP = ".tmp"
_UNIT = "v-"  # unit pack: one video, named from its id
_COMPACT = "p-"  # compacted pack, named from its content
_CHUNK_BYTES = 1 << 20  # inner chunk: the unit of compression and of reading
_PACK_BYTES = 256 << 20  # uncompressed; bounds the memory a compaction needs
_OPEN_PACKS = 64  # open packs per process (HDF5 keeps a file descriptor per open pack)
_CACHED_CHUNKS = 16  # decoded chunks kept per process, so reading videos in order decodes once
_ZSTD_LEVEL = 3
_GZIP_LEVEL = 1


class CacheError(RuntimeError):
    """A cache is missing, incomplete or was written with other settings; names the path."""


class _Stale(Exception):
    """A pack changed or vanished since this process indexed it (another process compacted or
    rewrote it); the index is rebuilt and the read retried."""


def _valid_id(video_id: str) -> bool:
    return bool(video_id) and "/" not in video_id and not video_id.startswith(".")


def _norm(d: Mapping[str, Any]) -> dict[str, Any]:
    """JSON round trip with sorted keys, so tuples and lists (and int/float keys) compare equal
    after storage and whatever is stored from it is written in one key order."""
    return json.loads(json.dumps(dict(d), sort_keys=True, default=str))


def _diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _unit_name(video_id: str) -> str:
    # Hashed, not the id itself: ids may hold characters a file name should not, and a fixed
    # width keeps packs/ tidy. 64 bits: no collision in any realistic dataset.
    return _UNIT + _sha1(video_id)[:16]


def _chunk_elems(dtype: np.dtype, n: int) -> int:
    """Inner chunk length in elements: ~1 MiB, never longer than the array (HDF5 requires it)."""
    return max(1, min(_CHUNK_BYTES // dtype.itemsize, n))


def _nbytes(entry: Mapping[str, Any]) -> int:
    return math.prod(entry["shape"]) * np.dtype(entry["dtype"]).itemsize


def _fsync(path: Path) -> None:
    """fsync a file, or a directory tree's files and directories (a pack before it is listed)."""
    for p in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
        _fsync_one(p)


def _fsync_one(path: Path) -> None:
    """fsync one file or directory (for a directory: makes the renames into it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _read_doc(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / _DOC).read_text())
    except FileNotFoundError:
        return None


def _write_doc(root: Path, doc: Mapping[str, Any]) -> None:
    """Replace cache.json atomically (a reader sees the old or the new one, never half)."""
    tmp = root / f"{_DOC}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / _DOC)
    _fsync_one(root)  # the rename itself, before packs the old cache.json listed are deleted


# -- backends --------------------------------------------------------------------------------


class _Storage(Protocol):
    """How one backend writes, opens and reads a pack: a flat 1-D array plus a header
    {"format", "chunk", "videos": {id: entry}}."""

    name: str
    suffix: str
    codec: str  # part of a pack's identity: other compression -> other bytes -> other name

    def write(self, path: Path, flat: np.ndarray, header: dict[str, Any]) -> None: ...
    def header(self, path: Path) -> dict[str, Any]: ...
    def open(self, path: Path) -> tuple[Any, dict[str, Any], int | None]: ...
    def read(self, handle: Any, start: int, stop: int) -> np.ndarray: ...
    def unchanged(self, path: Path, token: int | None) -> bool: ...
    def close(self, handle: Any) -> None: ...


class _ZarrStorage:
    """A pack = one sharded Zarr v3 array, one shard: ``zarr.json`` + ``c/0``."""

    name = "zarr"
    suffix = ".zarr"
    codec = f"zarr3/sharding/zstd{_ZSTD_LEVEL}/{_CHUNK_BYTES}"

    def write(self, path: Path, flat: np.ndarray, header: dict[str, Any]) -> None:
        n = flat.size
        chunk = header["chunk"]
        # Data given at creation: the shard is written whole, once (no read-modify-write), in
        # one call into zarr's event loop (per-call overhead dominates small unit packs).
        contents = {"data": flat} if n else {"shape": (0,), "dtype": flat.dtype}
        zarr.create_array(
            store=str(path),
            **contents,
            chunks=(chunk,),
            shards=(max(1, math.ceil(n / chunk)) * chunk,),  # one shard holds the whole pack
            compressors=ZstdCodec(level=_ZSTD_LEVEL),
            attributes={"vidfeat": header},  # sorted by the caller: zarr keeps insertion order
            # Write chunks equal to the fill value too: then a pack with data always has its
            # shard file, and a missing shard means "deleted", never "all zeros".
            config={"write_empty_chunks": True},
        )

    def header(self, path: Path) -> dict[str, Any]:
        # zarr.json is plain JSON (Zarr v3 spec); reading it directly is ~30x faster than
        # opening the array, which matters when indexing thousands of unit packs.
        return json.loads((path / "zarr.json").read_text())["attributes"]["vidfeat"]

    def _shard_inode(self, path: Path) -> int | None:
        try:
            return (path / "c" / "0").stat().st_ino
        except FileNotFoundError:
            return None

    def open(self, path: Path) -> tuple[Any, dict[str, Any], int | None]:
        # zarr re-opens the shard file on every read, so an open array is no snapshot: remember
        # the shard's inode and compare after each read (see ``unchanged``).
        before = self._shard_inode(path)
        try:
            arr = zarr.open_array(store=str(path), mode="r")
        except FileNotFoundError as e:
            raise _Stale(str(path)) from e
        if self._shard_inode(path) != before:
            raise _Stale(str(path))
        return arr, dict(arr.attrs["vidfeat"]), before

    def read(self, handle: Any, start: int, stop: int) -> np.ndarray:
        return handle[start:stop]

    def unchanged(self, path: Path, token: int | None) -> bool:
        # A deleted shard would read as fill values, silently: check it is still the same file.
        return self._shard_inode(path) == token

    def close(self, handle: Any) -> None:
        pass


class _HDF5Storage:
    """A pack = one .h5 file: dataset ``data`` (chunked, gzip-1) with attribute ``vidfeat``."""

    name = "hdf5"
    suffix = ".h5"
    codec = f"hdf5/gzip{_GZIP_LEVEL}/{_CHUNK_BYTES}"

    def write(self, path: Path, flat: np.ndarray, header: dict[str, Any]) -> None:
        with h5py.File(path, "w") as f:
            # track_times=False: no creation time in the object header, so equal content gives
            # byte-identical files (tested).
            if flat.size:
                ds = f.create_dataset(
                    "data",
                    data=flat,
                    chunks=(header["chunk"],),
                    compression="gzip",
                    compression_opts=_GZIP_LEVEL,
                    track_times=False,
                )
            else:  # HDF5 cannot chunk an empty fixed-size dataset
                ds = f.create_dataset("data", data=flat, track_times=False)
            ds.attrs["vidfeat"] = json.dumps(header, sort_keys=True)

    def header(self, path: Path) -> dict[str, Any]:
        with h5py.File(path, "r", locking=False) as f:
            return json.loads(f["data"].attrs["vidfeat"])

    def open(self, path: Path) -> tuple[Any, dict[str, Any], int | None]:
        try:
            # locking=False: packs are immutable once renamed into place, and HDF5's file locks
            # fail on some network file systems. rdcc_nbytes=0: FeatureCache keeps its own cache
            # of decoded chunks, shared by both backends.
            f = h5py.File(path, "r", locking=False, rdcc_nbytes=0)
        except FileNotFoundError as e:
            raise _Stale(str(path)) from e
        return f, json.loads(f["data"].attrs["vidfeat"]), None

    def read(self, handle: Any, start: int, stop: int) -> np.ndarray:
        return handle["data"][start:stop]

    def unchanged(self, path: Path, token: int | None) -> bool:
        return True  # an open HDF5 file is a snapshot, even once replaced or deleted

    def close(self, handle: Any) -> None:
        handle.close()


_STORAGES: dict[str, _Storage] = {"zarr": _ZarrStorage(), "hdf5": _HDF5Storage()}


@dataclass
class _OpenPack:
    handle: Any
    header: dict[str, Any]
    token: int | None  # backend's identity of the file opened (zarr: shard inode)
    gen: int  # distinguishes a re-opened pack's chunks from the old ones in the chunk cache


@dataclass
class _ProcessState:
    """Open packs and decoded chunks of one process. Kept per pid: after a fork (DataLoader
    workers) a child must open its own files, never use its parent's HDF5 handles."""

    packs: OrderedDict[str, _OpenPack] = field(default_factory=OrderedDict)
    chunks: OrderedDict[tuple[str, int, int], np.ndarray] = field(default_factory=OrderedDict)
    gen: int = 0


# -- the cache -------------------------------------------------------------------------------


class FeatureCache:
    """Per-video arrays (any shape of >= 1 dimension, numeric dtype) plus cache-level metadata.
    Use ``open_cache``, not this constructor.

    Picklable: a cache opened in a parent process can be handed to spawned or forked workers,
    each of which opens the pack files it reads itself.
    """

    def __init__(
        self, root: Path, mode: Mode, *, videos_per_pack: int = 64, primary: bool = True
    ) -> None:
        self.root = Path(root)
        self.mode = mode
        self.videos_per_pack = videos_per_pack
        self.primary = primary
        self._closed = False
        self._by_pid: dict[int, _ProcessState] = {}
        doc = _read_doc(self.root)
        if doc is None:
            raise CacheError(f"{self.root}: no feature cache here (run the stage that writes it)")
        self.backend: str = doc["backend"]
        if self.backend not in _STORAGES:
            raise CacheError(f"{self.root / _DOC}: unknown backend {self.backend!r}")
        self._storage = _STORAGES[self.backend]
        self._attrs: dict[str, Any] = doc["attrs"]
        self._scan(doc)

    # -- index ------------------------------------------------------------------------------
    def _pack_path(self, name: str) -> Path:
        return self.root / _PACKS / (name + self._storage.suffix)

    def _scan(self, doc: Mapping[str, Any] | None = None) -> None:
        """Build the index {id: (pack, entry)} from cache.json's packs, then the unit packs."""
        doc = doc if doc is not None else _read_doc(self.root)
        if doc is None:
            raise CacheError(f"{self.root}: {_DOC} vanished (the cache was deleted)")
        self._listed: list[str] = list(doc["packs"])
        index: dict[str, tuple[str, dict[str, Any]]] = {}
        for name in self._listed:
            try:
                videos = self._videos(name)
            except FileNotFoundError as e:
                raise CacheError(
                    f"{self._pack_path(name)}: listed in {self.root / _DOC} but missing "
                    "(incomplete checkout or copy?)"
                ) from e
            for vid, entry in videos.items():
                index[vid] = (name, entry)
        self._units: dict[str, dict[str, Any]] = {}  # unit pack -> its header's videos
        for name in self._unit_names():
            try:
                videos = self._videos(name)
            except FileNotFoundError:  # being replaced by its writer right now
                continue
            self._units[name] = videos
            for vid, entry in videos.items():
                index[vid] = (name, entry)
        self._index = index

    def _videos(self, name: str) -> dict[str, Any]:
        """The index {id: entry} stored in pack ``name``."""
        path = self._pack_path(name)
        try:
            return self._storage.header(path)["videos"]
        except FileNotFoundError:
            raise
        except Exception as e:  # truncated or foreign file: say which one
            raise CacheError(f"{path}: unreadable pack ({type(e).__name__}: {e})") from e

    def _unit_names(self) -> list[str]:
        packs = self.root / _PACKS
        if not packs.is_dir():
            return []
        suffix = self._storage.suffix
        return sorted(
            e.name[: -len(suffix)]
            for e in os.scandir(packs)
            if e.name.startswith(_UNIT) and e.name.endswith(suffix)
        )

    def _refresh(self) -> None:
        self._drop_state()
        self._scan()

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

    def _forget(self, name: str) -> None:
        """Close pack ``name`` in this process and drop its chunks (it is being replaced)."""
        state = self._state()
        p = state.packs.pop(name, None)
        if p is not None:
            self._storage.close(p.handle)
            for key in [k for k in state.chunks if k[0] == name]:
                del state.chunks[key]

    def _open(self, name: str) -> _OpenPack:
        state = self._state()
        p = state.packs.get(name)
        if p is not None:
            state.packs.move_to_end(name)
            return p
        handle, header, token = self._storage.open(self._pack_path(name))
        state.gen += 1
        p = state.packs[name] = _OpenPack(handle, header, token, state.gen)
        if len(state.packs) > _OPEN_PACKS:
            _, q = state.packs.popitem(last=False)
            self._storage.close(q.handle)
        return p

    def _chunk(self, name: str, p: _OpenPack, i: int) -> np.ndarray:
        """Decoded inner chunk ``i`` of an open pack, cached per process."""
        state = self._state()
        key = (name, p.gen, i)
        c = state.chunks.get(key)
        if c is None:
            size = p.header["chunk"]
            c = self._storage.read(p.handle, i * size, min((i + 1) * size, p.header["size"]))
            state.chunks[key] = c
            if len(state.chunks) > _CACHED_CHUNKS:
                state.chunks.popitem(last=False)
        else:
            state.chunks.move_to_end(key)
        return c

    def _read_once(self, video_id: str) -> np.ndarray:
        name, entry = self._index[video_id]
        p = self._open(name)
        if p.header["videos"].get(video_id) != entry:  # the pack was rewritten since indexed
            raise _Stale(name)
        shape, dtype = tuple(entry["shape"]), np.dtype(entry["dtype"])
        count, start = math.prod(shape), entry["offset"]
        if count == 0:
            return np.empty(shape, dtype)
        size = p.header["chunk"]
        if count >= size:
            # Large video (conv maps, flow): read its range directly, which decodes only the
            # chunks it covers, without filling the chunk cache with chunks read once.
            flat = self._storage.read(p.handle, start, start + count)
        else:
            # Small video (pooled features): many share a chunk; decode each chunk once.
            first, last = start // size, (start + count - 1) // size
            parts = [self._chunk(name, p, i) for i in range(first, last + 1)]
            lo = start - first * size
            flat = (parts[0] if len(parts) == 1 else np.concatenate(parts))[lo : lo + count]
            flat = flat.copy()  # the caller may modify it; the cached chunk must not change
        if not self._storage.unchanged(self._pack_path(name), p.token):
            raise _Stale(name)
        return flat.reshape(shape)

    # -- metadata ---------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._attrs))

    def check_attrs(self, expected: Mapping[str, Any]) -> None:
        """Raise CacheError when the cache was written with settings other than ``expected``.

        Only the keys in ``expected`` are compared, so a reader states what it relies on.
        """
        have = _norm(self.attrs)
        want = _norm(expected)
        sub = {k: have.get(k) for k in want}
        diffs = _diff(sub, want)
        if diffs:
            raise CacheError(
                f"{self.root}: cache was written with other settings than params ask for "
                f"({'; '.join(diffs)}); re-run the stage that writes it"
            )

    # -- videos -----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Ids of the complete videos, sorted."""
        return sorted(self._index)

    def __contains__(self, video_id: object) -> bool:
        return isinstance(video_id, str) and _valid_id(video_id) and video_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def up_to_date(self, sources: Mapping[str, str]) -> set[str]:
        """Ids whose stored entry was computed from ``sources[id]`` (a content fingerprint kept
        in the entry's meta as ``source``). An entry from other input bytes is not up to date."""
        return {
            v
            for v, s in sources.items()
            if v in self._index and self._index[v][1]["meta"].get("source") == s
        }

    def read(self, video_id: str) -> np.ndarray:
        """The array stored for ``video_id``, with its shape and dtype."""
        if video_id not in self:
            raise CacheError(f"{self.root}: no entry for video '{video_id}'")
        try:
            return self._read_once(video_id)
        except _Stale:
            # Another process compacted or rewrote the pack since we indexed: look again once.
            self._refresh()
            if video_id not in self:
                raise CacheError(f"{self.root}: no entry for video '{video_id}'") from None
            try:
                return self._read_once(video_id)
            except _Stale as e:
                raise CacheError(
                    f"{self.root}: '{video_id}' changed while being read ({e}); "
                    "is another process compacting this cache?"
                ) from None

    def meta(self, video_id: str) -> dict[str, Any]:
        """The meta dict given to ``write`` (after a JSON round trip)."""
        if video_id not in self:
            raise CacheError(f"{self.root}: no entry for video '{video_id}'")
        return json.loads(json.dumps(self._index[video_id][1]["meta"]))

    # -- writing ----------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.mode == "r":
            raise CacheError(f"{self.root}: opened read-only")
        if self._closed:
            raise CacheError(f"{self.root}: cache is closed")

    def _write_pack(
        self, name: str, flat: np.ndarray, videos: dict[str, Any], *, durable: bool
    ) -> None:
        """Write a pack under .tmp/ and rename it into packs/ (atomic for a file; for a zarr
        directory the old one is first moved aside, so no half-deleted pack is ever visible)."""
        tmp_dir = self.root / _TMP
        tmp_dir.mkdir(exist_ok=True)
        tmp = tmp_dir / f"{name}{self._storage.suffix}.{os.getpid()}"
        _remove(tmp)  # a leftover of a killed process that had our pid
        header = _norm(
            {
                "format": _FORMAT,
                "size": flat.size,
                "chunk": _chunk_elems(flat.dtype, flat.size),
                "videos": videos,
            }
        )
        self._storage.write(tmp, flat, header)
        if durable:
            _fsync(tmp)
        final = self._pack_path(name)
        old = None
        if final.is_dir():  # rename cannot replace a non-empty directory
            old = tmp.with_name(tmp.name + ".old")
            _remove(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            _remove(old)

    def write(
        self, video_id: str, array: np.ndarray, meta: Mapping[str, Any] | None = None
    ) -> None:
        """Store ``array`` (any shape of at least one dimension, numeric dtype; kept as given,
        in native byte order) for ``video_id``, replacing an older one. Durable on return."""
        self._check_writable()
        if not _valid_id(video_id):
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
            "meta": _norm(meta or {}),
        }
        name = _unit_name(video_id)
        self._forget(name)
        self._write_pack(name, flat, {video_id: entry}, durable=False)
        entry = _norm(entry)
        self._units[name] = {video_id: entry}
        self._index[video_id] = (name, entry)

    def _groups(
        self, entries: list[tuple[str, dict[str, Any]]]
    ) -> list[list[tuple[str, dict[str, Any]]]]:
        """Consecutive runs of the id-sorted entries: at most ``videos_per_pack`` videos, at
        most _PACK_BYTES (a bigger video gets a pack of its own) and one dtype per pack."""
        groups: list[list[tuple[str, dict[str, Any]]]] = []
        cur: list[tuple[str, dict[str, Any]]] = []
        size = 0
        for vid, entry in entries:
            nbytes = _nbytes(entry)
            if cur and (
                len(cur) >= self.videos_per_pack
                or size + nbytes > _PACK_BYTES
                or entry["dtype"] != cur[0][1]["dtype"]
            ):
                groups.append(cur)
                cur, size = [], 0
            cur.append((vid, entry))
            size += nbytes
        if cur:
            groups.append(cur)
        return groups

    def _pack_name(self, group: list[tuple[str, dict[str, Any]]]) -> str:
        """Name from the content identity: ids, shapes, dtypes, data digests, metas, format
        and codec. Equal name <=> equal bytes, so an existing pack of that name is kept."""
        identity = {
            "format": _FORMAT,
            "codec": self._storage.codec,
            "videos": [[v, e["shape"], e["dtype"], e["digest"], e["meta"]] for v, e in group],
        }
        return _COMPACT + _sha1(json.dumps(identity, sort_keys=True))[:16]

    def compact(self) -> None:
        """Repack every entry (the latest version of each video) into content-named packs of at
        most ``videos_per_pack`` videos, then list them in cache.json and delete the rest.

        Primary writer only, and only once no other process writes: a unit pack another process
        writes meanwhile is kept (never deleted unless absorbed), but may be left unabsorbed.
        """
        self._check_writable()
        if not self.primary:
            raise CacheError(f"{self.root}: only the primary writer compacts")
        t0 = time.perf_counter()
        self._refresh()  # other processes' unit packs too
        absorbed = {name: dict(videos) for name, videos in self._units.items()}
        groups = self._groups(sorted((v, e) for v, (_, e) in self._index.items()))
        names, written = [], 0
        for group in groups:
            name = self._pack_name(group)
            names.append(name)
            if self._pack_path(name).exists():
                continue
            dtype = np.dtype(group[0][1]["dtype"])
            flat = np.empty(sum(math.prod(e["shape"]) for _, e in group), dtype)
            videos, offset = {}, 0
            for vid, entry in group:
                n = math.prod(entry["shape"])
                flat[offset : offset + n] = self.read(vid).reshape(-1)
                videos[vid] = {**entry, "offset": offset}
                offset += n
            self._write_pack(name, flat, videos, durable=True)
            written += 1
        if names != self._listed:
            _fsync_one(self.root / _PACKS)  # the renames above, before cache.json points at them
            _write_doc(self.root, self._doc(names))
        keep = set(names)
        removed = 0
        for e in os.scandir(self.root / _PACKS):
            if not e.name.endswith(self._storage.suffix):
                continue  # not ours to judge (cleaned on open by the primary)
            name = e.name[: -len(self._storage.suffix)]
            if name in keep:
                continue
            if name.startswith(_UNIT):
                # Delete a unit pack only if what it holds now is what went into the packs.
                try:
                    now = self._videos(name)
                except FileNotFoundError:
                    continue
                if absorbed.get(name) != now:
                    continue
            _remove(Path(e.path))
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

    def _doc(self, packs: list[str]) -> dict[str, Any]:
        return {"format": _FORMAT, "backend": self.backend, "attrs": self._attrs, "packs": packs}

    def _clean(self) -> None:
        """Remove what killed processes left: .tmp/ and packs that are neither listed nor unit
        packs (a compaction killed before it wrote cache.json). Primary only, on open."""
        _remove(self.root / _TMP)
        keep = set(self._listed)
        for e in os.scandir(self.root / _PACKS):
            name, suffix = os.path.splitext(e.name)
            if suffix == self._storage.suffix and (name in keep or name.startswith(_UNIT)):
                continue
            log.info("%s: removing %s left by an interrupted run", self.root, e.name)
            _remove(Path(e.path))

    def close(self, *, compact: bool = True) -> None:
        """Close this process's open packs. The primary writer first compacts (unless
        ``compact=False``) and removes the empty .tmp/; other writers never touch shared state."""
        if self._closed:
            return
        if self.mode != "r" and self.primary:
            if compact:
                self.compact()
            try:
                (self.root / _TMP).rmdir()
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

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_by_pid"] = {}  # open files do not travel; the receiving process opens its own
        return state


def open_cache(
    path: Path,
    mode: Mode,
    *,
    attrs: Mapping[str, Any] | None = None,
    backend: Backend = "zarr",
    videos_per_pack: int = 64,
    primary: bool = True,
) -> FeatureCache:
    """Open the cache at ``path``.

    - ``"r"``: it must exist; ``backend`` is read from cache.json (the argument is ignored).
    - ``"w"``: start empty with ``attrs`` and ``backend``.
    - ``"a"``: resume. If the cache exists with the same ``attrs`` and ``backend``, its videos
      are kept (and leftovers of killed processes removed); if either differs (params changed),
      a warning lists the differences and the cache is started over, because mixing videos
      computed with different settings would silently corrupt results.

    ``primary=False`` joins a cache a primary process opened before (other torchrun ranks): it
    never empties, cleans or compacts anything, for "w" as for "a", and raises CacheError when
    the cache is missing or its attrs or backend differ. Only a primary writer compacts, on close.
    """
    path = Path(path)
    if mode not in ("r", "w", "a"):
        raise ValueError(f"mode must be 'r', 'w' or 'a', got {mode!r}")
    if mode == "r":
        if not (path / _DOC).exists():
            hint = " (an older layout: re-run the stage)" if (path / "zarr.json").exists() else ""
            raise CacheError(f"{path}: no feature cache here (run the stage that writes it){hint}")
        return FeatureCache(path, "r")
    if backend not in _STORAGES:
        raise ValueError(f"backend must be one of {sorted(_STORAGES)}, got {backend!r}")
    if videos_per_pack < 1:
        raise ValueError(f"videos_per_pack must be >= 1, got {videos_per_pack}")
    want = _norm(attrs or {})
    doc = _read_doc(path)
    diffs = []
    if doc is not None:
        diffs = _diff(_norm(doc["attrs"]), want)
        if doc["backend"] != backend:
            diffs.append(f"backend: {doc['backend']!r} -> {backend!r}")

    def opened() -> FeatureCache:
        return FeatureCache(path, mode, videos_per_pack=videos_per_pack, primary=primary)

    if not primary:
        if doc is None:
            raise CacheError(f"{path}: no cache to join; the primary process must open it first")
        if diffs:
            raise CacheError(
                f"{path}: the cache was opened with other settings ({'; '.join(diffs)}); "
                "all processes must use the same params"
            )
        return opened()
    if mode == "a" and doc is not None and not diffs:
        cache = opened()
        cache._clean()
        return cache
    if mode == "a" and doc is not None:
        log.warning("%s: settings changed (%s); starting the cache over", path, "; ".join(diffs))
    if path.exists():
        if doc is None and any(path.iterdir()) and not (path / "zarr.json").exists():
            # Neither a cache nor the per-video Zarr layout this module wrote before: refuse to
            # delete what may be someone's data.
            raise CacheError(f"{path}: exists and is not a feature cache; not deleting it")
        if mode == "a" and doc is None and any(path.iterdir()):
            log.warning("%s: a cache of the older per-video layout; starting it over", path)
        shutil.rmtree(path)
    (path / _PACKS).mkdir(parents=True)
    _write_doc(path, {"format": _FORMAT, "backend": backend, "attrs": want, "packs": []})
    return opened()
