"""What the tests of pipeline/cache (tests/test_cache*.py) share: deterministic videos, a filled
cache, a cache's files as bytes, and ways to damage one part of a cache."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache import FeatureCache, open_cache

ROOT = Path(__file__).resolve().parents[1]
ATTRS = {"backbone": "resnet18", "crop": 64, "flow": {"bound": 20, "algorithm": "tvl1"}}
BACKENDS = ["zarr", "hdf5"]
IDS = [f"v_{i:03d}" for i in range(200)]

DAMAGES = ["delete", "truncate", "zero", "flip"]
# data: the shard (zarr) or the HDF5 data after the user block; header: zarr.json or the HDF5
# user block (the pack's index); doc: cache.json
TARGETS = ["data", "header", "doc"]
DAMAGE_IDS = [f"d_{i:02d}" for i in range(20)]  # packs of 3, 8, 7 and 2 videos
VICTIM = "d_09"  # in the second pack
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # where an HDF5 pack's user block (its header) ends


def video(video_id: str) -> np.ndarray:
    """A deterministic (T, 16) float16 array per id, T depending on the id."""
    seed = zlib.crc32(video_id.encode())
    rng = np.random.default_rng(seed)
    return rng.normal(size=(3 + seed % 5, 16)).astype(np.float16)


def fill(path: Path, ids: list[str], backend: str, attrs: dict = ATTRS, **kw: Any) -> None:
    """A compacted cache of ``video(id)`` for each id, with meta {"source": "sha-<id>"}."""
    with open_cache(path, "w", attrs=attrs, backend=backend, **kw) as c:
        for v in ids:
            c.write(v, video(v), {"source": f"sha-{v}"})


def cache_files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def pack_names(root: Path) -> list[str]:
    """The file names under ``root/packs``."""
    return sorted(p.name for p in (root / "packs").iterdir())


def suffix(backend: str) -> str:
    """A pack's file name suffix on ``backend``."""
    return ".zarr" if backend == "zarr" else ".h5"


def victim_pack(root: Path) -> tuple[str, list[str]]:
    """(name, videos) of the pack that holds VICTIM (white-box: the cache's index)."""
    with open_cache(root, "r") as c:
        name = c._index[VICTIM][0]
        return name, sorted(v for v, (n, _) in c._index.items() if n == name)


def damaged_part(root: Path, backend: str, target: str) -> tuple[Path, int, int]:
    """The file to damage and the byte range [lo, hi) of the part ``target`` names."""
    if target == "doc":
        f = root / "cache.json"
        return f, 0, f.stat().st_size
    name, _ = victim_pack(root)
    if backend == "zarr":
        f = root / "packs" / f"{name}.zarr" / ("c/0" if target == "data" else "zarr.json")
        return f, 0, f.stat().st_size
    f = root / "packs" / f"{name}.h5"
    start = f.read_bytes().find(HDF5_SIGNATURE)
    assert start >= 512, "an HDF5 pack starts with its user block"
    return (f, start, f.stat().st_size) if target == "data" else (f, 0, start)


def damage_file(f: Path, lo: int, hi: int, how: str, at: float = 0.5) -> None:
    """Damage bytes [lo, hi) of ``f``: delete the file, truncate it inside the range, zero the
    range or flip one bit at fraction ``at`` of it."""
    data = bytearray(f.read_bytes())
    if how == "delete":
        f.unlink()
        return
    if how == "truncate":
        data = data[: lo + (hi - lo) // 2]  # cut inside the part
    elif how == "zero":
        data[lo:hi] = bytes(hi - lo)
    else:
        i = lo + round((hi - lo - 1) * at)
        data[i] ^= 1 << (i % 8)
    f.write_bytes(bytes(data))


def read_everything(root: Path) -> None:
    """Read every video of the cache at ``root`` (CacheError when anything is damaged)."""
    with open_cache(root, "r") as c:
        for v in c.keys():
            c.read(v)


def resume(root: Path, backend: str, ids: list[str]) -> set[str]:
    """What the flow and features stages do: keep the sound up-to-date entries, write the rest."""
    with open_cache(root, "a", attrs=ATTRS, backend=backend, videos_per_pack=8) as c:
        done = c.up_to_date({v: f"sha-{v}" for v in ids}, verify=True)
        for v in ids:
            if v not in done:
                c.write(v, video(v), {"source": f"sha-{v}"})
    return done


def forge(c: FeatureCache, video_id: str, wrong: np.ndarray) -> None:
    """White-box: a unit pack whose files are consistent (sizes, CRCs) but whose data is not
    what the entry's sha1 says: damage that happened before the pack was written."""
    name = next(n for n, videos in c._units.items() if video_id in videos)
    entry = dict(c._units[name][video_id])
    c._write_pack(name, np.ascontiguousarray(wrong).reshape(-1), {video_id: entry}, durable=False)
