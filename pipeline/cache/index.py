"""Which pack holds which video: the index of a cache, and what is left out of it as damaged.

``FeatureCache`` is built in three layers, one module each: ``CacheIndex`` (here: what the
cache holds), ``CacheReader`` (reader.py: reading it, per process) and ``FeatureCache``
(compaction.py: writing and compacting it).

Reading resolves an id to the packs listed in cache.json, overridden by unit packs (a unit pack
is always newer). Any other pack is the leftover of a crashed compaction: ignored, and deleted
by the next primary writer, as are files left in .tmp/.

A damaged pack is a CacheError for a reader, naming the file, the reason and the videos. A
writer (resuming) drops the damaged packs, with a warning per video, so that the stage
recomputes those videos; a pack is dropped whole (its other videos are recomputed too), since
which of its entries are still sound cannot be told without handing damaged bytes to h5py.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.files import ident, remove
from pipeline.cache.layout import (
    DOC,
    PACKS,
    UNIT,
    CacheError,
    Damaged,
    Mode,
    diff,
    ids_text,
    load_doc,
    new_doc,
    norm,
    valid_id,
    write_doc,
)
from pipeline.cache.storage import STORAGES, Storage, pack_path

log = logging.getLogger(__name__)


class CacheIndex:
    """The videos of the cache at ``root``: {id: (pack, entry)}, its attrs and its damage."""

    def __init__(
        self, root: Path, mode: Mode, *, videos_per_pack: int = 64, primary: bool = True
    ) -> None:
        self.root = Path(root)
        self.mode = mode
        self.videos_per_pack = videos_per_pack
        self.primary = primary
        # Damaged packs still on disk (a reader, or a writer that may not delete) -> reason;
        # their videos are left out of the index.
        self._damaged: dict[str, str] = {}
        self._dropped: dict[str, str] = {}  # videos left out as damaged -> reason
        self._headers: dict[str, tuple[Any, dict[str, Any]]] = {}  # pack -> (file ident, header)
        doc, problem = load_doc(self.root)
        if doc is None:
            raise CacheError(f"{self.root / DOC}: {problem}")
        self.backend: str = doc["backend"]
        self._storage: Storage = STORAGES[self.backend]
        self._attrs: dict[str, Any] = doc["attrs"]
        self._scan(doc)

    def _forget(self, name: str) -> None:
        """Drop what this process holds of pack ``name`` (it is being deleted or replaced).
        Nothing here: the reader closes its open handles."""

    # -- index ------------------------------------------------------------------------------
    def _pack_path(self, name: str) -> Path:
        return pack_path(self.root, self._storage, name)

    def _scan(self, doc: Mapping[str, Any] | None = None) -> None:
        """Build the index {id: (pack, entry)} from cache.json's packs, then the unit packs.

        A pack that is missing or has an unreadable header: a CacheError for a reader; a writer
        leaves its videos out (a warning each), so that a resumed stage recomputes them."""
        if doc is None:
            doc, problem = load_doc(self.root)
            if doc is None:
                raise CacheError(f"{self.root / DOC}: {problem}")
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
                why = f"{self._pack_path(name)}: listed in {self.root / DOC} but missing"
                broken[name] = (why, p["videos"])
                continue
            except Damaged as e:
                broken[name] = (str(e), p["videos"])
                continue
            if sorted(videos) != sorted(p["videos"]):
                why = f"{self._pack_path(name)}: holds other videos than {DOC} lists"
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
            except Damaged as e:
                broken[name] = (str(e), [])
                continue
            self._units[name] = videos
            for vid, entry in videos.items():
                index[vid] = (name, entry)
        if broken and self.mode == "r":
            again, _ = load_doc(self.root)
            if again is not None and again.get("digest") != doc.get("digest"):
                # cache.json was replaced while we indexed (a compaction, which deletes the
                # packs the old one listed once the new one is in place): index it anew
                return self._scan(again)
            raise CacheError(
                "; ".join(f"{why}; {ids_text(ids)}" for why, ids in broken.values())
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
            now = ident(self._storage.header_file(path))
        except FileNotFoundError:
            now = None  # let header() say whether the pack or only its header is missing
        kept = self._headers.get(name)
        if now is not None and kept is not None and kept[0] == now:
            return kept[1]
        header = self._storage.header(path)
        if now is not None:
            self._headers[name] = (now, header)
        return header

    def _videos(self, name: str) -> dict[str, Any]:
        """The index {id: entry} stored in pack ``name`` (FileNotFoundError if it is gone)."""
        return self._header(name)["videos"]

    def _unit_names(self) -> list[str]:
        packs = self.root / PACKS
        if not packs.is_dir():
            return []
        suffix = self._storage.suffix
        return sorted(
            e.name[: -len(suffix)]
            for e in os.scandir(packs)
            if e.name.startswith(UNIT) and e.name.endswith(suffix)
        )

    def _pack_ids(self, name: str) -> list[str]:
        """The videos read from pack ``name``: those the index resolves to it, and those
        cache.json lists in it that are in no other pack (its header was unreadable)."""
        ids = {v for v, (n, _) in self._index.items() if n == name}
        for p in self._listed_doc:
            if p["name"] == name:
                ids |= {v for v in p["videos"] if v not in self._index}
        return sorted(ids)

    def _doc(self, packs: list[dict[str, Any]]) -> dict[str, Any]:
        return new_doc(self.backend, self._attrs, packs)

    # -- damage -----------------------------------------------------------------------------
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
            write_doc(self.root, self._doc(listed))
            self._listed_doc, self._listed = listed, [p["name"] for p in listed]
        for name in names:
            self._forget(name)
            remove(self._pack_path(name))
        self._damaged.clear()

    def _damage(self, e: Damaged, name: str) -> Damaged:
        """``e`` with its pack and the videos it affects: the one entry, or all of the pack."""
        e.pack = name
        if e.video is None:
            e.ids = self._pack_ids(name)
        return e

    # -- metadata ---------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        """The cache-level metadata (a copy)."""
        return json.loads(json.dumps(self._attrs))

    def check_attrs(self, expected: Mapping[str, Any]) -> None:
        """Raise CacheError when the cache was written with settings other than ``expected``.

        Only the keys in ``expected`` are compared, so a reader states what it relies on.
        """
        have = norm(self.attrs)
        want = norm(expected)
        sub = {k: have.get(k) for k in want}
        diffs = diff(sub, want)
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
        return isinstance(video_id, str) and valid_id(video_id) and video_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def shape(self, video_id: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of the video's array as written, from the index: nothing is read, so
        a trainer can size a cache of many GB before deciding how to read it."""
        if video_id not in self:
            raise CacheError(f"{self.root}: no entry for video '{video_id}'")
        entry = self._index[video_id][1]
        return tuple(int(n) for n in entry["shape"]), np.dtype(entry["dtype"])

    def meta(self, video_id: str) -> dict[str, Any]:
        """The meta dict given to ``write`` (after a JSON round trip)."""
        if video_id not in self:
            raise CacheError(f"{self.root}: no entry for video '{video_id}'")
        return json.loads(json.dumps(self._index[video_id][1]["meta"]))
