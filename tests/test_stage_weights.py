"""The flow and features stages stop before writing anything when torchvision's weights file is
neither in the torch hub cache nor downloadable, instead of extracting from a random network
that the cache metadata would call pretrained.

No test reaches the internet: in-process, the weights enum's URL is pointed at a refusing port on
127.0.0.1 (tests/hub_server.py); a stage run as a command gets a proxy on such a port, which
urllib in the fresh process reads from the environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hub_server
import pytest
import torchvision
from torchvision.models import optical_flow

from pipeline.backbones import WeightsError
from pipeline.config import FlowConfig, RaftConfig, StreamFeaturesConfig
from stages import features as features_stage
from stages import flow as flow_stage

# slow: every test runs the features or flow stage, two of them as a command
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

RESNET18 = StreamFeaturesConfig(
    backbone="resnet18", weights="imagenet", crop=32, batch_size=4, threads=1, device="cpu"
)
RAFT = FlowConfig(algorithm="raft_small", raft=RaftConfig(weights="default", device="cpu"))
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return hub_server.empty_hub(monkeypatch, tmp_path / "torch")


def test_features_stage_stops_before_writing_when_the_weights_file_cannot_be_had(
    tiny_demo: Path, tmp_path: Path, hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enum = torchvision.models.get_model_weights("resnet18").DEFAULT
    with hub_server.refusing() as base:
        hub_server.point_at(monkeypatch, enum, f"{base}/{hub_server.file_name(enum)}")
        with pytest.raises(WeightsError, match=hub_server.file_name(enum)):
            features_stage.main(
                RESNET18, stream="rgb", source=tiny_demo / "decode", out=tmp_path / "rgb"
            )
    assert not (tmp_path / "rgb").exists()  # no cache that DVC could take for features


def test_flow_stage_stops_before_writing_when_the_raft_file_cannot_be_had(
    tiny_demo: Path, tmp_path: Path, hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enum = optical_flow.Raft_Small_Weights.DEFAULT
    with hub_server.refusing() as base:
        hub_server.point_at(monkeypatch, enum, f"{base}/{hub_server.file_name(enum)}")
        with pytest.raises(WeightsError, match=hub_server.file_name(enum)):
            flow_stage.main(RAFT, plan_path=tiny_demo / "decode/plan.json", out=tmp_path / "flow")
    assert not (tmp_path / "flow").exists()


@pytest.mark.parametrize("stage", ["features", "flow"])
def test_stage_command_prints_one_line_and_no_traceback(
    stage: str, tiny_demo: Path, tmp_path: Path
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        "cache: {backend: zarr}\n"
        "features: {rgb: {backbone: resnet18, weights: imagenet, crop: 32, threads: 1, "
        "device: cpu}}\n"
        "flow: {algorithm: raft_small, raft: {weights: default, device: cpu}}\n"
    )
    args = {
        "features": ["--stream", "rgb", "--input", str(tiny_demo / "decode")],
        "flow": ["--plan", str(tiny_demo / "decode/plan.json")],
    }[stage]
    with hub_server.refusing() as proxy:
        # urllib takes the lower-case variables over the upper-case ones
        env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
        env |= {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": proxy, "http_proxy": proxy}
        run = subprocess.run(
            [sys.executable, "-m", f"stages.{stage}", *args, "--out", str(tmp_path / stage)]
            + ["--params", str(params)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    prefix = "features (rgb): " if stage == "features" else "flow: "
    assert last.startswith(prefix) and "hub/checkpoints/" in last and "https://" in last
    assert not (tmp_path / stage).exists()
