"""Plain-file operations every part of the cache uses: writes that fail with an errno, fsync,
removal, and what tells one version of a file from another.

Packs and cache.json are built in memory and written here with os.write, never by zarr or
h5py: a full disk or a file size limit is then an OSError with its errno at a known place (the
caller turns it into a CacheError naming the file), where h5py's own write path crashed the
process (measured).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file with plain os.write, so a full disk or a file size limit is
    an OSError here (with errno) and never reaches a library's error path."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def fsync(path: Path) -> None:
    """fsync a file, or a directory tree's files and directories (a pack before it is listed)."""
    for p in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
        fsync_one(p)


def fsync_one(path: Path) -> None:
    """fsync one file or directory (for a directory: makes the renames into it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Remove a file or a directory tree; nothing if it is gone."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def ident(path: Path) -> tuple[int, int, int]:
    """What tells one version of a file from another: (inode, size, mtime in ns)."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns
