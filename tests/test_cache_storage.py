"""Tests for pipeline/cache/storage.py: the only importer of zarr and h5py; a chunk missing from a
shard is damage, never zeros; a full disk, in a write or in compaction, is a CacheError naming
the file, and the cache stays resumable."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cache_helpers import ATTRS, ROOT, cache_files, pack_names

import pipeline.cache.storage
from pipeline.cache import CacheError, open_cache


def test_only_the_storage_module_imports_zarr_or_h5py() -> None:
    importers = set()
    for path in sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(n.split(".")[0] in ("zarr", "h5py") for n in names):
                importers.add(str(path.relative_to(ROOT)))
    assert importers == {"pipeline/cache/storage.py"}


def test_a_chunk_missing_from_a_shard_is_an_error_not_zeros(
    cache_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Zarr reads an inner chunk that the shard index marks missing as fill values."""
    x = np.zeros((3, 1 << 19), np.float16)  # three 1 MiB chunks, the first two all zeros
    x[2] = 1
    with open_cache(cache_path, "w", attrs=ATTRS, backend="zarr") as c:
        c.write("v", x)
    (pack,) = pack_names(cache_path)
    tail = (cache_path / "packs" / pack / "c" / "0").read_bytes()[-(16 * 3 + 4) :]
    offsets = np.frombuffer(tail[:-4], "<u8").reshape(3, 2)
    assert (offsets != np.iinfo(np.uint64).max).all()  # written: all-zero chunks too

    zarr = pipeline.cache.storage.zarr  # the one module that imports zarr
    real = zarr.create_array

    def without_empty_chunks(*args: object, **kw: object) -> object:
        return real(*args, **{**kw, "config": {"write_empty_chunks": False}})

    monkeypatch.setattr(zarr, "create_array", without_empty_chunks)
    missing = r"c/0: inner chunks \[0, 1\] of 3 are missing"
    with open_cache(cache_path, "w", attrs=ATTRS, backend="zarr") as c:
        c.write("v", x)
        c.close(compact=False)
    with pytest.raises(CacheError, match=missing) as e:
        open_cache(cache_path, "r").read("v")
    assert "'v'" in str(e.value)
    with pytest.raises(CacheError, match=missing):  # nor is it compacted
        open_cache(cache_path, "a", attrs=ATTRS, backend="zarr").close()


_FULL_DISK_WRITER = """
import resource, signal, sys
import numpy as np
from pipeline.cache import open_cache

path, backend, limit, big = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "big"
# Files may not grow past ``limit`` bytes: a write beyond fails with EFBIG, as on a full disk,
# inside the real write path. SIGXFSZ would kill the process instead: ignore it.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
with open_cache(path, "w", attrs={}, backend=backend, videos_per_pack=64) as c:
    for i in range(30):  # incompressible, ~4 kB each: a unit pack fits, a pack of 30 does not
        x = np.random.default_rng(i).integers(0, 256, (4, 1024), dtype=np.uint8)
        c.write(f"v{i:02d}", x, {"source": str(i)})
    if big:  # a unit pack over the limit
        c.write("v99", np.random.default_rng(99).integers(0, 256, (64, 1024), dtype=np.uint8))
print("no error", file=sys.stderr)
"""


@pytest.mark.parametrize("when", ["write", "compaction"])
def test_a_full_disk_names_the_file_and_leaves_a_resumable_cache(
    tmp_path: Path, backend: str, when: str
) -> None:
    root = tmp_path / "cache"
    run = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_WRITER, str(root), backend, str(32 << 10),
         "big" if when == "write" else "small"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-2000:]  # an exception, not a crash (h5py: SIGSEGV)
    last = run.stderr.strip().splitlines()[-1]
    pack = "v-" if when == "write" else "p-"
    assert last.startswith("pipeline.cache.CacheError: "), last
    assert f"{root}/.tmp/{pack}" in last and "File too large" in last, last
    assert not (root / ".tmp").exists()  # the partial file is gone
    ids = [f"v{i:02d}" for i in range(30)]
    with open_cache(root, "r") as c:  # what was written before is there and sound
        assert c.keys() == ids
        for v in ids:
            c.read(v, verify=True)
    with open_cache(root, "a", attrs={}, backend=backend, videos_per_pack=64) as c:
        assert c.up_to_date({v: str(i) for i, v in enumerate(ids)}, verify=True) == set(ids)
        if when == "write":
            c.write("v99", np.random.default_rng(99).integers(0, 256, (64, 1024), dtype=np.uint8))
    fresh = tmp_path / "fresh"
    with open_cache(fresh, "w", attrs={}, backend=backend, videos_per_pack=64) as c:
        for i, v in enumerate(ids):
            c.write(
                v,
                np.random.default_rng(i).integers(0, 256, (4, 1024), dtype=np.uint8),
                {"source": str(i)},
            )
        if when == "write":
            c.write("v99", np.random.default_rng(99).integers(0, 256, (64, 1024), dtype=np.uint8))
    assert cache_files(root) == cache_files(fresh)
