"""Shared fixtures: the real test clips in ../shared/testdata (never copied into the repo)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"


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
