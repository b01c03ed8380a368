"""Feature caches: per-video arrays, many to a file. ``open_cache(path, mode) -> FeatureCache``::

    with open_cache(out, "w", attrs=attrs, backend="zarr") as c:
        c.write(video_id, feats, {"source": sha256})

Why packs: DVC hashes, lists and transfers every file of an output on its own, so a cache of one
or two files per video (UCF101: 13,320 videos, several caches) makes ``dvc add / status / push /
checkout`` crawl over hundreds of thousands of files. Here a cache is a few hundred files.

This module is the facade: the project imports only what it exports (tests and
bench/bench_cache.py also reach into the modules). The package, one concern per module:

- layout.py       what a cache directory is: file and pack names, the format version, video
                  ids, cache.json (sealed JSON), the errors
- files.py        plain-file writes (a full disk is an errno, not a crash), fsync, removal
- storage.py      the Zarr and HDF5 pack backends: the only module that imports zarr or h5py
- index.py        which pack holds which video; damaged packs left out with their videos
- reader.py       reading entries: per-process handles, pack checks on open, chunk cache
- compaction.py   ``FeatureCache``: unit-pack writes and their compaction into packs
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.cache.compaction import FeatureCache
from pipeline.cache.layout import (
    BACKENDS,
    DOC,
    PACKS,
    Backend,
    CacheError,
    Mode,
    diff,
    ids_text,
    load_doc,
    new_doc,
    norm,
    write_doc,
    write_error,
)
from pipeline.cache.storage import ids_on_disk

__all__ = ["CacheError", "FeatureCache", "open_cache"]

# The name a traceback shows and callers catch; defined in layout.py with the other errors.
CacheError.__module__ = __name__

log = logging.getLogger(__name__)


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
      or of another format, a warning says why and the cache is started over, because mixing
      videos computed with different settings would silently corrupt results.

    ``primary=False`` joins a cache a primary process opened before (other torchrun ranks): it
    never empties, cleans, repairs or compacts anything, for "w" as for "a", and raises
    CacheError when the cache is missing or its attrs or backend differ. Only a primary writer
    compacts, on close.
    """
    path = Path(path)
    if mode not in ("r", "w", "a"):
        raise ValueError(f"mode must be 'r', 'w' or 'a', got {mode!r}")
    doc, problem = load_doc(path)
    # Ours even when cache.json is gone: then packs/ is left (a damaged cache, started over).
    ours = (path / DOC).exists() or (path / PACKS).is_dir()
    if mode == "r":
        if not ours:
            raise CacheError(f"{path}: no feature cache here (run the stage that writes it)")
        if doc is None:
            found = ids_on_disk(path)
            ids = ids_text(found) if found else "no readable pack under packs/"
            raise CacheError(f"{path / DOC}: {problem}; {ids}; re-run the stage that writes it")
        return FeatureCache(path, "r")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    if videos_per_pack < 1:
        raise ValueError(f"videos_per_pack must be >= 1, got {videos_per_pack}")
    want = norm(attrs or {})
    diffs = []
    if doc is not None:
        diffs = diff(norm(doc["attrs"]), want)
        if doc["backend"] != backend:
            diffs.append(f"backend: {doc['backend']!r} -> {backend!r}")

    def opened() -> FeatureCache:
        return FeatureCache(path, mode, videos_per_pack=videos_per_pack, primary=primary)

    if not primary:
        if doc is None:
            why = f"{path / DOC}: {problem}" if ours else f"{path}: no cache"
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
            path / DOC,
            problem,
            ids_text(ids_on_disk(path)).replace("videos affected: ", "videos "),
        )
    if path.exists():
        if not ours and any(path.iterdir()):
            # No cache.json and no packs/: nothing says it is a cache (the per-video layout
            # from before format 1 had neither), and it may be someone's data: not deleted.
            raise CacheError(f"{path}: exists and is not a feature cache; not deleting it")
        shutil.rmtree(path)
    try:
        (path / PACKS).mkdir(parents=True)
    except OSError as e:
        raise write_error(path / PACKS, e, "the cache directory") from None
    write_doc(path, new_doc(backend, want, []))
    return opened()
