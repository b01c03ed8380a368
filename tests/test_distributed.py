"""Tests for pipeline/distributed.py in a one-process world: the protocol the flow and features
stages share (open the shared cache, take the videos not done, write or fail each, finish).
Several ranks under torchrun: tests/test_stages.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import open_cache
from pipeline.config import DEFAULT_CACHE
from pipeline.distributed import sharded_run
from pipeline.runner import Counts, Failure, read_failures
from pipeline.world import World

IDS = ["a", "b", "c"]
SOURCES = {k: f"sha-{k}" for k in IDS}


def _run(cache: Path):  # noqa: ANN202 - the context manager under test
    return sharded_run(
        World(), cache, ids=IDS, sources=SOURCES, attrs={"kind": "test"}, cache_cfg=DEFAULT_CACHE
    )


def _entry(k: str) -> np.ndarray:
    return np.full((2, 3), IDS.index(k), dtype=np.float16)


def test_a_run_writes_records_failures_and_the_next_run_does_only_the_rest(
    tmp_path: Path,
) -> None:
    with _run(tmp_path / "cache") as run:
        assert run.todo == IDS and run.done == set()
        run.write("a", _entry("a"), {"source": SOURCES["a"]})
        run.fail(Failure("b", "b.avi", "test", "ValueError: broken"))
        run.write("c", _entry("c"), {"source": SOURCES["c"]})
    assert run.finish("test", tmp_path / "failures.csv") == Counts(done=2, skipped=0, failed=1)
    assert read_failures(tmp_path / "failures.csv") == [
        Failure("b", "b.avi", "test", "ValueError: broken")
    ]
    with open_cache(tmp_path / "cache", "r") as c:
        assert c.keys() == ["a", "c"]
        np.testing.assert_array_equal(c.read("c"), _entry("c"))

    with _run(tmp_path / "cache") as again:
        assert again.todo == ["b"] and again.done == {"a", "c"}
        again.write("b", _entry("b"), {"source": SOURCES["b"]})
    assert again.finish("test", tmp_path / "failures.csv") == Counts(1, 2, 0)
    assert read_failures(tmp_path / "failures.csv") == []


def test_a_run_stopped_by_an_error_keeps_what_it_wrote_for_the_resume(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="disk full"), _run(tmp_path / "cache") as run:
        run.write("a", _entry("a"), {"source": SOURCES["a"]})
        raise OSError("disk full")
    with _run(tmp_path / "cache") as again:
        assert again.done == {"a"} and again.todo == ["b", "c"]
        for k in again.todo:
            again.write(k, _entry(k), {"source": SOURCES[k]})
    with open_cache(tmp_path / "cache", "r") as c:
        assert c.keys() == IDS


def test_a_run_where_no_video_succeeds_stops_the_stage(tmp_path: Path) -> None:
    with _run(tmp_path / "cache") as run:
        for k in run.todo:
            run.fail(Failure(k, f"{k}.avi", "test", "ValueError: broken"))
    with pytest.raises(SystemExit, match="no video succeeded"):
        run.finish("test", tmp_path / "failures.csv")
