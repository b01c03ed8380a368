"""Tests for pipeline/cache/layout.py: video ids, sealed JSON, and the format version as the one
gate for cache.json and pack headers (an artifact of another format is named and redone)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from cache_helpers import ATTRS, cache_files, fill, pack_names, suffix

from pipeline.cache import CacheError, open_cache
from pipeline.cache.layout import FORMAT, seal, unseal
from pipeline.cache.storage import HDF5Storage, _userblock


# '/' is allowed (ids are paths under the dataset root: tests/test_ids.py); empty and "."-led
# components, control characters and lone surrogates are not
@pytest.mark.parametrize(
    "bad", ["", "/a", "a/", "a//b", "a/../b", ".x", ".tmp", "..", "a\nb", "\udce9"]
)
def test_invalid_ids_are_rejected(cache_path: Path, backend: str, bad: str) -> None:
    with open_cache(cache_path, "w", attrs=ATTRS, backend=backend) as c:
        with pytest.raises(CacheError, match="invalid video id") as e:
            c.write(bad, np.ones(2))
        assert str(e.value).startswith(str(cache_path))
        assert c.keys() == []


def test_a_cache_json_of_the_older_format_is_named_then_started_over(
    cache_path: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    fill(cache_path, ["a"], backend)
    (cache_path / "cache.json").write_text(
        json.dumps({"format": 1, "backend": backend, "attrs": ATTRS, "packs": []})
    )
    with pytest.raises(CacheError, match=r"cache.json: format 1, this code reads format 2"):
        open_cache(cache_path, "r")
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        with open_cache(cache_path, "a", attrs=ATTRS, backend=backend) as c:
            assert c.keys() == []
    assert "format 1, this code reads format 2" in caplog.text
    assert "starting the cache over" in caplog.text


def test_every_changed_byte_of_a_sealed_document_is_found() -> None:
    doc = {"format": FORMAT, "attrs": {"crop": 64, "name": "бег"}, "packs": [{"name": "p-1"}]}
    want = json.loads(json.dumps(doc))
    raw = seal(doc, doc, 1).encode()
    got = unseal(raw, 1)
    assert len(got.pop("digest")) == 40 and got == want  # the digest is left in
    for i in range(len(raw)):
        for bit in range(8):
            changed = bytearray(raw)
            changed[i] ^= 1 << bit
            with pytest.raises(ValueError):
                unseal(bytes(changed), 1)


def _set_pack_format(pack: Path, backend: str, version: int) -> None:
    """Rewrite a pack's header as a sound one of format ``version`` (sealed anew)."""
    if backend == "zarr":
        meta = unseal((pack / "zarr.json").read_bytes(), 2)
        meta["attributes"]["vidfeat"]["format"] = version
        (pack / "zarr.json").write_bytes(seal(meta, meta["attributes"], 2).encode())
    else:
        raw = pack.read_bytes()
        size = int(raw.split(b"\n", 1)[0].split()[1])
        header = {**HDF5Storage().header(pack), "format": version}
        block = _userblock(header, size)
        assert block is not None
        pack.write_bytes(block + raw[size:])


@pytest.mark.parametrize("version", [1, FORMAT + 1])
def test_a_pack_of_another_format_is_not_read_and_is_redone(
    tmp_path: Path, backend: str, version: int, caplog: pytest.LogCaptureFixture
) -> None:
    fresh, root = tmp_path / "fresh", tmp_path / "other"
    fill(fresh, ["a", "b", "c"], backend)
    fill(root, ["a", "b", "c"], backend)
    (pack,) = pack_names(root)
    assert pack.endswith(suffix(backend))
    _set_pack_format(root / "packs" / pack, backend, version)
    with pytest.raises(CacheError, match=f"not a pack header of format {FORMAT}") as e:
        open_cache(root, "r")
    assert pack in str(e.value) and "'a', 'b', 'c'" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        with open_cache(root, "a", attrs=ATTRS, backend=backend) as c:
            assert c.keys() == []  # its videos are recomputed
            for v in ["a", "b", "c"]:
                c.write(v, np.asarray(open_cache(fresh, "r").read(v)), {"source": f"sha-{v}"})
    assert f"not a pack header of format {FORMAT}" in caplog.text
    assert cache_files(root) == cache_files(fresh)
