"""The decode stage's output: which frames of each video the later stages read.

Decoded frames are not cached: flow and features decode exactly the planned frames on demand
(a forward decode that keeps only them, see pipeline/video.py). The plan costs ~0.5 KB per video on disk, where caching the frames
would cost N*(L+1)*H*W*3 bytes (25*6*256*340*3 = 39 MB raw per video at short side 256, or
~500 GB for UCF101), for a decode time that is small next to flow and the CNN.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.config import ConfigError, DecodeConfig
from pipeline.manifest import portable_path, resolve_path
from pipeline.video import Decoding, SamplePlan, decoder_id, dense_plan, sample_plan

# 2: the decoder is recorded and part of the identity (frame-exact PyAV decoding replaced
# decord, whose random access returned wrong frames on XviD AVIs with B-frames)
FORMAT = 2


class PlanError(ValueError):
    """A plan.json cannot be read or was made by another decoder; names the file."""


@dataclass(frozen=True)
class PlannedVideo:
    """One video of the plan, the record every stage after decode reads it by: where it is, its
    frame count and probed size, the sampled points (N,), and the sha256 of its bytes."""

    video_id: str
    path: str
    frames: int
    looped: bool
    points: list[int]
    source: str  # sha256 of the video file: cache entries computed from it record it
    width: int  # as probed: every frame is read at the size this gives after resizing
    height: int

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def decoding(self, settings: DecodeConfig) -> Decoding:
        """How to read this video's frames under the plan's decode ``settings``."""
        return decoding(settings, size=self.size)

    def samples(self, settings: DecodeConfig) -> SamplePlan:
        """The windows ``settings`` sample from this video (``sampling``)."""
        return sampling(settings, self.frames)

    @classmethod
    def probed(
        cls,
        video_id: str,
        path: str,
        settings: DecodeConfig,
        *,
        frames: int,
        source: str,
        width: int,
        height: int,
    ) -> PlannedVideo:
        """The plan entry of a video probed at ``frames`` frames of ``width`` x ``height``,
        bytes of sha256 ``source``: the points the decode ``settings`` sample from it."""
        sp = sampling(settings, frames)
        return cls(
            video_id=video_id,
            path=path,
            frames=frames,
            looped=sp.looped,
            points=sp.points.tolist(),
            source=source,
            width=width,
            height=height,
        )


@dataclass(frozen=True)
class Plan:
    settings: DecodeConfig
    videos: dict[str, PlannedVideo]
    decoder: str = field(default_factory=decoder_id)

    def identity(self) -> dict:
        """What decides the sampled frames and their pixels, for downstream cache metadata:
        the decode settings (workers aside; num_frames only where points are sampled) and the
        decoder with its version."""
        s = asdict(self.settings)
        s.pop("workers")
        if s["sampling"] == "dense":
            s.pop("num_frames")  # dense sampling takes every frame
        return s | {"decoder": self.decoder}


def decoding(settings: DecodeConfig, *, size: tuple[int, int] | None = None) -> Decoding:
    """How the decode ``settings`` read a video whose probed (width, height) is ``size`` (None:
    not probed, the first frame's size is used)."""
    return Decoding(short_side=settings.short_side, resize=settings.resize, size=size)


def sampling(settings: DecodeConfig, frames: int) -> SamplePlan:
    """The windows the decode settings sample from a video of ``frames`` frames. DecodeConfig
    holds allowed values only (dense comes with flow_pairs 1), checked when it is made."""
    if settings.sampling == "dense":
        return dense_plan(frames, pairs=1)
    return sample_plan(frames, num_points=settings.num_frames, pairs=settings.flow_pairs)


def write_plan(path: Path, plan: Plan) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": FORMAT,
        "decoder": plan.decoder,
        "settings": asdict(plan.settings),
        # paths as in the manifest: relative inside the project, so clones share DVC hashes
        "videos": {
            k: asdict(v) | {"path": portable_path(Path(v.path))}
            for k, v in sorted(plan.videos.items())
        },
    }
    path.write_text(json.dumps(data, indent=1))


def read_plan(path: Path) -> Plan:
    """The plan at ``path``; PlanError naming the file when it cannot be read, or when it was
    made by another decoder than this code's (its frame counts and sizes came from that
    decoder, and its frames may differ): the decode stage must run again."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"{path}: cannot read the decode plan ({e})") from e
    made_by = data.get("decoder", "decord (before frame-exact decoding)")
    if data.get("format") != FORMAT or made_by != decoder_id():
        raise PlanError(
            f"{path}: made by decoder {made_by!r} (format {data.get('format', 1)}); this code "
            f"decodes with {decoder_id()!r} (format {FORMAT}): run the decode stage again "
            "(dvc repro decode)"
        )
    try:
        return Plan(
            DecodeConfig(**data["settings"]),
            {
                k: PlannedVideo(**(v | {"path": str(resolve_path(v["path"]))}))
                for k, v in data["videos"].items()
            },
            decoder=made_by,
        )
    except (ConfigError, KeyError, TypeError) as e:  # settings no longer valid, fields missing
        raise PlanError(
            f"{path}: not a decode plan this code can use ({e}): run the decode stage again "
            "(dvc repro decode)"
        ) from e
