"""predict (pipeline/predict.py, stages/predict.py) on the tiny repro: the demo's own split-1 test
videos, predicted from their files, get the train stage's test scores and the fuse stage's
fused scores; real clips get a result row, a corrupt file a row with its reason.

Tolerances: the stages' score tables are CSV with 6 significant digits (``%.6g``), so a
probability (< 1) read back is within 5e-7 of the float32 it was: atol 1e-6 for the models'
probabilities (measured: 5.0e-7 at most). The fused scores are computed by predict from the
unrounded probabilities, where the fuse stage fused the rounded ones: sums, weights and
log-products move by the same relative 1e-6 (rtol 1e-5); an SVM's decision values by that
rounding (of the L2-normalised scores, ~1.2e-6) times the L1 norm of a class's coefficients
(at most 43 here, C = 100): 5e-5 at most, atol 1e-4 (measured 2.1e-5)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from dvc_project import copy_project

from pipeline.cache import open_cache
from pipeline.predict import predict_videos
from pipeline.predict_features import new_video_features, read_run_features
from pipeline.scores import read_scores
from stages import predict as predict_stage

pytestmark = pytest.mark.slow

CLIPS = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "videos"
REAL = [CLIPS / "test.avi", CLIPS / "example.avi"]
CORRUPT = CLIPS / "corrupted.mp4"


@pytest.fixture(scope="module")
def proj(tiny_repro: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_project(tiny_repro, tmp_path_factory.mktemp("predict") / "proj")


def _test_videos(proj: Path) -> tuple[list[str], list[Path]]:
    """The split-1 test videos of the demo: ids (as the train stage's scores.csv) and files."""
    ids = read_scores(proj / "data/train/mean_pool-rgb/scores.csv").select(split="1", subset="test")
    plan = json.loads((proj / "data/decode/plan.json").read_text())["videos"]
    return ids.video_id, [proj / plan[v]["path"] for v in ids.video_id]


def _rows(path: Path, ids: list[str]) -> np.ndarray:
    t = read_scores(path).select(split="1", subset="test")
    row = {v: i for i, v in enumerate(t.video_id)}
    return t.scores[[row[v] for v in ids]]


def test_features_of_the_demo_videos_are_the_caches_to_the_bit(proj: Path) -> None:
    run = proj / "data"
    ids, paths = _test_videos(proj)
    rf = read_run_features(
        run, ["rgb", "flow"], batch_sizes=predict_stage.batch_sizes(proj / "params.yaml")
    )
    feats, failed = new_video_features(
        rf, dict(zip(ids, paths, strict=True)), device=torch.device("cpu"), workdir=proj / "tmp"
    )
    assert failed == {}
    for s in ("rgb", "flow"):
        with open_cache(run / "features" / s / "cache", "r") as c:
            for v in ids:
                np.testing.assert_array_equal(feats[s][v], c.read(v))


@pytest.mark.parametrize("fusion", ["sum", "product", "svm", "learned"])
def test_predictions_of_the_demo_test_videos_are_the_stages_scores(proj: Path, fusion: str) -> None:
    run = proj / "data"
    ids, paths = _test_videos(proj)
    preds = predict_videos(
        paths,
        run=run,
        head="mean_pool",
        fusion=fusion,
        splits=["1"],
        device="cpu",
        batch_sizes=predict_stage.batch_sizes(proj / "params.yaml"),
    )
    assert [p.status for p in preds] == ["ok"] * len(ids)
    for name in ("rgb", "flow", "rgb+flow"):  # every model of the head, joint included
        got = np.stack([p.per_split["1"][name] for p in preds])
        want = _rows(run / "train" / f"mean_pool-{name}" / "scores.csv", ids)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    got = np.stack([p.per_split["1"]["fused"] for p in preds])
    want = _rows(run / "fuse" / f"mean_pool-{fusion}" / "scores.csv", ids)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    fin = np.isfinite(want)
    spec = json.loads((run / "fuse" / f"mean_pool-{fusion}" / "fusion.json").read_text())
    svm = "svm" in (spec["splits"]["1"]["rule"], spec["splits"]["1"].get("kind"))
    tol = {"rtol": 0, "atol": 1e-4} if svm else {"rtol": 1e-5, "atol": 1e-6}
    np.testing.assert_allclose(got[fin], want[fin], **tol)
    # the reported label is the fusion's top class; probabilities (float32) sum to 1
    for p, w in zip(preds, want, strict=True):
        assert p.top()[0][0] == p.classes[int(np.argmax(w))]
        assert p.probs is not None and abs(p.probs.sum() - 1) < 1e-6


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_the_cli_predicts_real_clips_and_gives_the_corrupt_file_its_reason(
    proj: Path, tmp_path: Path
) -> None:
    run = proj / "data"
    predict_stage.cli(["--run", str(run), "--out", str(tmp_path), *map(str, [*REAL, CORRUPT])])
    rows = _csv(tmp_path / "predictions.csv")
    js = json.loads((tmp_path / "predictions.json").read_text())
    classes = json.loads((run / "prepare" / "manifest.csv").read_text().splitlines()[0][9:])
    head, fusion = json.loads((run / "evaluate" / "metrics.json").read_text())[
        "confusion_of"
    ].split("/")
    assert [r["path"] for r in rows] == [str(p) for p in [*REAL, CORRUPT]]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    for r, j in zip(rows[:2], js[:2], strict=True):
        assert (r["head"], r["fusion"], r["splits"]) == (head, fusion, "1")  # the evaluation's pick
        assert r["label"] in classes and r["label"] == r["top1"] == j["label"]
        probs = [float(r[f"top{k}_probability"]) for k in range(1, 6)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
        assert len({r[f"top{k}"] for k in range(1, 6)}) == 5
        assert {"rgb", "flow"} <= set(j["streams"])
        assert r["rgb_label"] in classes and 0 < float(r["flow_probability"]) <= 1
    bad = rows[2]
    assert bad["reason"].startswith(f"{CORRUPT}: ") and "decod" in bad["reason"]
    assert bad["label"] == "" and js[2]["status"] == "failed"


def test_a_folder_and_a_csv_list_give_the_same_rows(proj: Path, tmp_path: Path) -> None:
    run = proj / "data"
    folder = tmp_path / "videos"
    folder.mkdir()
    for p in [*REAL, CORRUPT]:
        shutil.copy(p, folder / p.name)
    (tmp_path / "list.csv").write_text("path\nvideos/test.avi\nvideos/corrupted.mp4\n")
    common = ["--run", str(run), "--head", "mean_pool", "--fusion", "sum", "--split", "1"]
    predict_stage.cli([*common, "--out", str(tmp_path / "a"), "--folder", str(folder)])
    predict_stage.cli([*common, "--out", str(tmp_path / "b"), "--csv", str(tmp_path / "list.csv")])
    a = {Path(r["path"]).name: r for r in _csv(tmp_path / "a" / "predictions.csv")}
    b = {Path(r["path"]).name: r for r in _csv(tmp_path / "b" / "predictions.csv")}
    assert sorted(a) == ["corrupted.mp4", "example.avi", "test.avi"]
    assert sorted(b) == ["corrupted.mp4", "test.avi"]
    assert a["test.avi"]["status"] == "ok" and a["corrupted.mp4"]["status"] == "failed"
    assert {k: v for k, v in a["test.avi"].items() if k != "path"} == {
        k: v for k, v in b["test.avi"].items() if k != "path"
    }
    assert (a["test.avi"]["fusion"], a["test.avi"]["rgb+flow_label"] != "") == ("sum", True)


def test_a_run_without_its_plan_is_refused_naming_the_file(proj: Path, tmp_path: Path) -> None:
    run = tmp_path / "data"
    shutil.copytree(proj / "data", run, symlinks=True)
    (run / "decode" / "plan.json").unlink()
    with pytest.raises(SystemExit, match=r"predict: .*decode/plan.json: cannot read"):
        predict_stage.cli(["--run", str(run), "--out", str(tmp_path / "o"), str(REAL[0])])


def test_an_unreadable_params_file_is_said_not_silently_defaulted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The features batch size decides the features' last bits on the CPU: without the run's
    params.yaml it defaults, and the log says so, naming the file."""
    missing = tmp_path / "params.yaml"
    with caplog.at_level("WARNING"):
        assert predict_stage.batch_sizes(missing) == {}
    assert str(missing) in caplog.text and "last bits" in caplog.text
    missing.write_text("features: {rgb: {batch_size: 8}, flow: {batch_size: 4}}\n")
    assert predict_stage.batch_sizes(missing) == {"rgb": 8, "flow": 4}
