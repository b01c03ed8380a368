"""What a cache directory is: the names of its files and packs, the format version, video ids,
the cache.json document, and the errors that name what is wrong with them.

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

Format: ``FORMAT`` is written into cache.json, into every pack header and into every compacted
pack's name. It is the one thing that decides whether this code reads an artifact: a
cache.json or pack of any other format is not read (no branch reads an older layout key by
key); ``open_cache(..., "a")`` starts such a cache over with a warning that names the format.

cache.json, each zarr.json and each HDF5 user block (the HDF5 pack's header) carry the sha1 of
their own text (with the digest blanked: "sealed" JSON, below), so any changed byte is found;
cache.json lists the ids of every pack, so a pack that is gone or unreadable is reported with
its videos.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from pipeline.cache.files import fsync_one, write_file

Mode = Literal["r", "w", "a"]
Backend = Literal["zarr", "hdf5"]
BACKENDS: tuple[str, ...] = get_args(Backend)

# 2: checked packs (data file size and CRC-32C in a sealed header) and a sealed cache.json that
# lists each pack's videos. Part of every pack's identity; a cache of another format starts over.
FORMAT = 2
DOC = "cache.json"
PACKS = "packs"
TMP = ".tmp"
UNIT = "v-"  # unit pack: one video, named from its id
COMPACT = "p-"  # compacted pack, named from its content
CHUNK_BYTES = 1 << 20  # inner chunk: the unit of compression and of reading
PACK_BYTES = 256 << 20  # uncompressed; bounds the memory a compaction needs
SHOW_IDS = 20  # ids named in one error message

# A group of entries to pack: (video id, entry) pairs, in id order.
Group = list[tuple[str, dict[str, Any]]]


# -- errors ------------------------------------------------------------------------------------


class CacheError(RuntimeError):
    """A cache is missing, damaged, incomplete or was written with other settings, or cannot be
    written; the message names the file, the reason and the videos concerned."""


class Stale(Exception):
    """A pack changed or vanished since this process indexed it (another process compacted or
    rewrote it); the index is rebuilt and the read retried."""


class Damaged(Exception):
    """A pack file is missing, short or not what was written, or an entry does not match its
    sha1. ``path``: the file; ``video``: the entry, or None when the whole pack is affected;
    ``pack`` and ``ids`` (the videos affected) are filled in by the index, which knows what a
    pack holds."""

    def __init__(self, path: Path, reason: str, video: str | None = None) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.video = path, reason, video
        self.pack = ""
        self.ids: list[str] = [video] if video is not None else []

    def message(self) -> str:
        """'<file>: <reason>; videos affected: ...'."""
        return f"{self.path}: {self.reason}; {ids_text(self.ids)}"


def ids_text(ids: Iterable[str]) -> str:
    """'videos affected: 'a', 'b' (2)', the first SHOW_IDS of them."""
    ids = sorted(set(ids))
    if not ids:
        return "videos affected: unknown (their index is unreadable)"
    shown = ", ".join(repr(v) for v in ids[:SHOW_IDS])
    more = f" and {len(ids) - SHOW_IDS} more" if len(ids) > SHOW_IDS else ""
    return f"videos affected: {shown}{more} ({len(ids)})"


def write_error(path: Path, e: OSError, what: str) -> CacheError:
    """The CacheError for a failed write of ``what`` to ``path``, saying when the disk is full."""
    full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    why = e.strerror or str(e)
    hint = " (disk full or file size limit)" if full else ""
    return CacheError(f"{path}: cannot write {what}: {why}{hint}")


# -- ids, names and entries --------------------------------------------------------------------


def valid_id(video_id: str) -> bool:
    """Ids are '/'-separated paths (``walking/clip_01``, see pipeline.manifest.path_id); a pack
    stores them only as JSON keys and files are named by a hash (``unit_name``), so '/' and any
    Unicode letter are safe. Refused, as no manifest id holds them: an empty component, one that
    starts with "." (so "." and ".."), control characters, and lone surrogates (text that is not
    UTF-8: the hash and the JSON header need its bytes)."""
    if not isinstance(video_id, str) or not video_id:
        return False
    if any(not part or part.startswith(".") for part in video_id.split("/")):
        return False
    # the control characters (Unicode Cc) and the surrogates (Cs)
    return not any(c < " " or "\x7f" <= c <= "\x9f" or "\ud800" <= c <= "\udfff" for c in video_id)


def sha1(text: str) -> str:
    """Hex sha1 of ``text``'s UTF-8 bytes."""
    return hashlib.sha1(text.encode()).hexdigest()


def unit_name(video_id: str) -> str:
    """The name of the unit pack that holds ``video_id`` alone."""
    # Hashed, not the id itself: ids may hold characters a file name should not, and a fixed
    # width keeps packs/ tidy. 64 bits: no collision in any realistic dataset.
    return UNIT + sha1(video_id)[:16]


def compact_name(group: Group, codec: str) -> str:
    """Name from the content identity: ids, shapes, dtypes, data digests, metas, format and
    codec (a backend's compression). Equal name <=> equal bytes, so an existing pack of that
    name is kept."""
    identity = {
        "format": FORMAT,
        "codec": codec,
        "videos": [[v, e["shape"], e["dtype"], e["digest"], e["meta"]] for v, e in group],
    }
    return COMPACT + sha1(json.dumps(identity, sort_keys=True))[:16]


def chunk_elems(dtype: np.dtype, n: int) -> int:
    """Inner chunk length in elements: ~1 MiB, never longer than the array (HDF5 requires it)."""
    return max(1, min(CHUNK_BYTES // dtype.itemsize, n))


def nbytes(entry: Mapping[str, Any]) -> int:
    """Uncompressed size of an entry's array."""
    return math.prod(entry["shape"]) * np.dtype(entry["dtype"]).itemsize


def norm(d: Mapping[str, Any]) -> dict[str, Any]:
    """JSON round trip with sorted keys, so tuples and lists (and int/float keys) compare equal
    after storage and whatever is stored from it is written in one key order."""
    return json.loads(json.dumps(dict(d), sort_keys=True, default=str))


def diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """'key.sub: old -> new' for every (nested) key whose value differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


# -- sealed JSON: a sha1 of its own text inside it --------------------------------------------

_NO_DIGEST = "0" * 40  # the digest's place holder while the digest is computed


def render(doc: Any) -> str:
    """The one JSON rendering of every document this package writes."""
    return json.dumps(doc, indent=1, sort_keys=True)


def _digest_key(depth: int) -> str:
    # With indent=1 a key at nesting depth d is the only text after a newline and d spaces:
    # this finds the holder's "digest" and no other.
    return "\n" + " " * depth + '"digest": "'


def seal(doc: dict[str, Any], holder: dict[str, Any], depth: int) -> str:
    """``doc`` as JSON text in which ``holder["digest"]`` (``holder``: ``doc`` or a dict at
    nesting ``depth`` in it) is the sha1 of the text itself, with the digest blanked."""
    holder["digest"] = _NO_DIGEST
    text = render(doc)
    key = _digest_key(depth) + _NO_DIGEST
    assert text.count(key) == 1, "the digest must be findable in the text"
    return text.replace(key, _digest_key(depth) + sha1(text))


def unseal(raw: bytes, depth: int) -> dict[str, Any]:
    """Check and parse a document written by ``seal`` -> the document (its digest left in).
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
    if sha1(text[:at] + _NO_DIGEST + text[at + 40 :]) != digest:
        raise ValueError("its bytes differ from those written (sha1 mismatch)")
    try:
        return json.loads(text)
    except ValueError as e:  # cannot happen once the digest matched, but never read garbage
        raise ValueError(f"not readable JSON ({e})") from None


# -- cache.json ---------------------------------------------------------------------------------


def new_doc(backend: str, attrs: dict[str, Any], packs: list[dict[str, Any]]) -> dict[str, Any]:
    """A cache.json document of this format."""
    return {"format": FORMAT, "backend": backend, "attrs": attrs, "packs": packs}


def _declared_format(raw: bytes) -> object:
    """The ``format`` a document that failed its seal check declares, or None if it declares
    none. Read only to word the message: an unsealed document says nothing trustworthy."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc.get("format") if isinstance(doc, dict) else None


def load_doc(root: Path) -> tuple[dict[str, Any] | None, str | None]:
    """cache.json -> (document, None), or (None, what is wrong with it)."""
    try:
        raw = (root / DOC).read_bytes()
    except FileNotFoundError:
        return None, "missing"
    try:
        doc = unseal(raw, 1)
    except ValueError as e:
        # Another format need not be sealed as this one is (format 1 was not): name its
        # version rather than call it damaged. (A flipped bit that turns the "2" itself into
        # another digit reads as that format: the cache is started over all the same.)
        declared = _declared_format(raw)
        if isinstance(declared, int) and declared != FORMAT:
            return None, f"format {declared}, this code reads format {FORMAT}"
        return None, f"damaged: {e}"
    if doc.get("format") != FORMAT:
        return None, f"format {doc.get('format')!r}, this code reads format {FORMAT}"
    packs = doc.get("packs")
    if doc.get("backend") not in BACKENDS or not isinstance(packs, list):
        return None, "damaged: no known backend or no list of packs"
    return doc, None


def write_doc(root: Path, doc: dict[str, Any]) -> None:
    """Replace cache.json atomically (a reader sees the old or the new one, never half)."""
    tmp = root / f"{DOC}.{os.getpid()}.tmp"
    try:
        write_file(tmp, seal(doc, doc, 1).encode())
        fsync_one(tmp)
        os.replace(tmp, root / DOC)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(tmp, e, f"{DOC} (the old one is unchanged)") from None
    fsync_one(root)  # the rename itself, before packs the old cache.json listed are deleted
