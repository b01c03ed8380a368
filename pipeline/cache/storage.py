"""The pack backends, Zarr and HDF5: how a pack's files are built, written, checked, opened and
read. The only module of the project that imports zarr or h5py.

- Zarr (default): a pack is one Zarr v3 array with the sharding codec and a single shard, i.e.
  one ``zarr.json`` (the index is in its attributes) plus one shard file ``c/0`` of ~1 MiB inner
  chunks, each zstd-compressed on its own; reading a video reads the shard index and only the
  chunks the video covers.
- HDF5: a pack is one ``.h5`` file, a chunked (~1 MiB) gzip-1 dataset; the index is in the
  file's HDF5 user block (the bytes before the HDF5 data, which HDF5 skips), so it is read
  without h5py. gzip-1 over lzf: measured on the demo caches, 2x smaller flow and 1.3x smaller
  features for about the same write speed (on incompressible data gzip is slower: see
  bench/bench_cache.py). Files are opened lazily per process (pipeline/cache/reader.py): h5py
  handles must not cross a fork.

Packs are built in memory and written by this module (``write_pack``), not by zarr or h5py: a
full disk is then a CacheError naming the file (h5py crashed the process on a full disk,
measured), the partial file is removed, and everything written before stays.

Each pack's header records the size and CRC-32C of its data file (the shard, or the HDF5 data
after the user block), checked by ``check`` before zarr or h5py see the file: a flipped bit in
an HDF5 file's metadata segfaults h5py (measured), and Zarr reads a missing shard or chunk as
fill values. The shard index must list every inner chunk. CRC-32C runs at 15-30 GB/s here
(hardware).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Protocol

import google_crc32c
import h5py
import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.storage import MemoryStore

from pipeline.cache.files import fsync, ident, remove, write_file
from pipeline.cache.layout import (
    CHUNK_BYTES,
    FORMAT,
    PACKS,
    TMP,
    Damaged,
    chunk_elems,
    norm,
    render,
    seal,
    unseal,
    write_error,
)

_SHARD = "c/0"  # a Zarr pack's one shard (zarr's default chunk key encoding)
_HDF5_MAGIC = b"vidfeat-pack"  # first line of an HDF5 pack's user block: b"vidfeat-pack <size>\n"
_CHECK_BLOCK = 1 << 20  # read size when checking a CRC: fresh 16 MiB buffers made it 4x slower
_ZSTD_LEVEL = 3
_GZIP_LEVEL = 1


class Storage(Protocol):
    """How one backend builds, checks, opens and reads a pack: a flat 1-D array plus a header
    {"format", "size", "chunk", "videos": {id: entry}, ...the data file's size and CRC}."""

    name: str
    suffix: str
    codec: str  # part of a pack's identity: other compression -> other bytes -> other name

    def files(self, flat: np.ndarray, header: dict[str, Any]) -> dict[str, bytes]:
        """The pack's files, by path relative to the pack ("" for a pack that is one file)."""
        ...

    def header(self, path: Path) -> dict[str, Any]:
        """The checked header; Damaged, or FileNotFoundError when the pack is gone."""
        ...

    def data_file(self, path: Path) -> Path: ...
    def header_file(self, path: Path) -> Path: ...
    def idents(self, path: Path, header: dict[str, Any]) -> tuple[Any, ...]: ...
    def check(self, path: Path, header: dict[str, Any]) -> None: ...
    def open(self, path: Path) -> Any: ...
    def read(self, handle: Any, start: int, stop: int) -> np.ndarray: ...
    def close(self, handle: Any) -> None: ...


def _check_header(header: Any) -> dict[str, Any]:
    """The fields every reader relies on, with their types; ValueError otherwise. A header of
    another format is refused whole: its fields are not looked at."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"not a pack header of format {FORMAT}")
    if not isinstance(header.get("videos"), dict) or not all(
        isinstance(header.get(k), int) for k in ("size", "chunk")
    ):
        raise ValueError("its header lacks videos, size or chunk")
    return header


def _crc(data: bytes) -> int:
    return google_crc32c.value(data)


def _check_file(path: Path, offset: int, nbytes: int, crc: int) -> None:
    """Check that ``path`` is ``offset + nbytes`` long and that its bytes from ``offset`` have
    CRC-32C ``crc``; Damaged otherwise (FileNotFoundError when it is missing)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != offset + nbytes:
            what = "short" if size < offset + nbytes else "longer than written"
            raise Damaged(path, f"{what}: {size} bytes, {offset + nbytes} were written")
        f.seek(offset)
        c = 0
        while block := f.read(_CHECK_BLOCK):
            c = google_crc32c.extend(c, block)
    if c != crc:
        raise Damaged(path, "its bytes differ from what was written (CRC-32C mismatch)")


class ZarrStorage:
    """A pack = one sharded Zarr v3 array, one shard: ``zarr.json`` + ``c/0``."""

    name = "zarr"
    suffix = ".zarr"
    codec = f"zarr3/sharding/zstd{_ZSTD_LEVEL}/{CHUNK_BYTES}"

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
        out = {"zarr.json": seal(meta, meta["attributes"], 2).encode()}
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
                raise Damaged(meta_path, "missing") from None
            raise
        try:
            meta = unseal(raw, 2)
            return _check_header(meta["attributes"]["vidfeat"])
        except (ValueError, KeyError, TypeError) as e:
            raise Damaged(meta_path, f"unreadable pack header: {e}") from None

    def data_file(self, path: Path) -> Path:
        return path / _SHARD

    def header_file(self, path: Path) -> Path:
        return path / "zarr.json"

    def idents(self, path: Path, header: dict[str, Any]) -> tuple[Any, ...]:
        meta = ident(path / "zarr.json")  # FileNotFoundError: the pack is gone
        if header["shard"] is None:  # an empty pack has no shard
            return (meta,)
        try:
            return meta, ident(path / _SHARD)
        except FileNotFoundError:
            raise Damaged(path / _SHARD, "missing (Zarr would read its videos as zeros)") from None

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
            raise Damaged(
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
    body = b"%s %d\n" % (_HDF5_MAGIC, size) + seal(record, record, 1).encode() + b"\n"
    return body + b" " * (size - len(body)) if len(body) <= size else None


class HDF5Storage:
    """A pack = one .h5 file: dataset ``data`` (chunked, gzip-1), the header in the user block."""

    name = "hdf5"
    suffix = ".h5"
    codec = f"hdf5/gzip{_GZIP_LEVEL}/{CHUNK_BYTES}"

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
        while size < len(render(header)) + 256:
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
            record = _check_header(unseal(body[:-1], 1))
        except ValueError as e:
            raise Damaged(path, f"unreadable pack header: {e}") from None
        return record

    def data_file(self, path: Path) -> Path:
        return path

    def header_file(self, path: Path) -> Path:
        return path

    def idents(self, path: Path, header: dict[str, Any]) -> tuple[Any, ...]:
        return (ident(path),)

    def check(self, path: Path, header: dict[str, Any]) -> None:
        d = header["data"]
        _check_file(path, d["offset"], d["bytes"], d["crc32c"])

    def open(self, path: Path) -> Any:
        # locking=False: packs are immutable once renamed into place, and HDF5's file locks
        # fail on some network file systems. rdcc_nbytes=0: the reader keeps its own cache
        # of decoded chunks, shared by both backends.
        return h5py.File(path, "r", locking=False, rdcc_nbytes=0)

    def read(self, handle: Any, start: int, stop: int) -> np.ndarray:
        return handle["data"][start:stop]

    def close(self, handle: Any) -> None:
        handle.close()


STORAGES: dict[str, Storage] = {"zarr": ZarrStorage(), "hdf5": HDF5Storage()}


def pack_path(root: Path, storage: Storage, name: str) -> Path:
    """Where pack ``name`` of the cache at ``root`` lives."""
    return root / PACKS / (name + storage.suffix)


def ids_on_disk(root: Path) -> list[str]:
    """Ids found in the readable pack headers under ``root/packs`` (to name what a damaged
    cache.json takes with it)."""
    ids: set[str] = set()
    packs = root / PACKS
    for e in os.scandir(packs) if packs.is_dir() else []:
        for storage in STORAGES.values():
            if e.name.endswith(storage.suffix):
                try:
                    ids.update(storage.header(Path(e.path))["videos"])
                except (OSError, Damaged):
                    pass
    return sorted(ids)


def write_pack(
    root: Path,
    storage: Storage,
    name: str,
    flat: np.ndarray,
    videos: dict[str, Any],
    *,
    durable: bool,
) -> None:
    """Build a pack in memory, write it under .tmp/ and rename it into packs/ (atomic for a
    file; for a zarr directory the old one is first moved aside, so no half-deleted pack is
    ever visible). A failed write (full disk) removes what it wrote: CacheError.

    flat: (N,) the videos' arrays raveled and concatenated; videos: {id: entry} (offsets into
    ``flat``). ``durable``: fsync before the rename (compacted packs, which replace others)."""
    header = norm(
        {
            "format": FORMAT,
            "size": flat.size,
            "chunk": chunk_elems(flat.dtype, flat.size),
            "videos": videos,
        }
    )
    files = storage.files(flat, header)
    tmp = root / TMP / f"{name}{storage.suffix}.{os.getpid()}"
    final = pack_path(root, storage, name)
    target = tmp
    try:
        tmp.parent.mkdir(exist_ok=True)
        remove(tmp)  # a leftover of a killed process that had our pid
        for rel, data in files.items():
            target = tmp / rel if rel else tmp
            target.parent.mkdir(parents=True, exist_ok=True)
            write_file(target, data)
        if durable:
            fsync(tmp)
        if final.is_dir():  # rename cannot replace a non-empty directory
            old = tmp.with_name(tmp.name + ".old")
            remove(old)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except OSError:
                os.replace(old, final)  # put the old pack back
                raise
            remove(old)
        else:
            os.replace(tmp, final)
    except OSError as e:
        remove(tmp)
        what = f"pack {final.name} ({final} is unchanged; finished videos are kept)"
        raise write_error(target, e, what) from None
