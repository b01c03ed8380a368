"""decode: uniform sampling of N points (each with L following frames for flow) per video,
checked by decoding every planned frame (pipeline/planning.py). Writes the plan; frames are
decoded on demand later."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DecodeConfig, section
from pipeline.planning import plan_videos
from pipeline.runner import Counts


def main(cfg: DecodeConfig, *, manifest: Path, probe: Path, out: Path) -> Counts:
    return plan_videos(cfg, manifest=manifest, probe=probe, out=out)


if __name__ == "__main__":
    from stages._cli import parse

    args, params = parse(__doc__, "manifest", "probe", "out")
    main(
        section(params, "decode", DecodeConfig),
        manifest=args.manifest,
        probe=args.probe,
        out=args.out,
    )
