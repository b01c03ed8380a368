"""The decode stage's output: which frames of each video the later stages read.

Decoded frames are not cached: flow and features decode exactly the planned frames on demand
(decord seeks to them). The plan costs ~0.5 KB per video on disk, where caching the frames
would cost N*(L+1)*H*W*3 bytes (25*6*256*340*3 = 39 MB raw per video at short side 256, or
~500 GB for UCF101), for a decode time that is small next to flow and the CNN.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.config import DecodeConfig
from pipeline.manifest import portable_path, resolve_path
from pipeline.video import SamplePlan, dense_plan, sample_plan


@dataclass(frozen=True)
class PlannedVideo:
    video_id: str
    path: str
    frames: int
    looped: bool
    points: list[int]
    source: str  # sha256 of the video file: cache entries computed from it record it
    width: int = 0  # as probed (0 in plans written before the field): lets decoding skip
    height: int = 0  # a second open of the video to learn its size

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


@dataclass(frozen=True)
class Plan:
    settings: DecodeConfig
    videos: dict[str, PlannedVideo]

    def identity(self) -> dict:
        """What decides the sampled frames and their size, for downstream cache metadata."""
        s = asdict(self.settings)
        s.pop("workers")
        if s["sampling"] == "points":
            s.pop("sampling")  # caches written before the key existed stay valid
        else:
            s.pop("num_frames")  # dense sampling takes every frame
        if s["resize"] == "opencv":
            s.pop("resize")  # likewise
        return s


def sampling(settings: DecodeConfig, frames: int) -> SamplePlan:
    """The windows the decode settings sample from a video of ``frames`` frames."""
    if settings.sampling == "dense":
        if settings.flow_pairs != 1:  # L > 1 would store every flow field L times
            raise ValueError(
                "decode.sampling dense takes every pair once: set decode.flow_pairs: 1"
            )
        return dense_plan(frames, pairs=1)
    if settings.sampling != "points":
        raise ValueError(f"decode.sampling: unknown '{settings.sampling}' (points or dense)")
    return sample_plan(frames, num_points=settings.num_frames, pairs=settings.flow_pairs)


def write_plan(path: Path, plan: Plan) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "settings": asdict(plan.settings),
        # paths as in the manifest: relative inside the project, so clones share DVC hashes
        "videos": {
            k: asdict(v) | {"path": portable_path(Path(v.path))}
            for k, v in sorted(plan.videos.items())
        },
    }
    path.write_text(json.dumps(data, indent=1))


def read_plan(path: Path) -> Plan:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the decode plan ({e})") from e
    # a plan written before decode.resize existed resized with OpenCV
    return Plan(
        DecodeConfig(**({"resize": "opencv"} | data["settings"])),
        {
            k: PlannedVideo(**(v | {"path": str(resolve_path(v["path"]))}))
            for k, v in data["videos"].items()
        },
    )
