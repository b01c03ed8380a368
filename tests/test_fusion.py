import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

from pipeline import fusion_svm
from pipeline.config import FusionConfig, RunConfig
from pipeline.fusing import aligned, aligned_windows, fuse_score_dir, fuse_scores, fuse_tables
from pipeline.fusion import FUSIONS
from pipeline.fusion_svm import SvmRows, cv_splits, svm_cv, svm_features, svm_fuse, window_svm_fuse
from pipeline.scores import (
    ScoreTable,
    WindowScores,
    concat,
    read_scores,
    write_scores,
    write_window_scores,
)
from stages import fuse as fuse_stage

# Two videos, three classes. Video 0: sum picks class 0, product picks class 1 (rgb gives class 2
# exactly 0, which exercises the log floor).
RGB = np.array([[0.95, 0.05, 0.00], [0.10, 0.60, 0.30]])
FLOW = np.array([[0.01, 0.60, 0.39], [0.30, 0.30, 0.40]])
GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def test_fusions_tuple() -> None:
    assert FUSIONS == ("sum", "product", "weighted", "svm", "learned")


def test_sum_by_hand() -> None:
    fused = fuse_scores("sum", {"rgb": RGB, "flow": FLOW})
    np.testing.assert_allclose(fused, [[0.96, 0.65, 0.39], [0.40, 0.90, 0.70]])
    assert fused.argmax(axis=1).tolist() == [0, 1]


def test_product_by_hand_is_log_of_product() -> None:
    fused = fuse_scores("product", {"rgb": RGB, "flow": FLOW})
    expected = np.log(
        [[0.95 * 0.01, 0.05 * 0.60, 1e-12 * 0.39], [0.10 * 0.30, 0.60 * 0.30, 0.30 * 0.40]]
    )
    np.testing.assert_allclose(fused, expected)
    # Product and sum disagree on video 0: the product punishes rgb's 0.05 less than flow's 0.01.
    assert fused.argmax(axis=1).tolist() == [1, 1]


def test_product_does_not_underflow_with_200_streams() -> None:
    rng = np.random.default_rng(0)
    num_classes, winner = 50, 7
    streams = {}
    for s in range(200):
        logits = rng.normal(scale=0.05, size=(1, num_classes))
        logits[0, winner] += 0.1
        p = np.exp(logits)
        streams[f"s{s:03d}"] = p / p.sum(axis=1, keepdims=True)
    stacked = np.stack(list(streams.values()))
    assert np.all(np.prod(stacked, axis=0) == 0.0)  # the naive product underflows for every class
    fused = fuse_scores("product", streams)
    assert np.all(np.isfinite(fused))
    np.testing.assert_allclose(fused, np.log(stacked).sum(axis=0))
    assert fused.argmax(axis=1).tolist() == [winner]
    assert fused[0, winner] < -700  # far below log of the smallest float64


def test_weighted_flips_sum_decision() -> None:
    rgb = np.array([[0.70, 0.30]])
    flow = np.array([[0.35, 0.65]])
    summed = fuse_scores("sum", {"rgb": rgb, "flow": flow})
    weighted = fuse_scores(
        "weighted", {"rgb": rgb, "flow": flow}, weights={"flow": 1.5, "rgb": 1.0}
    )
    np.testing.assert_allclose(summed, [[1.05, 0.95]])
    np.testing.assert_allclose(weighted, [[0.70 + 0.525, 0.30 + 0.975]])
    assert summed.argmax() == 0
    assert weighted.argmax() == 1


def test_weighted_needs_weights_for_every_stream() -> None:
    with pytest.raises(ValueError, match="flow"):
        fuse_scores("weighted", {"rgb": RGB, "flow": FLOW}, weights={"rgb": 1.0})
    with pytest.raises(ValueError, match="weights"):
        fuse_scores("weighted", {"rgb": RGB, "flow": FLOW})


def test_shape_errors_name_the_stream() -> None:
    with pytest.raises(ValueError, match="'rgb'.*1 videos"):
        fuse_scores("sum", {"rgb": RGB[:1], "flow": FLOW})
    with pytest.raises(ValueError, match="'rgb'.*2 classes"):
        fuse_scores("sum", {"rgb": RGB[:, :2], "flow": FLOW})
    with pytest.raises(ValueError, match="'flow'.*shape"):
        fuse_scores("sum", {"rgb": RGB, "flow": FLOW[0]})
    with pytest.raises(ValueError, match="no streams"):
        fuse_scores("sum", {})
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse_scores("max", {"rgb": RGB})


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _complementary_streams(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """4 classes; rgb cannot tell 0 from 1, flow cannot tell 2 from 3; each is sure of the rest."""
    rng = np.random.default_rng(seed)
    y = np.tile(np.arange(4), n // 4)
    rgb = rng.normal(scale=0.3, size=(n, 4))
    flow = rng.normal(scale=0.3, size=(n, 4))
    for i, label in enumerate(y):
        if label in (0, 1):
            rgb[i, [0, 1]] += 3.0  # both confusable classes high, which one wins is noise
            flow[i, label] += 3.0
        else:
            rgb[i, label] += 3.0
            flow[i, [2, 3]] += 3.0
    return {"rgb": _softmax(rgb), "flow": _softmax(flow)}, y


def test_svm_beats_each_stream_on_complementary_streams() -> None:
    train, y_train = _complementary_streams(120, seed=1)
    test, y_test = _complementary_streams(200, seed=2)
    fused, chosen = svm_fuse(test, train=train, train_labels=y_train, c_grid=GRID, folds=3, seed=0)
    assert fused.shape == (200, 4)
    assert chosen in GRID
    acc = {name: np.mean(s.argmax(axis=1) == y_test) for name, s in test.items()}
    fused_acc = np.mean(fused.argmax(axis=1) == y_test)
    assert 0.6 < acc["rgb"] < 0.9 and 0.6 < acc["flow"] < 0.9  # each stream really is ambiguous
    assert fused_acc >= 0.95
    assert fused_acc > max(acc.values()) + 0.1
    # fuse_scores gives the same decision values, and the seed makes it deterministic.
    again = fuse_scores("svm", test, train=train, train_labels=y_train, svm_c_grid=GRID, seed=0)
    np.testing.assert_array_equal(again, fused)


def test_svm_cross_validation_rejects_underfitting_c() -> None:
    # Imbalanced classes: with C = 1e-4 the SVM collapses to the majority class (CV accuracy
    # 40/56), so cross-validation must pick C = 1, not the first (or smallest) grid value.
    rng = np.random.default_rng(0)
    y = np.array([0] * 40 + [1] * 8 + [2] * 8)
    streams = {}
    for name in ("rgb", "flow"):
        z = rng.normal(scale=0.5, size=(len(y), 3))
        z[np.arange(len(y)), y] += 1.5
        streams[name] = _softmax(z)
    _, chosen = svm_fuse(streams, train=streams, train_labels=y, c_grid=(1e-4, 1.0), folds=3)
    assert chosen == 1.0
    _, only = svm_fuse(streams, train=streams, train_labels=y, c_grid=(1e-4,))
    assert only == 1e-4


def test_svm_binary_gives_two_columns() -> None:
    rng = np.random.default_rng(3)
    y = np.tile([0, 1], 20)
    streams = {}
    for name in ("rgb", "flow"):
        z = rng.normal(scale=0.3, size=(40, 2))
        z[np.arange(40), y] += 2.0
        streams[name] = _softmax(z)
    fused, chosen = svm_fuse(streams, train=streams, train_labels=y, c_grid=(0.1, 10.0), folds=3)
    assert fused.shape == (40, 2)
    assert chosen in (0.1, 10.0)
    np.testing.assert_allclose(fused[:, 0], -fused[:, 1])
    assert np.mean(fused.argmax(axis=1) == y) == 1.0


def test_svm_class_absent_from_training_gets_minus_inf() -> None:
    train, y_train = _complementary_streams(60, seed=4)
    keep = y_train != 3
    train = {k: v[keep] for k, v in train.items()}
    test, _ = _complementary_streams(8, seed=5)
    fused, _ = svm_fuse(test, train=train, train_labels=y_train[keep], c_grid=(1.0,))
    assert np.all(fused[:, 3] == -np.inf)
    assert np.all(np.isfinite(fused[:, :3]))


def test_svm_shrinks_folds_for_small_classes() -> None:
    train, y_train = _complementary_streams(8, seed=6)  # 2 videos per class, asked for 5 folds
    test, _ = _complementary_streams(4, seed=7)
    fused, chosen = svm_fuse(test, train=train, train_labels=y_train, c_grid=GRID, folds=5)
    assert fused.shape == (4, 4) and chosen in GRID


def test_svm_errors_on_missing_or_bad_train_data() -> None:
    train, y_train = _complementary_streams(20, seed=8)
    with pytest.raises(ValueError, match="train"):
        fuse_scores("svm", train)
    with pytest.raises(ValueError, match="train_labels"):
        fuse_scores("svm", train, train=train)
    with pytest.raises(ValueError, match="train_labels"):
        fuse_scores("svm", train, train=train, train_labels=y_train[:-1])
    with pytest.raises(ValueError, match="streams"):
        fuse_scores("svm", train, train={"rgb": train["rgb"]}, train_labels=y_train)
    with pytest.raises(ValueError, match="'flow'.*3 classes"):
        bad = {"rgb": train["rgb"], "flow": train["flow"][:, :3]}
        fuse_scores("svm", train, train=bad, train_labels=y_train)
    with pytest.raises(ValueError, match="2 classes"):
        fuse_scores("svm", train, train=train, train_labels=np.zeros(20, dtype=int))


# -- the fuse stage's tables: fuse_tables, fuse_score_dir (pipeline/fusion.py) ---------------


def _rows(split: str, subset: str, ids: list[str], labels: list[int], s: np.ndarray) -> ScoreTable:
    n = len(ids)
    return ScoreTable([split] * n, [subset] * n, ids, np.array(labels), np.asarray(s, float))


def _head_tables(seed: int = 0) -> dict[str, ScoreTable]:
    """rgb and flow tables of split 1: 12 train videos (both classes) and test videos t0 (class
    0), t1 (class 1), t2 (class 1); flow misses t2 and lists t1 before t0."""
    rng = np.random.default_rng(seed)
    tr_ids, tr_labels = [f"r{i:02d}" for i in range(12)], [i % 2 for i in range(12)]
    tests = {
        "rgb": _rows("1", "test", ["t0", "t1", "t2"], [0, 1, 1], [*RGB[:, :2], [0.5, 0.5]]),
        "flow": _rows("1", "test", ["t1", "t0"], [1, 0], FLOW[[1, 0], :2]),
    }
    return {
        stream: concat(
            [
                _rows(
                    "1",
                    "train",
                    tr_ids,
                    tr_labels,
                    _softmax(rng.normal(size=(12, 2)) + 2 * np.eye(2)[tr_labels]),
                ),
                test,
            ]
        )
        for stream, test in tests.items()
    }


def test_aligned_keeps_the_videos_every_stream_has_in_one_order() -> None:
    ids, labels, streams = aligned(_head_tables(), "1", "test")
    assert ids == ["t0", "t1"] and labels.tolist() == [0, 1]
    np.testing.assert_array_equal(streams["rgb"], RGB[:2, :2])
    np.testing.assert_array_equal(streams["flow"], FLOW[:2, :2])  # reordered to t0, t1


def test_fuse_tables_fuses_each_head_with_two_streams_and_records_the_svm_c() -> None:
    cfg = FusionConfig(svm_c=(0.1, 1.0), svm_folds=2)
    fused = fuse_tables(cfg, {"h": _head_tables(), "solo": {"rgb": _head_tables()["rgb"]}})
    assert sorted(fused.tables) == [("h", m) for m in sorted(cfg.methods)]  # solo: skipped
    s = fused.tables[("h", "sum")]
    assert s.video_id == ["t0", "t1"] and s.subset == ["test", "test"]
    np.testing.assert_allclose(s.scores, RGB[:2, :2] + FLOW[:2, :2])
    w = fused.tables[("h", "weighted")].scores
    np.testing.assert_allclose(w, RGB[:2, :2] + 1.5 * FLOW[:2, :2])
    assert list(fused.svm_c) == ["h"] and fused.svm_c["h"]["1"] in (0.1, 1.0)


def test_fuse_score_dir_reads_the_runs_streams_and_writes_a_table_per_method(
    tmp_path: Path,
) -> None:
    tables = _head_tables()
    for stream, t in {**tables, "rgb+flow": tables["rgb"]}.items():
        write_scores(tmp_path / "train" / f"h-{stream}" / "scores.csv", t)
    out = tmp_path / "fuse"
    fused = fuse_score_dir(
        cfg=FusionConfig(methods=("sum", "svm"), svm_c=(1.0,)),
        run=RunConfig(heads=("h",), streams=("rgb", "flow"), joint_heads=("h",)),
        scores=tmp_path / "train",
        out=out,
    )
    assert sorted(p.name for p in out.iterdir()) == ["h-sum", "h-svm", "svm_c.json"]
    assert json.loads((out / "svm_c.json").read_text()) == {"h": {"1": 1.0}}
    back = read_scores(out / "h-sum" / "scores.csv")
    assert back.video_id == fused.tables[("h", "sum")].video_id
    np.testing.assert_allclose(back.scores, fused.tables[("h", "sum")].scores, rtol=1e-5)


def test_the_fuse_stage_names_a_missing_score_table_in_one_line(tmp_path: Path) -> None:
    write_scores(tmp_path / "train" / "h-rgb" / "scores.csv", _head_tables()["rgb"])
    with pytest.raises(SystemExit) as e:
        fuse_stage.main(
            FusionConfig(),
            RunConfig(heads=("h",), streams=("rgb", "flow")),
            scores=tmp_path / "train",
            out=tmp_path / "fuse",
        )
    assert str(e.value).startswith("fuse: ") and "h-flow/scores.csv: no scores" in str(e.value)


# -- per-recurrence SVM fusion (pipeline/fusion_svm.py window_svm_fuse, TSRNN sec. IV-C (a)) --

# eq. 7 gains l/M of M = 3 windows, as float32 (window_scores.npz stores them so)
GAINS = (np.arange(1, 4) / 3).astype(np.float32).astype(np.float64)


def _window_streams(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """{stream: (n, 3, 3) window probabilities}: later windows carry more of the label."""
    rng = np.random.default_rng(seed)
    y = np.tile(np.arange(3), n // 3)
    out = {}
    for name in ("rgb", "flow"):
        z = rng.normal(size=(n, 3, 3))
        z += np.eye(3)[y][:, None, :] * np.array([0.3, 0.8, 1.5])[None, :, None]
        out[name] = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return out, y


def _hand_rows(streams: dict[str, np.ndarray]) -> np.ndarray:
    """(n, M, C) per stream -> (n * M, S * C) rows: video-major, streams sorted (flow, rgb),
    each window's score vector L2-normalised."""
    parts = [
        streams[s] / np.linalg.norm(streams[s], axis=-1, keepdims=True) for s in ("flow", "rgb")
    ]
    x = np.concatenate(parts, axis=-1)
    return x.reshape(-1, x.shape[-1])


def _hand_decision(model: LinearSVC, streams: dict[str, np.ndarray]) -> np.ndarray:
    d = model.decision_function(_hand_rows(streams)).reshape(-1, 3, 3)
    return (d * GAINS[None, :, None]).sum(1) / GAINS.sum()


def test_window_svm_is_one_linear_svc_on_the_video_window_rows() -> None:
    train, y = _window_streams(60, seed=0)
    test, _ = _window_streams(12, seed=1)
    fused, c = window_svm_fuse(test, weights=GAINS, train=train, train_labels=y, c_grid=(1.0,))
    ref = LinearSVC(C=1.0, random_state=0, max_iter=20_000).fit(_hand_rows(train), np.repeat(y, 3))
    assert c == 1.0 and fused.shape == (12, 3)
    np.testing.assert_allclose(fused, _hand_decision(ref, test), rtol=1e-10)


def test_window_svm_chooses_c_by_folds_over_videos() -> None:
    train, y = _window_streams(48, seed=2)
    test, _ = _window_streams(6, seed=3)
    grid = (1e-3, 0.1, 10.0)
    fused, c = window_svm_fuse(
        test, weights=GAINS, train=train, train_labels=y, c_grid=grid, folds=3, seed=0
    )
    cv = {}
    for cc in grid:
        accs = []
        for tr, va in StratifiedKFold(3, shuffle=True, random_state=0).split(np.zeros(48), y):
            part = {s: a[tr] for s, a in train.items()}
            held = {s: a[va] for s, a in train.items()}
            model = LinearSVC(C=cc, random_state=0, max_iter=20_000)
            model.fit(_hand_rows(part), np.repeat(y[tr], 3))
            accs.append(np.mean(_hand_decision(model, held).argmax(1) == y[va]))
        cv[cc] = np.mean(accs)
    best = min(cc for cc in grid if cv[cc] == max(cv.values()))
    assert c == best
    ref = LinearSVC(C=best, random_state=0, max_iter=20_000).fit(_hand_rows(train), np.repeat(y, 3))
    np.testing.assert_allclose(fused, _hand_decision(ref, test), rtol=1e-10)


def test_window_svm_errors_name_the_stream() -> None:
    train, y = _window_streams(12, seed=4)
    bad = {"rgb": train["rgb"], "flow": train["flow"][:, :2]}
    with pytest.raises(ValueError, match="'flow'.*expected \\(N, 3, C\\)"):
        window_svm_fuse(train, weights=GAINS, train=bad, train_labels=y)
    with pytest.raises(ValueError, match="window weights"):
        window_svm_fuse(train, weights=-GAINS, train=train, train_labels=y)


def _windows_table(
    streams: dict[str, np.ndarray], split: str, subset: str, ids: list[str], y: np.ndarray
) -> dict[str, WindowScores]:
    n = len(ids)
    return {
        s: WindowScores([split] * n, [subset] * n, ids, y, a, GAINS) for s, a in streams.items()
    }


def test_the_fuse_stage_uses_the_per_recurrence_svm_where_every_stream_has_windows(
    tmp_path: Path,
) -> None:
    train, y = _window_streams(30, seed=5)
    test, y_test = _window_streams(9, seed=6)
    tr_ids, te_ids = [f"r{i:02d}" for i in range(30)], [f"t{i}" for i in range(9)]
    root = tmp_path / "train"
    for head in ("win", "plain"):
        for s in ("rgb", "flow"):
            video = {
                k: (a * GAINS[None, :, None]).sum(1) / GAINS.sum()
                for k, a in ((0, train[s]), (1, test[s]))
            }
            write_scores(
                root / f"{head}-{s}" / "scores.csv",
                concat(
                    [
                        _rows("1", "train", tr_ids, list(y), video[0]),
                        _rows("1", "test", te_ids, list(y_test), video[1]),
                    ]
                ),
            )
            if head == "win":
                w = [
                    _windows_table(train, "1", "train", tr_ids, y)[s],
                    _windows_table(test, "1", "test", te_ids, y_test)[s],
                ]
                write_window_scores(
                    root / f"{head}-{s}" / "window_scores.npz",
                    WindowScores(
                        [*w[0].split, *w[1].split], [*w[0].subset, *w[1].subset],
                        [*w[0].video_id, *w[1].video_id], np.concatenate([y, y_test]),
                        np.concatenate([train[s], test[s]]).astype(np.float32), GAINS,
                    ),
                )  # fmt: skip
    cfg = FusionConfig(methods=("sum", "svm", "learned"), svm_c=(1.0,), learn_kinds=("svm",))
    fused = fuse_score_dir(
        cfg=cfg, run=RunConfig(heads=("win", "plain")), scores=root, out=tmp_path / "fuse"
    )
    f32 = {s: a.astype(np.float32).astype(np.float64) for s, a in train.items()}
    t32 = {s: a.astype(np.float32).astype(np.float64) for s, a in test.items()}
    ref = LinearSVC(C=1.0, random_state=0, max_iter=20_000).fit(_hand_rows(f32), np.repeat(y, 3))
    np.testing.assert_allclose(
        fused.tables[("win", "svm")].scores, _hand_decision(ref, t32), rtol=1e-9
    )
    np.testing.assert_allclose(
        fused.tables[("win", "learned")].scores, _hand_decision(ref, t32), rtol=1e-9
    )
    assert fused.learned["win"]["1"]["svm_per_recurrence"] is True
    assert fused.learned["plain"]["1"]["svm_per_recurrence"] is False
    # the head without window files keeps the per-video SVM of its scores.csv
    plain = {s: read_scores(root / f"plain-{s}" / "scores.csv") for s in ("rgb", "flow")}
    _, tr_labels, tr_streams = aligned(plain, "1", "train")
    _, _, te_streams = aligned(plain, "1", "test")
    want, _ = svm_fuse(te_streams, train=tr_streams, train_labels=tr_labels, c_grid=(1.0,))
    np.testing.assert_array_equal(fused.tables[("plain", "svm")].scores, want)
    assert fused.svm_c == {"plain": {"1": 1.0}, "win": {"1": 1.0}}


def test_window_scores_missing_a_video_of_scores_csv_is_an_error_naming_the_file() -> None:
    train, y = _window_streams(6, seed=7)
    ids = [f"v{i}" for i in range(6)]
    windows = _windows_table(train, "1", "train", ids[:5], y[:5])
    with pytest.raises(
        ValueError,
        match=r"h-flow/window_scores.npz: no train row of split 1 for 1 video\(s\) of scores.csv, e.g. v5",
    ):
        aligned_windows(windows, "1", "train", ids, "h")


def test_svm_cross_validation_in_processes_gives_the_same_scores_and_c(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fusion_svm, "PARALLEL_MIN_SIZE", 0)  # processes even for tiny rows
    # 40 videos, 20 classes x 2 streams = 40 features: liblinear's dual solver, which draws
    # random numbers; each process seeds its own, so the fits are those of one process
    rng = np.random.default_rng(9)
    y = np.tile(np.arange(20), 2)
    streams = {
        s: _softmax(rng.normal(size=(40, 20)) + 2.0 * np.eye(20)[y]) for s in ("rgb", "flow")
    }
    rows = SvmRows.per_video(svm_features(streams))
    splits = cv_splits(y, folds=2, seed=0)
    one = svm_cv(rows, y, c_grid=GRID, splits=splits, seed=0, workers=1)
    two = svm_cv(rows, y, c_grid=GRID, splits=splits, seed=0, workers=2)
    assert one == two and len(one) == len(GRID)
    a = svm_fuse(streams, train=streams, train_labels=y, c_grid=GRID, folds=2, workers=2)
    b = svm_fuse(streams, train=streams, train_labels=y, c_grid=GRID, folds=2, workers=1)
    assert a[1] == b[1]
    np.testing.assert_array_equal(a[0], b[0])
