"""The joint (rgb+flow) train stage and params.yaml's ``joint.<head>`` section: settings that
only two streams allow (res_lstm's mid fusion, tsrnn's attention fusion) set for the joint stage
while the same head trains on each stream alone from its ``heads`` section. Run through the
stage's command line, as dvc.yaml runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cache import open_cache
from pipeline.engine import predict
from pipeline.heads import build_head
from pipeline.manifest import Manifest, VideoRecord, write_manifest
from pipeline.models import read_checkpoint
from pipeline.scores import read_scores

pytestmark = pytest.mark.slow  # each case runs the train stage three times

ROOT = Path(__file__).resolve().parents[1]
D_RGB, D_FLOW, T, CLASSES, PER_CLASS = 6, 5, 4, 2, 6


def _data(tmp: Path) -> tuple[Path, dict[str, Path], dict[str, np.ndarray]]:
    """A one-split manifest (the last 2 videos of each class are test videos) and one cache per
    stream, of different widths -> (manifest, {stream: features folder}, {video: (T, D) rgb
    then flow columns})."""
    videos = [
        VideoRecord(
            video_id=f"c{c}_v{i}",
            path=tmp / f"c{c}_v{i}.avi",
            label=c,
            group=f"c{c}_v{i}",
            splits=("test" if i >= PER_CLASS - 2 else "train",),
        )
        for c in range(CLASSES)
        for i in range(PER_CLASS)
    ]
    manifest = tmp / "manifest.csv"
    write_manifest(Manifest(("a", "b"), ("1",), videos), manifest)
    rng = np.random.default_rng(0)
    joint, dirs = {}, {}
    arrays = {
        v.video_id: rng.normal(size=(T, D_RGB + D_FLOW)).astype(np.float16) + v.label
        for v in videos
    }
    for stream, cols in (("rgb", slice(0, D_RGB)), ("flow", slice(D_RGB, None))):
        dirs[stream] = tmp / stream
        attrs = {"dim": arrays["c0_v0"][:, cols].shape[1], "backbone": "synthetic"}
        with open_cache(dirs[stream] / "cache", "w", attrs=attrs) as c:
            for vid, a in arrays.items():
                c.write(vid, np.ascontiguousarray(a[:, cols]), {"source": "x"})
    for vid, a in arrays.items():
        joint[vid] = a.astype(np.float32)
    return manifest, dirs, joint


def _train(tmp: Path, params: Path, head: str, stream: str, dirs: dict, manifest: Path):
    out = tmp / f"{head}-{stream}"
    cmd = [sys.executable, "-m", "stages.train", "--params", str(params), "--head", head]
    cmd += ["--stream", stream, "--features", *(str(dirs[s]) for s in stream.split("+"))]
    cmd += ["--manifest", str(manifest), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return r, out


CASES = {
    # head: (its heads section, its joint section, the joint-only setting)
    # product: a sum of the per-stream projections is also one linear map of the concatenation,
    # so only the product tells the saved weights apart from concat's
    "res_lstm": ({"hidden": 4, "fusion": "concat"}, {"fusion": "product"}, "fusion"),
    "tsrnn": ({"hidden": 4, "option": 7, "window": 2}, {"fusion": "attention"}, "fusion"),
}


@pytest.mark.parametrize("head", sorted(CASES))
def test_the_joint_section_applies_to_the_joint_stage_only(head: str, tmp_path: Path) -> None:
    base, joint, key = CASES[head]
    manifest, dirs, x = _data(tmp_path)
    training = {"epochs": 2, "batch_size": 4}
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "train": {"oof_folds": 0, "threads": 1},
                "heads": {head: {**base, **training}},
                "joint": {head: joint},
            }
        )
    )
    r, out = _train(tmp_path, params, head, "rgb+flow", dirs, manifest)
    assert r.returncode == 0, r.stderr
    log = json.loads((out / "train_log.json").read_text())
    assert log["params"][key] == joint[key]
    # the saved weights are those of the joint-only model: rebuilt with the joint setting they
    # give the stage's test scores; rebuilt from the heads section alone they do not load or
    # give other scores
    state = read_checkpoint(out / "model_split1.pt")["state_dict"]
    kw = {"in_dim": D_RGB + D_FLOW, "num_classes": CLASSES, "stream_dims": [D_RGB, D_FLOW]}
    model = build_head(head, **kw, **{**base, **joint})
    model.load_state_dict(state)
    table = read_scores(out / "scores.csv")
    test = [i for i, s in enumerate(table.subset) if s == "test"]
    ids = [table.video_id[i] for i in test]
    got = predict(model, np.stack([x[v] for v in ids]))
    np.testing.assert_allclose(got, table.scores[test], atol=2e-3)
    plain = build_head(head, **kw, **base)
    try:
        plain.load_state_dict(state)
    except RuntimeError:
        pass  # the joint model has other parameters (tsrnn's flow branch)
    else:
        assert not np.allclose(predict(plain, np.stack([x[v] for v in ids])), got, atol=1e-3)
    # the same head on one stream takes its heads section: the joint setting would refuse there
    r, out = _train(tmp_path, params, head, "rgb", dirs, manifest)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "train_log.json").read_text())["params"].get(key) == base.get(key)
    params.write_text(params.read_text().replace("joint:", "unused:"))
    bad = yaml.safe_load(params.read_text())
    bad["heads"][head].update(joint)
    del bad["unused"]
    params.write_text(yaml.safe_dump(bad))
    r, _ = _train(tmp_path, params, head, "rgb", dirs, manifest)
    assert r.returncode != 0 and "stream" in r.stderr


def test_a_joint_head_without_a_joint_section_is_refused_naming_it(tmp_path: Path) -> None:
    """dvc.yaml's train_joint lists joint.<head>: DVC would stop on the missing key, so the
    check names it first."""
    from pipeline.config import ConfigError, check_params

    params = {"run": {"heads": [], "joint_heads": ["ts_lstm"]}, "heads": {"ts_lstm": {}}}
    with pytest.raises(ConfigError, match=r"run\.joint_heads.*no section joint\.ts_lstm"):
        check_params(params)
    check_params({**params, "joint": {"ts_lstm": {}}})
    with pytest.raises(ConfigError, match=r"joint\.lstm.*no section heads\.lstm"):
        check_params({**params, "joint": {"ts_lstm": {}, "lstm": {"hidden": 3}}})
