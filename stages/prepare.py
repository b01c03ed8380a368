"""prepare: build the manifest (video id, path, label, split, group), probe every video, record
the ones that cannot be opened or have no frames, and the dataset rows that cannot be one video
(two rows giving one id), and exclude them (pipeline/preparation.py). Resumable: a killed run
probes only the videos it had not finished. Under torchrun every rank probes its share."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DatasetConfig, section
from pipeline.preparation import prepare_dataset
from pipeline.runner import Counts


def main(cfg: DatasetConfig, out: Path) -> Counts:
    # torch only here: the probe pool's spawned workers import this module and stay light
    import torch

    from pipeline.world import close_world, init_world

    world = init_world(torch.device("cpu"))
    try:
        return prepare_dataset(cfg, out=out, world=world)
    finally:
        close_world(world)


if __name__ == "__main__":
    from pipeline.journal import JournalError
    from pipeline.world import SharedDirError
    from stages._cli import parse

    args, params = parse(__doc__, "out")
    try:
        main(section(params, "dataset", DatasetConfig), args.out)
    except (JournalError, SharedDirError) as e:  # each names the folder and the reason
        raise SystemExit(f"prepare: {e}") from None
