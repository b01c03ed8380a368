"""Feature caches: per-video arrays, many to a file. The only module that imports zarr or h5py.

Why packs: DVC hashes, lists and transfers every file of an output on its own, so a cache of one
or two files per video (UCF101: 13,320 videos, several caches) makes ``dvc add / status / push /
checkout`` crawl over hundreds of thousands of files. Here a cache is a few hundred files.

Layout of a cache directory::

    cache.json            {"format", "backend": "zarr" | "hdf5", "attrs": {...},
                           "packs": [{"name", "videos": [ids]}], "digest"}
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
  one ``zarr.json`` (the index is in its attributes) plus one shard file ``c/0`` of ~1 MiB inner
  chunks, each zstd-compressed on its own; reading a video reads the shard index and only the
  chunks the video covers.
- HDF5: a pack is one ``.h5`` file, a chunked (~1 MiB) gzip-1 dataset; the index is in the
  file's HDF5 user block (the bytes before the HDF5 data, which HDF5 skips), so it is read
  without h5py. gzip-1 over lzf: measured on the demo caches, 2x smaller flow and 1.3x smaller
  features for about the same write speed (on incompressible data gzip is slower: see
  bench/bench_cache.py). Files are opened lazily per process: h5py handles must not cross a
  fork.

Checks: silent wrongness is the failure that matters (a deleted shard read as zeros by Zarr, a
flipped bit read as a slightly different feature), so every byte a reader relies on is checked.

- cache.json, each zarr.json and each HDF5 user block (the HDF5 pack's header) carry the sha1
  of their own text (with the digest blanked), so any changed byte is found; cache.json lists
  the ids of every pack, so a pack that is gone or unreadable is reported with its videos.
- Each pack's header records the size and CRC-32C of its data file (the shard, or the HDF5 data
  after the user block). When a process first reads from a pack, the whole file is read and
  checked against them, before zarr or h5py see it: a flipped bit in an HDF5 file's metadata
  segfaults h5py (measured), and Zarr reads a missing shard or chunk as fill values. The shard
  index must list every inner chunk. CRC-32C runs at 15-30 GB/s here (hardware): the check
  makes a sequential read of a whole cache (training) 4-6% slower on Zarr, 0-2% on HDF5
  (bench/bench_cache.py, pooled and conv-map features).
- Each entry's sha1 is checked when asked: ``read(id, verify=True)``, ``verify(ids)`` and
  ``up_to_date(sources, verify=True)``, which the resumed flow and features stages use for the
  entries they keep, and always by compaction for the entries it copies. Not on every read:
  sha1 made that read 22-25% (Zarr) and 7-14% (HDF5) slower.

A damaged pack is a CacheError for a reader, naming the file, the reason and the videos. A
writer (resuming) drops the damaged packs, with a warning per video, so that the stage
recomputes those videos; a pack is dropped whole (its other videos are recomputed too), since
which of its entries are still sound cannot be told without handing damaged bytes to h5py.

Life of an entry:

- ``write`` stores one video as a unit pack named from its id, written under ``.tmp/`` and
  renamed into ``packs/``: a finished video is durable at once and a process killed mid-write
  (kill -9) loses only the video in progress. That makes extraction resumable per video. Packs
  are built in memory and written by this module, not by zarr or h5py: a full disk is then a
  CacheError naming the file (h5py crashed the process on a full disk, measured), the partial
  file is removed, and everything written before stays.
- ``close`` of the primary writer compacts: every entry, sorted by id, goes into consecutive
  packs of at most ``videos_per_pack`` videos (and ~256 MB), each named from a hash of its
  content, so the same entries give byte-identical packs whatever order or processes wrote them
  and DVC sees no change; a pack that already exists is kept once its files check out. Then
  cache.json is replaced atomically and absorbed unit packs and obsolete packs are deleted.
- Reading resolves an id to the packs listed in cache.json, overridden by unit packs (a unit
  pack is always newer). Any other pack is the leftover of a crashed compaction: ignored, and
  deleted by the next primary writer, as are files left in .tmp/.

Several processes (torchrun ranks) may write different videos into one cache: the primary opens
it first (it alone creates, empties, cleans or repairs a cache), the others open it after it
with ``primary=False``, and the primary closes (compacts) after all the others have closed.

Crash safety is against killed processes: compacted packs and cache.json are fsynced before
anything they replace is deleted; unit packs are not (a power loss may cost the videos written
in the last seconds, as with any page-cached write).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import google_crc32c
import h5py
import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import MemoryStore

log = logging.getLogger(__name__)

Mode = Literal["r", "w", "a"]
Backend = Literal["zarr", "hdf5"]

# 2: checked packs (data file size and CRC-32C in a sealed header) and a sealed cache.json that
# lists each pack's videos. Part of every pack's identity; a cache of another format starts over.
_FORMAT = 2
_DOC = "cache.json"
_PACKS = "packs"
_TMP = ".tmp"
_UNIT = "v-"  # unit pack: one video, named from its id
_COMPACT = "p-"  # compacted pack, named from its content
_SHARD = "c/0"  # a Zarr pack's one shard (zarr's default chunk key encoding)
_HDF5_MAGIC = b"vidfeat-pack"  # first line of an HDF5 pack's user block: b"vidfeat-pack <size>\n"
_CHUNK_BYTES = 1 << 20  # inner chunk: the unit of compression and of reading
_PACK_BYTES = 256 << 20  # uncompressed; bounds the memory a compaction needs
_OPEN_PACKS = 64  # open packs per process (HDF5 keeps a file descriptor per open pack)
_CACHED_CHUNKS = 16  # decoded chunks kept per process, so reading videos in order decodes once
_CHECK_BLOCK = 1 << 20  # read size when checking a CRC: fresh 16 MiB buffers made it 4x slower
_SHOW_IDS = 20  # ids named in one error message
_ZSTD_LEVEL = 3
_GZIP_LEVEL = 1
# Whether a pack's files are checked against their CRC when first read. Only
# bench/bench_cache.py turns it off, to measure what the check costs.
_CHECK_FILES = True


class CacheError(RuntimeError):
    """A cache is missing, damaged, incomplete or was written with other settings, or cannot be
    written; the message names the file, the reason and the videos concerned."""


class _Stale(Exception):
    """A pack changed or vanished since this process indexed it (another process compacted or
    rewrote it); the index is rebuilt and the read retried."""


class _Damaged(Exception):
    """A pack file is missing, short or not what was written, or an entry does not match its
    sha1. ``path``: the file; ``video``: the entry, or None when the whole pack is affected;
    ``pack`` and ``ids`` (the videos affected) are filled in by FeatureCache, which knows what
    a pack holds."""

    def __init__(self, path: Path, reason: str, video: str | None = None) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.video = path, reason, video
        self.pack = ""
        self.ids: list[str] = [video] if video is not None else []

    def message(self) -> str:
        return f"{self.path}: {self.reason}; {_ids_text(self.ids)}"


def _valid_id(video_id: str) -> bool:
    """Ids are '/'-separated paths (``walking/clip_01``, see pipeline.manifest.path_id); a pack
    stores them only as JSON keys and files are named by a hash (``_unit_name``), so '/' and any
    Unicode letter are safe. Refused, as no manifest id holds them: an empty component, one that
    starts with "." (so "." and ".."), control characters, and lone surrogates (text that is not
    UTF-8: the hash and the JSON header need its bytes)."""
    if not isinstance(video_id, str) or not video_id:
        return False
    if any(not part or part.startswith(".") for part in video_id.split("/")):
        return False
    # the control characters (Unicode Cc) and the surrogates (Cs)
    return not any(c < " " or "\x7f" <= c <= "\x9f" or "\ud800" <= c <= "\udfff" for c in video_id)


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


def _ids_text(ids: Iterable[str]) -> str:
    """'videos affected: 'a', 'b' (2)', the first _SHOW_IDS of them."""
    ids = sorted(set(ids))
    if not ids:
        return "videos affected: unknown (their index is unreadable)"
    shown = ", ".join(repr(v) for v in ids[:_SHOW_IDS])
    more = f" and {len(ids) - _SHOW_IDS} more" if len(ids) > _SHOW_IDS else ""
    return f"videos affected: {shown}{more} ({len(ids)})"


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


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file with plain os.write, so a full disk or a file size limit is
    an OSError here (with errno) and never reaches a library's error path."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _write_error(path: Path, e: OSError, what: str) -> CacheError:
    full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    why = e.strerror or str(e)
    hint = " (disk full or file size limit)" if full else ""
    return CacheError(f"{path}: cannot write {what}: {why}{hint}")


def _ident(path: Path) -> tuple[int, int, int]:
    """What tells one version of a file from another: (inode, size, mtime in ns)."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _crc(data: bytes) -> int:
    return google_crc32c.value(data)


def _check_file(path: Path, offset: int, nbytes: int, crc: int) -> None:
    """Check that ``path`` is ``offset + nbytes`` long and that its bytes from ``offset`` have
    CRC-32C ``crc``; _Damaged otherwise (FileNotFoundError when it is missing)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != offset + nbytes:
            what = "short" if size < offset + nbytes else "longer than written"
            raise _Damaged(path, f"{what}: {size} bytes, {offset + nbytes} were written")
        f.seek(offset)
        c = 0
        while block := f.read(_CHECK_BLOCK):
            c = google_crc32c.extend(c, block)
    if c != crc:
        raise _Damaged(path, "its bytes differ from what was written (CRC-32C mismatch)")


# -- sealed JSON: a sha1 of its own text inside it --------------------------------------------

_NO_DIGEST = "0" * 40  # the digest's place holder while the digest is computed


def _render(doc: Any) -> str:
    return json.dumps(doc, indent=1, sort_keys=True)


def _digest_key(depth: int) -> str:
    # With indent=1 a key at nesting depth d is the only text after a newline and d spaces:
    # this finds the holder's "digest" and no other.
    return "\n" + " " * depth + '"digest": "'


def _seal(doc: dict[str, Any], holder: dict[str, Any], depth: int) -> str:
    """``doc`` as JSON text in which ``holder["digest"]`` (``holder``: ``doc`` or a dict at
    nesting ``depth`` in it) is the sha1 of the text itself, with the digest blanked."""
    holder["digest"] = _NO_DIGEST
    text = _render(doc)
    key = _digest_key(depth) + _NO_DIGEST
    assert text.count(key) == 1, "the digest must be findable in the text"
    return text.replace(key, _digest_key(depth) + _sha1(text))


def _unseal(raw: bytes, depth: int) -> dict[str, Any]:
    """Check and parse a document written by ``_seal`` -> the document (its digest left in).
    ValueError when its bytes, any of them, are not those written. The digest is of the text,
    not of the parsed content: it covers every byte, and checking it needs no re-rendering
    (json's indented rendering runs in pure Python: it made reading a pooled cache 5% slower)."""
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        raise ValueError(f"not text ({e})") from None
    key = _digest_key(depth)
    at = text.find(key)
    if at < 0 or text.find(key, at + 1) >= 0:
        raise ValueError("no digest found in it (damaged, or not written by this module)")
    at += len(key)
    digest = text[at : at + 40]
    if _sha1(text[:at] + _NO_DIGEST + text[at + 40 :]) != digest:
        raise ValueError("its bytes differ from those written (sha1 mismatch)")
    try:
        return json.loads(text)
    except ValueError as e:  # cannot happen once the digest matched, but never read garbage
        raise ValueError(f"not readable JSON ({e})") from None


def _load_doc(root: Path) -> tuple[dict[str, Any] | None, str | None]:
    """cache.json -> (document, None), or (None, what is wrong with it)."""
    try:
        raw = (root / _DOC).read_bytes()
    except FileNotFoundError:
        return None, "missing"
    try:
        doc = _unseal(raw, 1)
    except ValueError as e:
        try:  # a cache.json of format 1 had no digest: say "older", not "damaged"
            old = json.loads(raw)
            if isinstance(old, dict) and "digest" not in old and old.get("format") != _FORMAT:
                return None, f"format {old.get('format')!r}, written by an older version"
        except ValueError:
            pass
        return None, f"damaged: {e}"
    if doc.get("format") != _FORMAT:
        return None, f"format {doc.get('format')!r}, this code reads format {_FORMAT}"
    packs = doc.get("packs")
    if doc.get("backend") not in _STORAGES or not isinstance(packs, list):
        return None, "damaged: no known backend or no list of packs"
    return doc, None


def _write_doc(root: Path, doc: dict[str, Any]) -> None:
    """Replace cache.json atomically (a reader sees the old or the new one, never half)."""
    tmp = root / f"{_DOC}.{os.getpid()}.tmp"
    try:
        _write_file(tmp, _seal(doc, doc, 1).encode())
        _fsync_one(tmp)
        os.replace(tmp, root / _DOC)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(tmp, e, f"{_DOC} (the old one is unchanged)") from None
    _fsync_one(root)  # the rename itself, before packs the old cache.json listed are deleted


# -- backends --------------------------------------------------------------------------------


class _Storage(Protocol):
    """How one backend builds, checks, opens and reads a pack: a flat 1-D array plus a header
    {"format", "size", "chunk", "videos": {id: entry}, ...the data file's size and CRC}."""

    name: str
    suffix: str
    codec: str  # part of a pack's identity: other compression -> other bytes -> other name

    def files(self, flat: np.ndarray, header: dict[str, Any]) -> dict[str, bytes]:
        """The pack's files, by path relative to the pack ("" for a pack that is one file)."""
        ...

    def header(self, path: Path) -> dict[str, Any]:
        """The checked header; _Damaged, or FileNotFoundError when the pack is gone."""
        ...

    def data_file(self, path: Path) -> Path: ...
    def header_file(self, path: Path) -> Path: ...
    def idents(self, path: Path, header: dict[str, Any]) -> tuple[Any, ...]: ...
    def check(self, path: Path, header: dict[str, Any]) -> None: ...
    def open(self, path: Path) -> Any: ...
    def read(self, handle: Any, start: int, stop: int) -> np.ndarray: ...
    def close(self, handle: Any) -> None: ...


def _check_header(header: Any) -> dict[str, Any]:
    """The fields every reader relies on, with their types; ValueError otherwise."""
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise ValueError(f"not a pack header of format {_FORMAT}")
    if not isinstance(header.get("videos"), dict) or not all(
        isinstance(header.get(k), int) for k in ("size", "chunk")
    ):
        raise ValueError("its header lacks videos, size or chunk")
    return header


class _ZarrStorage:
    """A pack = one sharded Zarr v3 array, one shard: ``zarr.json`` + ``c/0``."""

    name = "zarr"
    suffix = ".zarr"
    codec = f"zarr3/sharding/zstd{_ZSTD_LEVEL}/{_CHUNK_BYTES}"

    def files(self, flat: np.ndarray, header: dict[str, Any]) -> dict[str, bytes]:
        n = flat.size
        chunk = header["chunk"]
        store: dict[str, Any] = {}
        # Data given at creation: the shard is built whole, once, in one call into zarr's
        # event loop (per-call overhead dominates small unit packs), in memory.
        contents = {"data": flat} if n else {"shape": (0,), "dtype": flat.dtype}
        zarr.create_array(
            store=MemoryStore(store),
            **contents,
            chunks=(chunk,),
            shards=(max(1, math.ceil(n / chunk)) * chunk,),  # one shard holds the whole pack
            compressors=ZstdCodec(level=_ZSTD_LEVEL),
            # Write chunks equal to the fill value too: then every chunk is in the shard index,
            # and one missing from it is damage, never "all zeros" (checked on open).
            config={"write_empty_chunks": True},
        )
        if set(store) - {"zarr.json", _SHARD} or (n > 0) != (_SHARD in store):
            raise RuntimeError(f"zarr wrote {sorted(store)}; this module knows zarr.json and c/0")
        shard = store[_SHARD].to_bytes() if n else None
        meta = json.loads(store["zarr.json"].to_bytes())
        record = None if shard is None else {"bytes": len(shard), "crc32c": _crc(shard)}
        meta["attributes"] = {"vidfeat": {**header, "shard": record}}
        out = {"zarr.json": _seal(meta, meta["attributes"], 2).encode()}
        if shard is not None:
            out[_SHARD] = shard
        return out

    def header(self, path: Path) -> dict[str, Any]:
        # zarr.json is plain JSON (Zarr v3 spec); reading it directly is ~30x faster than
        # opening the array, which matters when indexing thousands of unit packs.
        meta_path = path / "zarr.json"
        try:
            raw = meta_path.read_bytes()
        except FileNotFoundError:
            if path.is_dir():  # the pack is there, its metadata is not
                raise _Damaged(meta_path, "missing") from None
            raise
        try:
            meta = _unseal(raw, 2)
            return _check_header(meta["attributes"]["vidfeat"])
        except (ValueError, KeyError, TypeError) as e:
            raise _Damaged(meta_path, f"unreadable pack header: {e}") from None

    def data_file(self, path: Path) -> Path:
        return path / _SHARD

    def header_file(self, path: Path) -> Path:
        return path / "zarr.json"

    def idents(self, path: Path, header: dict[str, Any]) -> tuple[Any, ...]:
        meta = _ident(path / "zarr.json")  # FileNotFoundError: the pack is gone
        if header["shard"] is None:  # an empty pack has no shard
            return (meta,)
        try:
            return meta, _ident(path / _SHARD)
        except FileNotFoundError:
            raise _Damaged(path / _SHARD, "missing (Zarr would read its videos as zeros)") from None

    def check(self, path: Path, header: dict[str, Any]) -> None:
        rec = header["shard"]
        if rec is None:
            return
        shard = path / _SHARD
        _check_file(shard, 0, rec["bytes"], rec["crc32c"])
        # The shard index (Zarr v3 sharding spec: at the end, (offset, nbytes) uint64 per inner
        # chunk, then its CRC-32C): a chunk marked missing would read as zeros. Written with
        # write_empty_chunks, a pack has every chunk, so this catches a writer that dropped one.
        n = math.ceil(header["size"] / header["chunk"])
        with open(shard, "rb") as f:
            f.seek(-(16 * n + 4), os.SEEK_END)
            index = np.frombuffer(f.read(16 * n), "<u8").reshape(n, 2)
        missing = np.flatnonzero((index == np.iinfo(np.uint64).max).all(axis=1))
        if missing.size:
            raise _Damaged(
                shard,
                f"inner chunks {missing.tolist()} of {n} are missing from the shard index "
                "(Zarr would read them as zeros)",
            )

    def open(self, path: Path) -> Any:
        return zarr.open_array(store=str(path), mode="r")

    def read(self, handle: Any, start: int, stop: int) -> np.ndarray:
        return handle[start:stop]

    def close(self, handle: Any) -> None:
        pass


def _userblock(record: dict[str, Any], size: int) -> bytes | None:
    """An HDF5 pack's user block of ``size`` bytes: b"vidfeat-pack <size>\\n", the sealed
    ``record`` (its header), b"\\n", spaces. None if the record does not fit."""
    body = b"%s %d\n" % (_HDF5_MAGIC, size) + _seal(record, record, 1).encode() + b"\n"
    return body + b" " * (size - len(body)) if len(body) <= size else None


class _HDF5Storage:
    """A pack = one .h5 file: dataset ``data`` (chunked, gzip-1), the header in the user block."""

    name = "hdf5"
    suffix = ".h5"
    codec = f"hdf5/gzip{_GZIP_LEVEL}/{_CHUNK_BYTES}"

    def _image(self, flat: np.ndarray, header: dict[str, Any], userblock: int) -> bytes:
        # HDF5's core driver without a backing store: the file is built in memory and never
        # written by HDF5, whose write path crashed the process on a full disk (measured).
        # track_times=False: no creation time in the object header, so equal content gives
        # byte-identical files (tested).
        with h5py.File(
            "vidfeat-pack", "w", driver="core", backing_store=False, userblock_size=userblock
        ) as f:
            if flat.size:
                f.create_dataset(
                    "data",
                    data=flat,
                    chunks=(header["chunk"],),
                    compression="gzip",
                    compression_opts=_GZIP_LEVEL,
                    track_times=False,
                )
            else:  # HDF5 cannot chunk an empty fixed-size dataset
                f.create_dataset("data", data=flat, track_times=False)
            f.flush()
            return f.id.get_file_image()  # the file after its user block

    def files(self, flat: np.ndarray, header: dict[str, Any]) -> dict[str, bytes]:
        # HDF5 wants a power of two of at least 512 bytes; 64 bytes of slack hold the record of
        # the data (its offset, size and CRC) that the estimate below leaves out.
        size = 512
        while size < len(_render(header)) + 256:
            size *= 2
        while True:
            image = self._image(flat, header, size)
            data = {"offset": size, "bytes": len(image), "crc32c": _crc(image)}
            block = _userblock({**header, "data": data}, size)
            if block is not None:
                return {"": block + image}
            size *= 2

    def header(self, path: Path) -> dict[str, Any]:
        with open(path, "rb") as f:  # FileNotFoundError: the pack is gone
            block = f.read(512)
            m = re.match(rb"%s (\d{3,9})\n" % _HDF5_MAGIC, block)
            size = int(m[1]) if m else 0
            if size >= 512 and size & (size - 1) == 0:
                block += f.read(size - len(block))
        try:
            if not m or size < 512 or size & (size - 1):
                raise ValueError("no vidfeat header at its start")
            if len(block) < size:
                raise ValueError(f"short: {len(block)} bytes, its header alone is {size}")
            body = block[len(m[0]) :].rstrip(b" ")
            if not body.endswith(b"\n"):
                raise ValueError("its header is not followed by padding")
            record = _check_header(_unseal(body[:-1], 1))
        except ValueError as e:
            raise _Damaged(path, f"unreadable pack header: {e}") from None
        return record

    def data_file(self, path: Path) -> Path:
        return path

    def header_file(self, path: Path) -> Path:
        return path

    def idents(self, path: Path, header: dict[str, Any]) -> tuple[Any, ...]:
        return (_ident(path),)

    def check(self, path: Path, header: dict[str, Any]) -> None:
        d = header["data"]
        _check_file(path, d["offset"], d["bytes"], d["crc32c"])

    def open(self, path: Path) -> Any:
        # locking=False: packs are immutable once renamed into place, and HDF5's file locks
        # fail on some network file systems. rdcc_nbytes=0: FeatureCache keeps its own cache
        # of decoded chunks, shared by both backends.
        return h5py.File(path, "r", locking=False, rdcc_nbytes=0)

    def read(self, handle: Any, start: int, stop: int) -> np.ndarray:
        return handle["data"][start:stop]

    def close(self, handle: Any) -> None:
        handle.close()


_STORAGES: dict[str, _Storage] = {"zarr": _ZarrStorage(), "hdf5": _HDF5Storage()}


def _ids_on_disk(root: Path) -> list[str]:
    """Ids found in the readable pack headers under ``root/packs`` (to name what a damaged
    cache.json takes with it)."""
    ids: set[str] = set()
    packs = root / _PACKS
    for e in os.scandir(packs) if packs.is_dir() else []:
        for storage in _STORAGES.values():
            if e.name.endswith(storage.suffix):
                try:
                    ids.update(storage.header(Path(e.path))["videos"])
                except (OSError, _Damaged):
                    pass
    return sorted(ids)


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


# -- the cache -------------------------------------------------------------------------------


class FeatureCache:
    """Per-video arrays (any shape of >= 1 dimension, numeric dtype) plus cache-level metadata.
    Use ``open_cache``, not this constructor.

    Picklable: a cache opened in a parent process can be handed to spawned or forked workers,
    each of which opens (and checks) the pack files it reads itself.
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
        # Damaged packs still on disk (a reader, or a writer that may not delete) -> reason;
        # their videos are left out of the index.
        self._damaged: dict[str, str] = {}
        self._dropped: dict[str, str] = {}  # videos left out as damaged -> reason
        self._retain: set[str] | None = None  # set by retain(): the videos compaction keeps
        self._headers: dict[str, tuple[Any, dict[str, Any]]] = {}  # pack -> (file ident, header)
        doc, problem = _load_doc(self.root)
        if doc is None:
            raise CacheError(f"{self.root / _DOC}: {problem}")
        self.backend: str = doc["backend"]
        self._storage = _STORAGES[self.backend]
        self._attrs: dict[str, Any] = doc["attrs"]
        self._scan(doc)

    # -- index ------------------------------------------------------------------------------
    def _pack_path(self, name: str) -> Path:
        return self.root / _PACKS / (name + self._storage.suffix)

    def _scan(self, doc: Mapping[str, Any] | None = None) -> None:
        """Build the index {id: (pack, entry)} from cache.json's packs, then the unit packs.

        A pack that is missing or has an unreadable header: a CacheError for a reader; a writer
        leaves its videos out (a warning each), so that a resumed stage recomputes them."""
        if doc is None:
            doc, problem = _load_doc(self.root)
            if doc is None:
                raise CacheError(f"{self.root / _DOC}: {problem}")
        self._listed_doc: list[dict[str, Any]] = list(doc["packs"])
        self._listed: list[str] = [p["name"] for p in self._listed_doc]
        index: dict[str, tuple[str, dict[str, Any]]] = {}
        broken: dict[str, tuple[str, list[str]]] = {}  # pack -> (reason naming the file, ids)
        for p in self._listed_doc:
            name = p["name"]
            if name in self._damaged:
                continue
            try:
                videos = self._videos(name)
            except FileNotFoundError:
                why = f"{self._pack_path(name)}: listed in {self.root / _DOC} but missing"
                broken[name] = (why, p["videos"])
                continue
            except _Damaged as e:
                broken[name] = (str(e), p["videos"])
                continue
            if sorted(videos) != sorted(p["videos"]):
                why = f"{self._pack_path(name)}: holds other videos than {_DOC} lists"
                broken[name] = (why, sorted(set(p["videos"]) | set(videos)))
                continue
            for vid, entry in videos.items():
                index[vid] = (name, entry)
        self._units: dict[str, dict[str, Any]] = {}  # unit pack -> its header's videos
        for name in self._unit_names():
            if name in self._damaged:
                continue
            try:
                videos = self._videos(name)
            except FileNotFoundError:  # being replaced by its writer right now
                continue
            except _Damaged as e:
                broken[name] = (str(e), [])
                continue
            self._units[name] = videos
            for vid, entry in videos.items():
                index[vid] = (name, entry)
        if broken and self.mode == "r":
            again, _ = _load_doc(self.root)
            if again is not None and again.get("digest") != doc.get("digest"):
                # cache.json was replaced while we indexed (a compaction, which deletes the
                # packs the old one listed once the new one is in place): index it anew
                return self._scan(again)
            raise CacheError(
                "; ".join(f"{why}; {_ids_text(ids)}" for why, ids in broken.values())
                + "; re-run the stage that writes this cache"
            )
        self._index = index
        for name, (why, ids) in broken.items():
            self._mark_damaged(name, why, ids)

    def _header(self, name: str) -> dict[str, Any]:
        """The checked header of pack ``name`` (FileNotFoundError if it is gone), kept while
        its file is unchanged: indexing reads every header, and opening a pack needs it again
        (parsing it twice cost ~4% of a sequential read of a pooled cache)."""
        path = self._pack_path(name)
        try:
            ident = _ident(self._storage.header_file(path))
        except FileNotFoundError:
            ident = None  # let header() say whether the pack or only its header is missing
        kept = self._headers.get(name)
        if ident is not None and kept is not None and kept[0] == ident:
            return kept[1]
        header = self._storage.header(path)
        if ident is not None:
            self._headers[name] = (ident, header)
        return header

    def _videos(self, name: str) -> dict[str, Any]:
        """The index {id: entry} stored in pack ``name`` (FileNotFoundError if it is gone)."""
        return self._header(name)["videos"]

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

    def _pack_ids(self, name: str) -> list[str]:
        """The videos read from pack ``name``: those the index resolves to it, and those
        cache.json lists in it that are in no other pack (its header was unreadable)."""
        ids = {v for v, (n, _) in self._index.items() if n == name}
        for p in self._listed_doc:
            if p["name"] == name:
                ids |= {v for v in p["videos"] if v not in self._index}
        return sorted(ids)

    # -- damage ---------------------------------------------------------------------------
    def _mark_damaged(
        self, name: str, why: str, ids: Iterable[str] = (), damaged: set[str] | None = None
    ) -> set[str]:
        """Leave pack ``name`` out of the index, with a warning per video (``why`` names the
        file; ``damaged``: the damaged entries, when the rest of the pack is sound) -> the
        videos left out. The primary writer deletes the pack (and unlists it), so that no
        process reads it again and compaction cannot keep a damaged pack under its (content)
        name."""
        lost = set()
        for v in sorted({v for v, (n, _) in self._index.items() if n == name} | set(ids)):
            if v in self._index and self._index[v][0] != name:
                continue  # a newer version of it is in another pack
            self._index.pop(v, None)
            self._dropped[v] = why
            lost.add(v)
            if damaged is None or v in damaged:
                log.warning("%s; damaged video '%s' left out of the cache", why, v)
            else:
                log.warning("%s; video '%s' of the same pack left out with it", why, v)
        if not lost:
            log.warning("%s; left out of the cache", why)
        self._units.pop(name, None)
        self._damaged[name] = why
        if self.mode != "r" and self.primary:
            self._delete_damaged()
        return lost

    def _delete_damaged(self) -> None:
        names = set(self._damaged)
        listed = [p for p in self._listed_doc if p["name"] not in names]
        if len(listed) != len(self._listed_doc):
            _write_doc(self.root, self._doc(listed))
            self._listed_doc, self._listed = listed, [p["name"] for p in listed]
        for name in names:
            self._forget(name)
            _remove(self._pack_path(name))
        self._damaged.clear()

    def _damage(self, e: _Damaged, name: str) -> _Damaged:
        """``e`` with its pack and the videos it affects: the one entry, or all of the pack."""
        e.pack = name
        if e.video is None:
            e.ids = self._pack_ids(name)
        return e

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
        state.checked.pop(name, None)
        p = state.packs.pop(name, None)
        if p is not None:
            self._storage.close(p.handle)
            for key in [k for k in state.chunks if k[0] == name]:
                del state.chunks[key]

    def _open(self, name: str) -> _OpenPack:
        """Pack ``name``, open in this process; its files are checked (size and CRC-32C) the
        first time this process opens this version of them. _Damaged or _Stale."""
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
            if _CHECK_FILES and state.checked.get(name) != token:
                s.check(path, header)
                state.checked[name] = token
            handle = s.open(path)
        except FileNotFoundError as e:  # the pack is gone: compacted away meanwhile?
            raise _Stale(name) from e
        except (_Damaged, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            # Damage, unless the pack was replaced while we read it (another process's
            # compaction or rewrite), so that what we read mixed two versions of it.
            try:
                again = s.idents(path, s.header(path))
            except FileNotFoundError:
                raise _Stale(name) from None
            except (_Damaged, OSError):
                again = None
            if again is not None and again != token:
                raise _Stale(name) from None
            if not isinstance(e, _Damaged):
                e = _Damaged(s.data_file(path), f"cannot open ({type(e).__name__}: {e})")
            raise self._damage(e, name) from None
        state.gen += 1
        p = state.packs[name] = _OpenPack(handle, header, token, state.gen)
        if not self._unchanged(name, p):  # replaced between the check and the open
            self._forget(name)
            raise _Stale(name)
        if len(state.packs) > _OPEN_PACKS:
            _, q = state.packs.popitem(last=False)
            self._storage.close(q.handle)
        return p

    def _unchanged(self, name: str, p: _OpenPack) -> bool:
        try:
            return self._storage.idents(self._pack_path(name), p.header) == p.token
        except (FileNotFoundError, _Damaged):
            return False

    def _file_read(self, name: str, p: _OpenPack, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of an open pack, from its file. Checked unchanged before (h5py
        reads through its open handle: a file changed under it is no longer the one checked)
        and after (zarr opens the shard file anew on every read)."""
        if not self._unchanged(name, p):
            raise _Stale(name)
        try:
            x = self._storage.read(p.handle, start, stop)
        except (OSError, ValueError, RuntimeError) as e:
            if not self._unchanged(name, p):
                raise _Stale(name) from None
            path = self._storage.data_file(self._pack_path(name))
            raise self._damage(_Damaged(path, f"{type(e).__name__}: {e}"), name) from None
        if not self._unchanged(name, p):
            raise _Stale(name)
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

    def _read_once(self, video_id: str, verify: bool) -> np.ndarray:
        name, entry = self._index[video_id]
        p = self._open(name)
        if p.header["videos"].get(video_id) != entry:  # the pack was rewritten since indexed
            raise _Stale(name)
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
            e = _Damaged(path, f"video '{video_id}' does not match its stored sha1", video_id)
            raise self._damage(e, name)
        return flat.reshape(shape)

    def _read(self, video_id: str, verify: bool) -> np.ndarray:
        """``read`` that raises _Damaged (with the videos affected)."""
        if video_id not in self:
            raise CacheError(f"{self.root}: no entry for video '{video_id}'")
        try:
            return self._read_once(video_id, verify)
        except _Stale:
            # Another process compacted or rewrote the pack since we indexed: look again once.
            self._refresh()
            if video_id not in self:
                raise CacheError(f"{self.root}: no entry for video '{video_id}'") from None
            try:
                return self._read_once(video_id, verify)
            except _Stale as e:
                raise CacheError(
                    f"{self.root}: '{video_id}' changed while being read ({e}); "
                    "is another process compacting this cache?"
                ) from None

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

    def up_to_date(self, sources: Mapping[str, str], *, verify: bool = False) -> set[str]:
        """Ids whose stored entry was computed from ``sources[id]`` (a content fingerprint kept
        in the entry's meta as ``source``). An entry from other input bytes is not up to date.

        ``verify``: also read each of them with every check (``verify``); a damaged one is not
        up to date, and is left out of the cache with a warning naming the video and the file
        (with the other videos of its pack: see the module docstring)."""
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

    def _check_entries(self, ids: Iterable[str] | None) -> dict[str, _Damaged]:
        todo = sorted(
            (v for v in (self._index if ids is None else ids) if v in self._index),
            key=lambda v: (self._index[v][0], self._index[v][1]["offset"]),  # pack order
        )
        bad: dict[str, _Damaged] = {}
        dead: dict[str, _Damaged] = {}  # packs whose files failed: one check is enough
        for vid in todo:
            if vid not in self._index:  # left the index when a stale pack was re-indexed
                continue
            name = self._index[vid][0]
            if name in dead:
                bad[vid] = dead[name]
                continue
            try:
                self._read(vid, verify=True)
            except _Damaged as e:
                bad[vid] = e
                if e.video is None:
                    dead[name] = e
            except CacheError:
                if vid in self:
                    raise
                # else it vanished meanwhile (another process compacted): not damaged
        return bad

    def _drop(self, bad: Mapping[str, _Damaged]) -> set[str]:
        """Leave the packs of the ``bad`` entries out (see ``_mark_damaged``) -> every video
        that went with them."""
        lost: set[str] = set()
        for pack, e in {e.pack: e for e in bad.values()}.items():
            entries = {v for v, d in bad.items() if d.pack == pack and d.video is not None}
            lost |= self._mark_damaged(pack, str(e), e.ids, entries or None)
        return lost

    def read(self, video_id: str, *, verify: bool = False) -> np.ndarray:
        """The array stored for ``video_id``, with its shape and dtype. The pack's files are
        checked when this process first reads from it; ``verify`` also checks the entry's sha1.
        CacheError, naming the file, the reason and the videos, when anything does not match."""
        try:
            return self._read(video_id, verify)
        except _Damaged as e:
            raise CacheError(f"{e.message()}; re-run the stage that writes this cache") from None

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
        """Build a pack in memory, write it under .tmp/ and rename it into packs/ (atomic for a
        file; for a zarr directory the old one is first moved aside, so no half-deleted pack is
        ever visible). A failed write (full disk) removes what it wrote: CacheError."""
        header = _norm(
            {
                "format": _FORMAT,
                "size": flat.size,
                "chunk": _chunk_elems(flat.dtype, flat.size),
                "videos": videos,
            }
        )
        files = self._storage.files(flat, header)
        tmp = self.root / _TMP / f"{name}{self._storage.suffix}.{os.getpid()}"
        final = self._pack_path(name)
        target = tmp
        try:
            tmp.parent.mkdir(exist_ok=True)
            _remove(tmp)  # a leftover of a killed process that had our pid
            for rel, data in files.items():
                target = tmp / rel if rel else tmp
                target.parent.mkdir(parents=True, exist_ok=True)
                _write_file(target, data)
            if durable:
                _fsync(tmp)
            if final.is_dir():  # rename cannot replace a non-empty directory
                old = tmp.with_name(tmp.name + ".old")
                _remove(old)
                os.replace(final, old)
                try:
                    os.replace(tmp, final)
                except OSError:
                    os.replace(old, final)  # put the old pack back
                    raise
                _remove(old)
            else:
                os.replace(tmp, final)
        except OSError as e:
            _remove(tmp)
            what = f"pack {final.name} ({final} is unchanged; finished videos are kept)"
            raise _write_error(target, e, what) from None
        self._damaged.pop(name, None)  # replaced by a sound one

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
        self._dropped.pop(video_id, None)

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

    def _write_groups(
        self, groups: list[list[tuple[str, dict[str, Any]]]]
    ) -> tuple[list[str], int]:
        """Make sure each group is a pack -> (names, packs written). An existing pack of the
        name is kept once its files check out; the entries of a new one are read with their
        sha1 checked, so no damaged entry is copied. _Damaged when one is."""
        names: list[str] = []
        written = 0
        for group in groups:
            name = self._pack_name(group)
            names.append(name)
            if self._pack_path(name).exists() and name not in self._damaged:
                try:
                    self._open(name)  # checked once per process: free after a verified resume
                    continue
                except (_Damaged, _Stale):
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
            groups = self._groups(kept)
            try:
                names, written = self._write_groups(groups)
                break
            except _Damaged as e:
                if not self._drop({e.video or e.pack: e}):  # nothing left out: no progress
                    raise CacheError(f"{e.message()}; compaction cannot go on") from None
        if names != self._listed:
            _fsync_one(self.root / _PACKS)  # the renames above, before cache.json points at them
            by_name = {n: [v for v, _ in g] for n, g in zip(names, groups, strict=True)}
            _write_doc(self.root, self._doc([{"name": n, "videos": by_name[n]} for n in names]))
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
                except (FileNotFoundError, _Damaged):
                    continue
                if absorbed.get(name) != now:
                    continue
            self._forget(name)
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
        lost = {v: why for v, why in self._dropped.items() if v not in before}
        lost = {v: why for v, why in lost.items() if v not in self._index}
        if lost:
            first = next(iter(lost.values()))
            raise CacheError(
                f"{self.root}: damaged entries found while compacting were left out "
                f"({first}; {_ids_text(lost)}); re-run the stage to recompute them"
            )

    def _doc(self, packs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"format": _FORMAT, "backend": self.backend, "attrs": self._attrs, "packs": packs}

    def _clean(self) -> None:
        """Remove what killed processes left: .tmp/, cache.json's temporary files and packs that
        are neither listed nor unit packs (a compaction killed before it wrote cache.json).
        Primary only, on open."""
        _remove(self.root / _TMP)
        for p in self.root.glob(f"{_DOC}.*.tmp"):
            log.info("%s: removing %s left by an interrupted run", self.root, p.name)
            p.unlink(missing_ok=True)
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
        try:
            if self.mode != "r" and self.primary and compact:
                self.compact()
        finally:
            if self.mode != "r" and self.primary:  # also when compaction failed (full disk)
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

    - ``"r"``: it must exist and be sound (cache.json, and every pack's header); ``backend`` is
      read from cache.json (the argument is ignored). Pack data is checked as it is read.
    - ``"w"``: start empty with ``attrs`` and ``backend``.
    - ``"a"``: resume. If the cache exists with the same ``attrs`` and ``backend``, its videos
      are kept (leftovers of killed processes are removed, and packs found damaged are dropped
      with a warning per video); if either differs (params changed), or cache.json is damaged
      or of an older format, a warning says why and the cache is started over, because mixing
      videos computed with different settings would silently corrupt results.

    ``primary=False`` joins a cache a primary process opened before (other torchrun ranks): it
    never empties, cleans, repairs or compacts anything, for "w" as for "a", and raises
    CacheError when the cache is missing or its attrs or backend differ. Only a primary writer
    compacts, on close.
    """
    path = Path(path)
    if mode not in ("r", "w", "a"):
        raise ValueError(f"mode must be 'r', 'w' or 'a', got {mode!r}")
    doc, problem = _load_doc(path)
    # Ours even when cache.json is gone: then packs/ is left (a damaged cache, started over).
    ours = (path / _DOC).exists() or (path / _PACKS).is_dir()
    if mode == "r":
        if not ours:
            hint = " (an older layout: re-run the stage)" if (path / "zarr.json").exists() else ""
            raise CacheError(f"{path}: no feature cache here (run the stage that writes it){hint}")
        if doc is None:
            found = _ids_on_disk(path)
            ids = _ids_text(found) if found else "no readable pack under packs/"
            raise CacheError(f"{path / _DOC}: {problem}; {ids}; re-run the stage that writes it")
        return FeatureCache(path, "r")
    if backend not in _STORAGES:
        raise ValueError(f"backend must be one of {sorted(_STORAGES)}, got {backend!r}")
    if videos_per_pack < 1:
        raise ValueError(f"videos_per_pack must be >= 1, got {videos_per_pack}")
    want = _norm(attrs or {})
    diffs = []
    if doc is not None:
        diffs = _diff(_norm(doc["attrs"]), want)
        if doc["backend"] != backend:
            diffs.append(f"backend: {doc['backend']!r} -> {backend!r}")

    def opened() -> FeatureCache:
        return FeatureCache(path, mode, videos_per_pack=videos_per_pack, primary=primary)

    if not primary:
        if doc is None:
            why = f"{path / _DOC}: {problem}" if ours else f"{path}: no cache"
            raise CacheError(f"{why}; no cache to join: the primary process must open it first")
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
    elif mode == "a" and ours:
        log.warning(
            "%s: %s; starting the cache over (%s are recomputed)",
            path / _DOC,
            problem,
            _ids_text(_ids_on_disk(path)).replace("videos affected: ", "videos "),
        )
    if path.exists():
        if not ours and any(path.iterdir()) and not (path / "zarr.json").exists():
            # Neither a cache nor the per-video Zarr layout this module wrote before: refuse to
            # delete what may be someone's data.
            raise CacheError(f"{path}: exists and is not a feature cache; not deleting it")
        if mode == "a" and not ours and any(path.iterdir()):
            log.warning("%s: a cache of the older per-video layout; starting it over", path)
        shutil.rmtree(path)
    try:
        (path / _PACKS).mkdir(parents=True)
    except OSError as e:
        raise _write_error(path / _PACKS, e, "the cache directory") from None
    _write_doc(path, {"format": _FORMAT, "backend": backend, "attrs": want, "packs": []})
    return opened()
