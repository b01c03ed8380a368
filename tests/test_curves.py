"""Tests for pipeline/curves.py, the training curves written with dvclive, on train logs
written by hand; and, on a copy of the tiny DVC project (slow), that `dvc plots show` draws
the curves of every train stage beside the confusion matrix, that `dvc metrics show` prints
the summary only in a terminal's width, and that every output of the train and evaluate
stages is in DVC's cache (it travels with a push and a pull: /data/ is git-ignored)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from dvc_project import copy_project, run

from pipeline.curves import CurvesError, curve_points, write_curves


def _epoch(stage: str, epoch: int, lr: float, loss: float) -> dict:
    return {"stage": stage, "epoch": epoch, "lr": lr, "loss": loss}


# split 1: two pretraining epochs (a reconstruction loss) at a constant learning rate, then
# three supervised ones whose learning rate halves each epoch; split 2: supervised only
LOG = {
    "head": "rtsae",
    "stream": "rgb",
    "splits": {
        "1": {
            "test_top1": 0.5,
            "epochs": [
                _epoch("pretrain", 0, 1.0, 250.0),
                _epoch("pretrain", 1, 1.0, 125.5),
                _epoch("train", 0, 0.001, 1.75),
                _epoch("train", 1, 0.0005, 1.25),
                _epoch("train", 2, 0.00025, 0.5),
            ],
        },
        "2": {"epochs": [_epoch("train", 0, 0.001, 1.5), _epoch("train", 1, 0.0005, 1.0)]},
    },
}


def _files(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_the_curves_are_one_file_per_split_stage_and_quantity_by_hand(tmp_path: Path) -> None:
    written = write_curves(LOG, tmp_path / "curves")
    m = "plots/metrics"
    # step counts a split's epochs over its stages: training starts where pretraining ended;
    # pretraining's constant learning rate has no curve
    assert _files(tmp_path / "curves") == {
        f"{m}/split1/pretrain/loss.tsv": "step\tloss\n0\t250.0\n1\t125.5\n",
        f"{m}/split1/train/loss.tsv": "step\tloss\n2\t1.75\n3\t1.25\n4\t0.5\n",
        f"{m}/split1/train/lr.tsv": "step\tlr\n2\t0.001\n3\t0.0005\n4\t0.00025\n",
        f"{m}/split2/train/loss.tsv": "step\tloss\n0\t1.5\n1\t1.0\n",
        f"{m}/split2/train/lr.tsv": "step\tlr\n0\t0.001\n1\t0.0005\n",
    }  # and nothing else: no summary, report, dvc.yaml or timestamp that a re-run would change
    assert written == sorted(tmp_path.joinpath("curves", m).rglob("*.tsv"))


def test_the_curves_are_byte_identical_when_written_again(
    tmp_path: Path, file_bytes: Callable[[Path], dict[str, bytes]]
) -> None:
    write_curves(LOG, tmp_path / "a")
    write_curves(LOG, tmp_path / "b")
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")


def test_writing_again_replaces_the_curves_of_splits_no_longer_there(tmp_path: Path) -> None:
    write_curves(LOG, tmp_path)
    one = {"splits": {"2": LOG["splits"]["2"]}}
    write_curves(one, tmp_path)
    assert sorted(_files(tmp_path)) == [
        "plots/metrics/split2/train/loss.tsv",
        "plots/metrics/split2/train/lr.tsv",
    ]


def test_curves_are_written_in_a_git_repository_without_a_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`git init; dvc init; dvc repro` before the first commit: dvclive's Live opened the
    repository and raised scmrepo's SCMError("Empty git repo")."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    write_curves(LOG, Path("curves"))
    assert (tmp_path / "curves/plots/metrics/split2/train/loss.tsv").is_file()
    assert not (tmp_path / ".dvc").exists()  # nor did it `dvc init` the repository


def test_the_validation_curve_has_a_file_of_its_own_where_the_log_has_it(tmp_path: Path) -> None:
    """train_log.json's val_top1 (out-of-fold models' held-out top-1 per epoch)."""
    log = {"splits": {"1": {"epochs": [
        {**_epoch("train", 0, 0.001, 1.5), "val_top1": 0.25},
        {**_epoch("train", 1, 0.001, 1.0), "val_top1": 0.5},
    ]}}}  # fmt: skip
    write_curves(log, tmp_path / "c")
    assert _files(tmp_path / "c") == {
        "plots/metrics/split1/train/loss.tsv": "step\tloss\n0\t1.5\n1\t1.0\n",
        "plots/metrics/split1/train/val_top1.tsv": "step\tval_top1\n0\t0.25\n1\t0.5\n",
    }


def test_curve_points_count_steps_over_stages() -> None:
    points = curve_points(LOG)
    assert [(s, stage) for s, stage, *_ in points["1"]] == [
        (0, "pretrain"),
        (1, "pretrain"),
        (2, "train"),
        (3, "train"),
        (4, "train"),
    ]
    assert points["2"][1] == (1, "train", 1.0, 0.0005, None)


@pytest.mark.parametrize(
    ("log", "message"),
    [
        ({"head": "lstm"}, "train log has no splits"),
        ({"splits": {"1": {"loss_first": 1.0}}}, "split 1 has no 'epochs' records"),
        ({"splits": {"a/b": LOG["splits"]["2"]}}, "'a/b' cannot name a curve file"),
    ],
)
def test_a_log_without_epochs_is_an_error_naming_the_split(log: dict, message: str) -> None:
    with pytest.raises(CurvesError, match=message):
        curve_points(log)


# -- the tiny DVC project: dvc plots show, dvc metrics show, the cache ----------------------

MODELS = ("mean_pool-rgb", "mean_pool-flow", "lstm-rgb", "lstm-flow", "mean_pool-rgb+flow")


@pytest.fixture(scope="module")
def project(tiny_repro: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_project(tiny_repro, tmp_path_factory.mktemp("curves") / "proj")


@pytest.mark.slow
def test_dvc_plots_show_draws_every_train_stages_curves_and_the_confusion_matrix(
    project: Path,
) -> None:
    shown = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)
    assert not shown.get("errors"), shown["errors"]
    plots = shown["data"]
    for model in MODELS:
        log = json.loads((project / "data/train" / model / "train_log.json").read_text())
        epochs = log["splits"]["1"]["epochs"]  # the tiny project: one split, 3 epochs
        [plot] = plots[f"data/curves/{model}/plots/metrics/split1/train/loss.tsv"]
        assert plot["type"] == "vega"
        # one curve: the split's epochs as train_log.json has them, x the step
        points = plot["content"]["data"]["values"]
        assert [int(p["step"]) for p in points] == [0, 1, 2]
        assert [float(p["loss"]) for p in points] == [e["loss"] for e in epochs]
        assert plot["content"]["encoding"]["x"]["field"] == "step"
        # the out-of-fold models' validation curve (train.oof_folds 2 in the tiny project)
        [val] = plots[f"data/curves/{model}/plots/metrics/split1/train/val_top1.tsv"]
        got = [float(p["val_top1"]) for p in val["content"]["data"]["values"]]
        assert got == [e["val_top1"] for e in epochs]
    assert plots["data/evaluate/confusion.csv"][0]["type"] == "vega"
    assert plots["data/evaluate/confusion.png"][0]["type"] == "image"
    # nothing else of the curves folders is a plot (the tiny project's lr is constant)
    assert len({p for p in plots if p.startswith("data/curves/")}) == 2 * len(MODELS)


@pytest.mark.slow
def test_the_stage_curves_are_what_the_writer_gives_for_its_train_log(
    project: Path, tmp_path: Path, file_bytes: Callable[[Path], dict[str, bytes]]
) -> None:
    for model in MODELS:
        log = json.loads((project / "data/train" / model / "train_log.json").read_text())
        write_curves(log, tmp_path / model)
        assert file_bytes(tmp_path / model) == file_bytes(project / "data/curves" / model)


@pytest.mark.slow
def test_dvc_metrics_show_lists_the_summary_only_in_a_terminals_width(project: Path) -> None:
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    [rev] = shown.values()
    names = {Path(p).name for p in rev["data"]}
    assert {Path(p).parent.as_posix() for p in rev["data"]} == {"data/evaluate/summary"}
    assert names == {f"{m}.json" for m in MODELS} | {
        "mean_pool-fused.json",
        "lstm-fused.json",
        "best.json",
    }
    table = run(["dvc", "metrics", "show"], project).stdout.splitlines()
    assert len(table) == 1 + len(names)  # a header and a row per model
    assert max(map(len, table)) <= 200, "\n".join(table)
    assert table[0].split() == ["Path", "mean_class", "model", "top1"]  # one split: no std


@pytest.mark.slow
def test_every_train_and_evaluate_output_comes_back_from_the_dvc_cache(project: Path) -> None:
    """/data/ is git-ignored: an output with `cache: false` is in neither git nor the cache,
    and a clone's `dvc pull` (here: `dvc checkout` from the cache) could not bring it back."""
    gone = [project / "data" / d for d in ("evaluate", "curves")]
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)  # the old code wrote no curves
    run(["dvc", "checkout"], project)
    assert (project / "data/evaluate/metrics.json").is_file()
    assert (project / "data/evaluate/summary/best.json").is_file()
    assert (project / "data/evaluate/confusion.png").is_file()
    assert (project / "data/curves/lstm-rgb/plots/metrics/split1/train/loss.tsv").is_file()
    assert json.loads(run(["dvc", "status", "--json"], project).stdout or "{}") == {}
