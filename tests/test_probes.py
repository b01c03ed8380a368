"""Tests for pipeline/probes.py: probe.csv written by prepare and read back by decode."""

from __future__ import annotations

from pathlib import Path

from pipeline.probes import Probe, read_probes, write_probes


def test_probes_round_trip_sorted_by_id_whatever_the_order_given(tmp_path: Path) -> None:
    probes = {
        "running/бег_01": Probe(frames=164, fps=25.0, width=320, height=240, sha256="ab" * 32),
        "a/video_0": Probe(frames=3, fps=29.97, width=568, height=320, sha256="cd" * 32),
    }
    write_probes(tmp_path / "probe.csv", probes)
    back = read_probes(tmp_path / "probe.csv")
    assert back == probes
    lines = (tmp_path / "probe.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "video_id,frames,fps,width,height,duration,sha256"
    assert lines[1].startswith("a/video_0,3,29.970,568,320,0.100,")  # 3 / 29.97 s
    assert lines[2].startswith("running/бег_01,164,25.000,320,240,6.560,")
    write_probes(tmp_path / "again.csv", dict(reversed(list(probes.items()))))
    assert (tmp_path / "again.csv").read_bytes() == (tmp_path / "probe.csv").read_bytes()
