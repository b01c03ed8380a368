"""Tests for pipeline/demo.py: the synthetic demo dataset and the cue each class pair isolates."""

from __future__ import annotations

import csv
import dataclasses
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import DemoConfig, FlowConfig
from pipeline.demo import (
    BLUE,
    CLASSES,
    GREEN,
    GROUPS_PER_CLASS,
    ORANGE,
    RED,
    TAIL,
    class_groups,
    family,
    generate_demo,
    render,
)
from pipeline.flow import make_flow_fn
from pipeline.video import probe, read_frames

TINY = DemoConfig(videos_per_class=4, frames=12, size=32, fps=25, seed=0)
LUMA = np.array([0.299, 0.587, 0.114])


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    root = tmp_path_factory.mktemp("demo")
    csv_path = generate_demo(root, TINY)
    with csv_path.open(newline="") as fh:
        return root, list(csv.DictReader(fh))


def _grey(frames: np.ndarray) -> np.ndarray:
    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]).astype(np.int16)


def _twins(a: str, b: str, frames: int = 32, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Videos of classes a and b drawn from the same rng seed on the same background."""
    bg = np.random.default_rng(0).uniform(60, 110, (size, size, 3))  # any static texture
    return (
        render(a, np.random.default_rng(7), bg, frames),
        render(b, np.random.default_rng(7), bg, frames),
    )


# -- the generated dataset --------------------------------------------------------------------


def test_demo_writes_every_class_and_a_csv(demo: tuple[Path, list[dict[str, str]]]) -> None:
    root, rows = demo
    assert list(rows[0]) == ["path", "label", "split", "group"]
    assert len(rows) == 6 * 4
    per_class = defaultdict(list)
    for r in rows:
        per_class[r["label"]].append(r)
        assert (root / r["path"]).is_file()
    assert sorted(per_class) == sorted(CLASSES)
    assert all(len(v) == 4 for v in per_class.values())
    assert len({r["path"] for r in rows}) == len(rows)


def test_demo_videos_decode_with_the_configured_size(
    demo: tuple[Path, list[dict[str, str]]],
) -> None:
    root, rows = demo
    info = probe(root / rows[0]["path"])
    assert (info.frames, info.width, info.height) == (TINY.frames, TINY.size, TINY.size)
    assert info.fps == pytest.approx(TINY.fps)


def test_demo_test_split_is_the_last_group_of_every_class(
    demo: tuple[Path, list[dict[str, str]]],
) -> None:
    _, rows = demo
    last = f"g{GROUPS_PER_CLASS - 1:02d}"
    groups_by_class = defaultdict(set)
    for r in rows:
        assert r["split"] == ("test" if r["group"] == last else "train")
        groups_by_class[r["label"]].add(r["group"])
    all_groups = {f"g{g:02d}" for g in range(GROUPS_PER_CLASS)}
    # Every group in every class: a background (chosen by group) never gives a class away.
    assert all(groups == all_groups for groups in groups_by_class.values())
    assert {r["label"] for r in rows if r["split"] == "test"} == set(CLASSES)


def test_demo_is_deterministic(demo: tuple[Path, list[dict[str, str]]], tmp_path: Path) -> None:
    root, rows = demo
    again = generate_demo(tmp_path, TINY)
    assert again.read_text() == (root / "demo.csv").read_text()
    for r in rows[::5]:
        idx = np.arange(TINY.frames)
        np.testing.assert_array_equal(
            read_frames(root / r["path"], idx), read_frames(tmp_path / r["path"], idx)
        )


def test_demo_seed_changes_the_videos(
    demo: tuple[Path, list[dict[str, str]]], tmp_path: Path
) -> None:
    root, rows = demo
    other = dataclasses.replace(TINY, seed=1)
    generate_demo(tmp_path, other)
    path = rows[0]["path"]
    assert not np.array_equal(read_frames(root / path, [0]), read_frames(tmp_path / path, [0]))


# -- what each class pair lets a model see ----------------------------------------------------


@pytest.mark.parametrize(
    "colour", [RED, GREEN, BLUE, ORANGE], ids=["red", "green", "blue", "orange"]
)
def test_colours_have_equal_luma_and_no_clipped_channel(colour: np.ndarray) -> None:
    assert float(colour @ LUMA) == pytest.approx(float(RED @ LUMA), abs=1e-6)
    assert (colour > 0).all() and (colour < 255).all()


def test_the_twin_colours_differ_in_hue() -> None:
    assert np.abs(RED - GREEN).max() > 100
    assert np.abs(BLUE - ORANGE).max() > 100


def test_order_twins_have_the_same_grey_frames() -> None:
    red_green, green_red = _twins("order_red_green", "order_green_red")
    g1, g2 = _grey(red_green), _grey(green_red)
    diff = np.abs(g1 - g2)
    assert diff.mean() < 0.5 and diff.max() <= 2
    # ... while their colours differ on the disc (the test is not vacuous).
    assert np.abs(red_green.astype(int) - green_red).max() > 100
    # Flow on grey frames therefore sees the same thing in both.
    flow = make_flow_fn(FlowConfig(algorithm="farneback"))
    for t in (0, 10, 20):
        f1 = flow(g1[t].astype(np.uint8), g1[t + 1].astype(np.uint8))
        f2 = flow(g2[t].astype(np.uint8), g2[t + 1].astype(np.uint8))
        assert np.abs(f1 - f2).mean() < 0.05


def test_look_twins_have_the_same_grey_frames() -> None:
    blue, orange = _twins("look_blue", "look_orange")
    diff = np.abs(_grey(blue) - _grey(orange))
    assert diff.mean() < 0.5 and diff.max() <= 2
    assert np.abs(blue.astype(int) - orange).max() > 100


def test_motion_twins_are_each_other_played_backwards() -> None:
    frames = 32
    left, right = _twins("motion_left", "motion_right", frames=frames)
    span = frames - TAIL
    # Over the span the sampler reads, the same frames in reverse order: only motion differs.
    np.testing.assert_array_equal(left[:span], right[:span][::-1])
    assert not np.array_equal(left[0], right[0])
    # After the action the square holds still.
    assert all(np.array_equal(right[t], right[span - 1]) for t in range(span, frames))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("motion_left", "motion-only"),
        ("motion_right", "motion-only"),
        ("order_red_green", "order-only"),
        ("order_green_red", "order-only"),
        ("look_blue", "appearance-only"),
        ("look_orange", "appearance-only"),
    ],
)
def test_family(name: str, expected: str) -> None:
    assert name in CLASSES
    assert family(name) == expected


@pytest.mark.parametrize("per_class", [2, 10])
def test_demo_rejects_a_count_that_is_not_whole_groups(tmp_path: Path, per_class: int) -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        generate_demo(tmp_path, DemoConfig(videos_per_class=per_class, frames=8, size=16))


def test_the_demo_declares_its_class_groups_for_its_own_classes_only() -> None:
    groups = class_groups(CLASSES)
    # the README table's column order: motion-only, order-only, appearance-only
    assert groups == {
        "motion-only": ("motion_",),
        "order-only": ("order_",),
        "appearance-only": ("look_",),
    }
    for name, (prefix,) in groups.items():  # each group is exactly the family's classes
        assert {c for c in CLASSES if c.startswith(prefix)} == {
            c for c in CLASSES if family(c) == name
        }
    assert class_groups(("ApplyEyeMakeup", "ApplyLipstick")) == {}
    assert class_groups(CLASSES[:-1]) == {}  # five of the six classes: not the demo
