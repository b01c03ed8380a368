"""Resumed flow and features stages re-check the entries they keep (stages/flow.py,
stages/features.py, pipeline/distributed.py): a damaged shard, pack file or cache.json is found,
each damaged video is logged with the file, and those videos are recomputed, so the cache ends
byte-identical to an undamaged run. A full disk stops the stage with the file and the reason, and
the next run resumes."""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.cache import open_cache
from pipeline.config import CacheConfig, FlowConfig, StreamFeaturesConfig
from stages import features, flow

# Every test runs the flow or features stage on a damaged cache (two under torchrun).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FLOW = FlowConfig(algorithm="farneback", workers=1)
R18 = StreamFeaturesConfig(backbone="resnet18", weights="none", crop=32, batch_size=16, threads=1)
BACKENDS = ["zarr", "hdf5"]
VICTIM_AT = 9  # the 10th video (sorted): in the second pack (of 8)


def _packs(backend: str) -> CacheConfig:
    return CacheConfig(backend=backend, videos_per_pack=8)


@pytest.fixture(scope="module")
def flow_caches(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An undamaged flow stage output per backend: the reference for the resumed ones."""
    root = tmp_path_factory.mktemp("flow")
    plan = tiny_demo / "decode" / "plan.json"
    for backend in BACKENDS:
        flow.main(FLOW, plan_path=plan, out=root / backend, cache_cfg=_packs(backend))
    return {backend: root / backend for backend in BACKENDS}


def _victim(cache: Path) -> tuple[str, list[str], str]:
    """A video, the videos of its pack and the pack's name (white-box: the cache's index)."""
    with open_cache(cache, "r") as c:
        vid = c.keys()[VICTIM_AT]
        name = c._index[vid][0]
        return vid, sorted(v for v, (n, _) in c._index.items() if n == name), name


def _damage(cache: Path, backend: str, target: str, how: str) -> Path:
    """Damage the victim's shard or HDF5 data ("data"), its zarr.json or HDF5 user block
    ("header") or cache.json ("doc"): delete, truncate, zero-fill or flip one bit -> the file."""
    _, _, name = _victim(cache)
    lo = 0
    if target == "doc":
        f = cache / "cache.json"
    elif backend == "zarr":
        f = cache / "packs" / f"{name}.zarr" / ("c/0" if target == "data" else "zarr.json")
    else:
        f = cache / "packs" / f"{name}.h5"
    data = bytearray(f.read_bytes())
    hi = len(data)
    if backend == "hdf5" and target != "doc":
        start = data.find(b"\x89HDF\r\n\x1a\n")  # the user block (header) ends here
        lo, hi = (start, hi) if target == "data" else (0, start)
    if how == "delete":
        f.unlink()
    elif how == "truncate":
        f.write_bytes(bytes(data[: (lo + hi) // 2]))
    elif how == "zero":
        f.write_bytes(bytes(data[:lo]) + bytes(hi - lo) + bytes(data[hi:]))
    else:
        i = (lo + hi) // 2
        data[i] ^= 1 << (i % 8)
        f.write_bytes(bytes(data))
    return f


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "target, how",
    [("data", "flip"), ("data", "delete"), ("header", "truncate"), ("header", "zero"),
     ("doc", "flip"), ("doc", "delete")],
)  # fmt: skip
def test_resumed_flow_recomputes_the_damaged_videos(
    tiny_demo: Path,
    tmp_path: Path,
    flow_caches: dict[str, Path],
    file_bytes: Callable[[Path], dict[str, bytes]],
    caplog: pytest.LogCaptureFixture,
    backend: str,
    target: str,
    how: str,
) -> None:
    out = tmp_path / "flow"
    shutil.copytree(flow_caches[backend], out)  # a finished run, then damaged
    vid, pack, _ = _victim(out / "cache")
    f = _damage(out / "cache", backend, target, how)
    with caplog.at_level(logging.WARNING):
        counts = flow.main(
            FLOW, plan_path=tiny_demo / "decode" / "plan.json", out=out, cache_cfg=_packs(backend)
        )
    lost = 24 if target == "doc" else len(pack)  # cache.json takes every video with it
    assert (counts.done, counts.skipped, counts.failed) == (lost, 24 - lost, 0)
    assert str(f) in caplog.text and f"'{vid}'" in caplog.text  # the file and the video
    assert file_bytes(out / "cache") == file_bytes(flow_caches[backend] / "cache")


@pytest.mark.parametrize("backend", BACKENDS)
def test_resumed_features_recompute_a_video_whose_pack_has_a_flipped_bit(
    tiny_demo: Path,
    tmp_path: Path,
    file_bytes: Callable[[Path], dict[str, bytes]],
    caplog: pytest.LogCaptureFixture,
    backend: str,
) -> None:
    fresh, out = tmp_path / "fresh", tmp_path / "resumed"
    dec = tiny_demo / "decode"
    features.main(R18, stream="rgb", source=dec, out=fresh, cache_cfg=_packs(backend))
    shutil.copytree(fresh, out)
    vid, pack, _ = _victim(out / "cache")
    f = _damage(out / "cache", backend, "data", "flip")
    with caplog.at_level(logging.WARNING):
        counts = features.main(R18, stream="rgb", source=dec, out=out, cache_cfg=_packs(backend))
    assert (counts.done, counts.skipped) == (len(pack), 24 - len(pack))
    assert str(f) in caplog.text and f"damaged video '{vid}'" in caplog.text
    assert file_bytes(out / "cache") == file_bytes(fresh / "cache")


def _file_size_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:  # in the child, before exec: files may not grow past ``limit``
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills it at the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


@pytest.mark.parametrize("backend", BACKENDS)
def test_flow_on_a_full_disk_names_the_file_and_the_next_run_resumes(
    tiny_demo: Path,
    tmp_path: Path,
    flow_caches: dict[str, Path],
    file_bytes: Callable[[Path], dict[str, bytes]],
    backend: str,
) -> None:
    """Writes over 16 kB fail with EFBIG, as on a full disk: every per-video pack fits, the
    compacted packs of 8 videos do not, so the stage fails at its end, in compaction."""
    params = tmp_path / "params.yaml"
    params.write_text(
        f"flow: {{algorithm: farneback, workers: 1}}\n"
        f"cache: {{backend: {backend}, videos_per_pack: 8}}\n"
    )
    out = tmp_path / "flow"
    run = subprocess.run(
        [sys.executable, "-m", "stages.flow", "--params", str(params),
         "--plan", str(tiny_demo / "decode" / "plan.json"), "--out", str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True,
        text=True, timeout=300, preexec_fn=_file_size_limit(16 << 10),
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-3000:]  # an error, not a crash
    last = run.stderr.strip().splitlines()[-1]
    # one line, naming the file and the reason (no trace to dig it out of)
    assert last.startswith(f"flow: {out / 'cache' / '.tmp'}/p-"), last
    assert "File too large" in last and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert not (out / "cache" / ".tmp").exists()  # no partial file left
    with open_cache(out / "cache", "r") as c:  # every video is in, as a unit pack
        assert len(c) == 24
    counts = flow.main(
        FLOW, plan_path=tiny_demo / "decode" / "plan.json", out=out, cache_cfg=_packs(backend)
    )
    assert (counts.done, counts.skipped) == (0, 24)
    assert file_bytes(out / "cache") == file_bytes(flow_caches[backend] / "cache")


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_torchrun_ranks_resume_a_damaged_flow_cache_to_the_same_bytes(
    tiny_demo: Path,
    tmp_path: Path,
    flow_caches: dict[str, Path],
    torchrun: Callable[[int], list[str]],
    file_bytes: Callable[[Path], dict[str, bytes]],
    backend: str,
) -> None:
    """Rank 0 checks the kept entries and tells rank 1 which are done: both shard the same
    remaining videos (had rank 1 thought the damaged pack's videos done, none would redo its
    share of them)."""
    params = tmp_path / "params.yaml"
    params.write_text(
        f"flow: {{algorithm: farneback, workers: 1}}\n"
        f"cache: {{backend: {backend}, videos_per_pack: 8}}\n"
    )
    out = tmp_path / "flow"
    shutil.copytree(flow_caches[backend], out)
    vid, pack, _ = _victim(out / "cache")
    f = _damage(out / "cache", backend, "data", "flip")
    run = subprocess.run(
        [*torchrun(2), "-m", "stages.flow", "--params", str(params),
         "--plan", str(tiny_demo / "decode" / "plan.json"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{f}: " in run.stderr and f"damaged video '{vid}'" in run.stderr
    assert f"flow: {len(pack)} done, {24 - len(pack)} already done" in run.stderr
    assert file_bytes(out / "cache") == file_bytes(flow_caches[backend] / "cache")
