"""Feature caches. The only module that imports zarr.

Layout (Zarr v3): one group per cache whose attributes hold the cache-level metadata (what
produced it: backbone, weights identity, sampling, flow settings, library versions), and one
array per video, named by its video id, with one chunk and zstd compression.

Writes are atomic per video: the array is written to ``<cache>/.tmp/`` and renamed into place,
so a process killed mid-write leaves no half-written video behind. That is what makes
extraction resumable: a video is done exactly when its array exists.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

log = logging.getLogger(__name__)

Mode = Literal["r", "w", "a"]
_TMP = ".tmp"


class CacheError(RuntimeError):
    """A cache is missing, incomplete or was written with other settings; names the path."""


def _valid_id(video_id: str) -> bool:
    return bool(video_id) and "/" not in video_id and not video_id.startswith(".")


def _norm(d: Mapping[str, Any]) -> dict[str, Any]:
    """JSON round trip, so tuples and lists (and int/float keys) compare equal after storage."""
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


class FeatureCache:
    """Per-video arrays plus cache-level metadata. Use ``open_cache``, not this constructor."""

    def __init__(self, root: Path, mode: Mode) -> None:
        self.root = Path(root)
        self.mode = mode
        self._group = zarr.open_group(store=str(self.root), mode="r" if mode == "r" else "a")

    # -- metadata ---------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._group.attrs.asdict())

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
        if not self.root.is_dir():
            return []
        return sorted(
            e.name
            for e in os.scandir(self.root)
            if e.is_dir() and not e.name.startswith(".") and (Path(e.path) / "zarr.json").exists()
        )

    def __contains__(self, video_id: str) -> bool:
        if not _valid_id(video_id):
            return False
        return (self.root / video_id / "zarr.json").exists()

    def __len__(self) -> int:
        return len(self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def up_to_date(self, sources: Mapping[str, str]) -> set[str]:
        """Ids whose stored entry was computed from ``sources[id]`` (a content fingerprint kept
        in the entry's meta as ``source``). An entry from other input bytes is not up to date."""
        have = set(self.keys())
        return {v for v, s in sources.items() if v in have and self.meta(v).get("source") == s}

    def write(
        self, video_id: str, array: np.ndarray, meta: Mapping[str, Any] | None = None
    ) -> None:
        """Store ``array`` (any shape of at least one dimension) for ``video_id`` atomically, replacing an older one."""
        if self.mode == "r":
            raise CacheError(f"{self.root}: opened read-only")
        if not _valid_id(video_id):
            raise CacheError(f"{self.root}: invalid video id {video_id!r}")
        if array.ndim == 0:
            raise CacheError(
                f"{self.root}: '{video_id}': a 0-d array is not a feature; give (T, ...)"
            )
        tmp = self.root / _TMP / f"{video_id}.{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        zarr.create_array(
            store=str(tmp),
            data=np.ascontiguousarray(array),
            chunks=array.shape,
            attributes=_norm(meta or {}),
            overwrite=True,
        )
        final = self.root / video_id
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def read(self, video_id: str) -> np.ndarray:
        if video_id not in self:
            raise CacheError(f"{self.root}: no entry for video '{video_id}'")
        return zarr.open_array(store=str(self.root / video_id), mode="r")[...]

    def meta(self, video_id: str) -> dict[str, Any]:
        if video_id not in self:
            raise CacheError(f"{self.root}: no entry for video '{video_id}'")
        return dict(zarr.open_array(store=str(self.root / video_id), mode="r").attrs.asdict())

    def close(self) -> None:
        tmp = self.root / _TMP
        if self.mode != "r" and tmp.is_dir() and not any(tmp.iterdir()):
            tmp.rmdir()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_cache(path: Path, mode: Mode, *, attrs: Mapping[str, Any] | None = None) -> FeatureCache:
    """Open the cache at ``path``.

    - ``"r"``: it must exist.
    - ``"w"``: start empty with ``attrs``.
    - ``"a"``: resume. If the cache exists and was written with the same ``attrs``, finished
      videos are kept; if its attrs differ (params changed), it is emptied first, because
      mixing videos computed with different settings would silently corrupt results.
    """
    path = Path(path)
    if mode == "r":
        if not (path / "zarr.json").exists():
            raise CacheError(f"{path}: no feature cache here (run the stage that writes it)")
        return FeatureCache(path, "r")
    if mode not in ("w", "a"):
        raise ValueError(f"mode must be 'r', 'w' or 'a', got {mode!r}")
    want = _norm(attrs or {})
    if mode == "a" and (path / "zarr.json").exists():
        have = _norm(FeatureCache(path, "r").attrs)
        if have == want:
            stale = path / _TMP
            if stale.exists():  # partial writes of a killed run
                shutil.rmtree(stale)
            return FeatureCache(path, "a")
        log.warning(
            "%s: settings changed (%s); starting the cache over", path, "; ".join(_diff(have, want))
        )
    if path.exists():
        shutil.rmtree(path)
    group = zarr.open_group(store=str(path), mode="w")
    group.attrs.update(want)
    return FeatureCache(path, mode)
