"""decode: uniform sampling of N points (each with L following frames for flow) per video,
checked by decoding every planned frame (pipeline/planning.py). Writes the plan; frames are
decoded on demand later. Resumable: a killed run checks only the videos it had not finished.
Under torchrun every rank checks its share."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DecodeConfig, section
from pipeline.planning import plan_videos
from pipeline.runner import Counts


def main(cfg: DecodeConfig, *, manifest: Path, probe: Path, out: Path) -> Counts:
    # torch only here: the decode pool's spawned workers import this module and stay light
    import torch

    from pipeline.world import close_world, init_world

    world = init_world(torch.device("cpu"))
    try:
        return plan_videos(cfg, manifest=manifest, probe=probe, out=out, world=world)
    finally:
        close_world(world)


if __name__ == "__main__":
    from pipeline.journal import JournalError
    from pipeline.world import SharedDirError
    from stages._cli import parse

    args, params = parse(__doc__, "manifest", "probe", "out")
    try:
        main(
            section(params, "decode", DecodeConfig),
            manifest=args.manifest,
            probe=args.probe,
            out=args.out,
        )
    except (JournalError, SharedDirError) as e:  # each names the folder and the reason
        raise SystemExit(f"decode: {e}") from None
