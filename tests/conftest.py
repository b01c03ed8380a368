"""Shared fixtures: the real test clips in ../shared/testdata (never copied into the repo)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"
T = TypeVar("T")


def slow_cases(values: Sequence[T], slow: Collection[T]) -> list:
    """``values`` for ``@pytest.mark.parametrize`` with the cases in ``slow`` marked slow, so
    that a parametrized test keeps its quick cases in the quick tier (`bash scripts/run.sh
    quick`). A name in ``slow`` that is not a case is an error: a renamed case must not move
    to the quick tier unnoticed."""
    unknown = [v for v in slow if v not in values]
    if unknown:
        raise ValueError(f"slow_cases: {unknown} are not among the cases {list(values)}")
    return [pytest.param(v, marks=pytest.mark.slow) if v in slow else v for v in values]


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The shared test-data folder; tests that need it skip when it is absent."""
    if not TESTDATA.is_dir():
        pytest.skip(f"{TESTDATA} is absent: the real test files live in ../shared/testdata")
    return TESTDATA


@pytest.fixture(scope="session")
def videos(testdata: Path) -> Path:
    """The real test clips (see ../shared/testdata/README.md)."""
    path = testdata / "videos"
    if not path.is_dir():
        pytest.skip(f"{path} is absent: the real test videos live in ../shared/testdata/videos")
    return path


@pytest.fixture(params=["zarr", "hdf5"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each cache backend in turn (the tests of pipeline/cache run on both); a test that
    parametrizes ``backend`` itself overrides this."""
    return request.param


@pytest.fixture
def cache_path(tmp_path: Path) -> Path:
    """Where a cache test makes its cache."""
    return tmp_path / "cache"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread. The tests' tensors are tiny, and on a small shared CPU
    two threads contending for two busy cores made an LSTM step 15x slower than one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def torchrun() -> Callable[[int], list[str]]:
    """The command prefix that starts N local ranks (``python -m torch.distributed.run``) on a
    free port; append ``-m stages.<stage> ...``."""

    def command(ranks: int) -> list[str]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_addr", "127.0.0.1", "--master_port", str(port),
        ]  # fmt: skip

    return command


@pytest.fixture
def file_bytes() -> Callable[[Path], dict[str, bytes]]:
    """Every file under a folder by relative path, with its bytes (to compare caches exactly)."""

    def read(root: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }

    return read


def prepare_tiny_demo(root: Path, decode_cfg: object | None = None) -> Path:
    """prepare + decode of a 24-video demo (12 frames at 32 px) under ``root``; by default 8
    points with 2 flow pairs. Returns ``root`` (with prepare/ and decode/)."""
    from pipeline.config import DatasetConfig, DecodeConfig, DemoConfig
    from stages import decode, prepare

    demo = DemoConfig(videos_per_class=4, frames=12, size=32)
    prepare.main(DatasetConfig(name="demo", demo=demo, probe_workers=1), root / "prepare")
    decode.main(
        decode_cfg or DecodeConfig(num_frames=8, flow_pairs=2, short_side=32, workers=1),
        manifest=root / "prepare/manifest.csv",
        probe=root / "prepare/probe.csv",
        out=root / "decode",
    )
    return root


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-video demo at 32 px, prepared and decoded to 8 points with 2 flow pairs."""
    return prepare_tiny_demo(tmp_path_factory.mktemp("tiny"))


def kill_when_cached(
    cmd: list[str], cache: Path, *, videos: int = 3, env: dict | None = None
) -> int:
    """Start ``python cmd`` (a stage) in the repository and SIGKILL its process group once its
    cache at ``cache`` holds ``videos`` finished videos -> the number it holds after the kill."""
    from pipeline.cache import open_cache

    proc = subprocess.Popen(
        [sys.executable, *cmd], cwd=Path(__file__).resolve().parents[1], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline, n = time.time() + 120, 0
    while time.time() < deadline and n < videos:
        if (cache / "cache.json").exists():
            with open_cache(cache, "r") as c:
                n = len(c)
        if n < videos:
            assert proc.poll() is None, f"{cmd[:2]} finished before it could be interrupted"
            time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with open_cache(cache, "r") as c:
        return len(c)


def random_clips(b: int, c: int = 3, t: int = 16, size: int = 32, seed: int = 0):  # noqa: ANN201
    """Seeded random clips (b, c, t, size, size) float32 for the 3D backbones."""
    import torch

    return torch.randn(b, c, t, size, size, generator=torch.Generator().manual_seed(seed))


def assert_close_rel(got, want, rtol: float = 1e-4) -> None:  # noqa: ANN001
    """Close relative to the size of ``want``: a randomly initialised S3D in eval mode has
    features of ~1e-6, under any absolute tolerance, so an absolute check could not fail."""
    import torch

    scale = want.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale)


@pytest.fixture(scope="session")
def tiny_repro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project with its DAG reproduced (tests/dvc_project.py), built once per session;
    never change it: take a copy (``dvc_project.copy_project``)."""
    from dvc_project import build_project

    return build_project(tmp_path_factory.mktemp("tiny_repro") / "proj")
