"""A stage's DVC outputs are byte-identical when its inputs and params are (issue 11, point 6).

DVC hashes every output; a byte that differs between two runs of the same inputs (a timing, a
date, an absolute path, an order taken from a set) gives a new hash, so dvc.lock changes and
every stage downstream re-runs for nothing. These tests run the tail of the DAG (train on both
streams, fuse, evaluate) twice on the same synthetic caches, the second time on a clock that
runs 1000x slower, and compare every output file byte by byte."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import open_cache
from pipeline.config import EvaluateConfig, FusionConfig, RunConfig, TrainConfig
from pipeline.manifest import Manifest, VideoRecord, write_manifest
from stages import evaluate, fuse, train

# Each test runs stages (train with out-of-fold scores, the SVM fusion, the confusion PNG).
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

RUN = RunConfig(heads=("mean_pool",), streams=("rgb", "flow"))


@pytest.fixture
def slow_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Calling it makes every later time.time / time.perf_counter reading 1000 s after the one
    before, as on a machine that is very slow: output that depends on how long a run took
    then differs for certain, not only when the two runs happen to differ by 10 ms."""

    def slow() -> None:
        now = [time.time()]

        def tick() -> float:
            now[0] += 1000.0
            return now[0]

        monkeypatch.setattr(time, "time", tick)
        monkeypatch.setattr(time, "perf_counter", tick)

    return slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A manifest (3 classes x 6 videos, one split) and an rgb and a flow features cache of
    (5, 8) float16 sequences whose mean carries the label, so every model learns something
    and the fused and evaluated scores are not all ties."""
    root = tmp_path_factory.mktemp("inputs")
    videos = [
        VideoRecord(
            video_id=f"c{c}_v{i}",
            path=root / f"c{c}_v{i}.avi",
            label=c,
            group=f"c{c}_v{i}",
            splits=("test" if i >= 4 else "train",),
        )
        for c in range(3)
        for i in range(6)
    ]
    write_manifest(
        Manifest(classes=("look_a", "motion_b", "order_c"), split_names=("1",), videos=videos),
        root / "manifest.csv",
    )
    rng = np.random.default_rng(0)
    for stream in ("rgb", "flow"):
        attrs = {"dim": 8, "backbone": "synthetic"}
        with open_cache(root / "features" / stream / "cache", "w", attrs=attrs) as c:
            for v in videos:
                x = rng.normal(size=(5, 8))
                x[:, v.label] += 2.0
                c.write(v.video_id, x.astype(np.float16), {"source": "x"})
    yield root


def _run_tail(inputs: Path, out: Path) -> None:
    """train@mean_pool-{rgb,flow}, fuse and evaluate, as dvc.yaml chains them, under ``out``."""
    for stream in RUN.streams:
        train.main(
            "mean_pool",
            stream,
            head_params={"epochs": 3, "batch_size": 4},
            cfg=TrainConfig(oof_folds=2, threads=1),
            features=[inputs / "features" / stream],
            manifest=inputs / "manifest.csv",
            out=out / "train" / f"mean_pool-{stream}",
        )
    fuse.main(
        FusionConfig(svm_c=(0.1, 1.0), svm_folds=2), RUN, scores=out / "train", out=out / "fuse"
    )
    evaluate.main(
        EvaluateConfig(class_groups={"motion": ("motion_",)}),
        RUN,
        scores=out / "train",
        fused=out / "fuse",
        manifest=inputs / "manifest.csv",
        out=out / "evaluate",
    )


def test_train_fuse_evaluate_outputs_are_byte_identical_on_a_rerun_however_long_it_takes(
    inputs: Path,
    tmp_path: Path,
    slow_clock: Callable[[], None],
    file_bytes: Callable[[Path], dict[str, bytes]],
) -> None:
    _run_tail(inputs, tmp_path / "first")
    slow_clock()
    _run_tail(inputs, tmp_path / "second")
    first, second = file_bytes(tmp_path / "first"), file_bytes(tmp_path / "second")
    # every declared output is there: weights, scores and train_log.json of both streams,
    # one fused table per method, and each file evaluate writes
    assert {p.split("/")[0] for p in first} == {"train", "fuse", "evaluate"}
    assert "train/mean_pool-rgb/train_log.json" in first
    assert "train/mean_pool-flow/model_split1.pt" in first
    assert {f"fuse/mean_pool-{m}/scores.csv" for m in FusionConfig().methods} <= set(first)
    assert {f"evaluate/{f}" for f in ("metrics.json", "confusion.png", "results.md")} <= set(first)
    assert sorted(first) == sorted(second)
    differ = [p for p in first if first[p] != second[p]]
    assert not differ, f"outputs that changed on a re-run of the same inputs: {differ}"
