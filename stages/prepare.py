"""prepare: build the manifest (video id, path, label, split, group), probe every video, record
the ones that cannot be opened or have no frames, and the dataset rows that cannot be one video
(two rows giving one id), and exclude them (pipeline/preparation.py)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DatasetConfig, section
from pipeline.preparation import prepare_dataset
from pipeline.runner import Counts


def main(cfg: DatasetConfig, out: Path) -> Counts:
    return prepare_dataset(cfg, out=out)


if __name__ == "__main__":
    from stages._cli import parse

    args, params = parse(__doc__, "out")
    main(section(params, "dataset", DatasetConfig), args.out)
