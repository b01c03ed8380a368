"""prepare: build the manifest (video id, path, label, split, group), probe every video, record
the ones that cannot be opened or have no frames, and the dataset rows that cannot be one video
(two rows giving one id), and exclude them (pipeline/preparation.py). Resumable: a killed run
probes only the videos it had not finished, and a run after the dataset changed only the videos
added or changed (a memo beside the output). Under torchrun every rank probes its share. Run by
DVC (``DVC_STAGE=prepare``), it stops unless dvc.yaml lists the dataset's files among its deps:
DVC would not see a video added there (pipeline/dataset_deps.py)."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import DatasetConfig, section
from pipeline.preparation import prepare_dataset
from pipeline.runner import Counts


def dvc_yaml_running() -> Path | None:
    """The dvc.yaml of the DVC stage running this process as "prepare" (DVC sets DVC_ROOT and
    DVC_STAGE for a stage's command), else None (run by hand or by a test)."""
    root = os.environ.get("DVC_ROOT")
    if os.environ.get("DVC_STAGE") == "prepare" and root:
        return Path(root) / "dvc.yaml"
    return None


def main(cfg: DatasetConfig, out: Path, *, dvc_yaml: Path | None = None) -> Counts:
    # torch only here: the probe pool's spawned workers import this module and stay light
    import torch

    from pipeline.world import close_world, init_world

    world = init_world(torch.device("cpu"))
    try:
        return prepare_dataset(cfg, out=out, world=world, dvc_yaml=dvc_yaml)
    finally:
        close_world(world)


if __name__ == "__main__":
    from pipeline.dataset_deps import DepsError
    from pipeline.journal import JournalError
    from pipeline.world import SharedDirError
    from stages._cli import parse

    args, params = parse(__doc__, "out")
    try:
        main(section(params, "dataset", DatasetConfig), args.out, dvc_yaml=dvc_yaml_running())
    except (DepsError, JournalError, SharedDirError) as e:  # each names the folder and the reason
        raise SystemExit(f"prepare: {e}") from None
