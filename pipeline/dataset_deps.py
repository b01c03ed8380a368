"""The dataset's files as DVC dependencies of the prepare stage, checked.

DVC sees a change only in what a stage lists under ``deps``; the dataset's videos and split or
CSV files are read from the paths ``params.yaml`` gives (``dataset.root``, ``splits_dir``,
``csv``), which DVC cannot turn into dependencies itself: dvc.yaml can interpolate
``${dataset.root}`` only when it is a string (a null, as the demo has, stops every DVC command:
"unexpected error"), and cannot interpolate a list of paths into ``deps``. So the paths are
listed in dvc.yaml's prepare stage (the README's "Your own data"), and prepare, when DVC runs
it (``DVC_STAGE``), checks that every file it lists lies under one of them, and stops naming the
setting and the lines to add when one does not: a dataset DVC cannot see would let ``dvc repro``
skip new videos silently.

DVC hashes a directory dependency file by file and keeps each file's hash in its state database
by inode, size and mtime, so only new or changed files are read again: ``dvc status`` on a
13,320-file tree takes about as long as a stat of every file (README "Your own data").
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import yaml

from pipeline.config import DatasetConfig


class DepsError(RuntimeError):
    """A dataset file lies under no dependency of the prepare stage; names it and the fix."""


def dataset_paths(cfg: DatasetConfig) -> list[tuple[str, Path]]:
    """(setting, path) of every folder or file the dataset's adapter reads: none for the
    demo (prepare generates its videos)."""
    keys = {
        "demo": (),
        "ucf101": ("root", "splits_dir"),
        "hmdb51": ("root", "splits_dir"),
        "folder": ("root",),
        "csv": ("csv", "root"),
    }[cfg.name]
    return [(f"dataset.{k}", Path(getattr(cfg, k))) for k in keys if getattr(cfg, k)]


def declared_deps(dvc_yaml: Path, stage: str) -> list[Path]:
    """The dependencies of ``stage`` in ``dvc_yaml``, as absolute paths (relative ones are
    relative to the file's folder, as DVC reads them)."""
    try:
        doc = yaml.safe_load(dvc_yaml.read_text())
        deps = doc["stages"][stage].get("deps") or []
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise DepsError(f"{dvc_yaml}: cannot read stage {stage!r}'s deps: {e}") from None
    # an entry is a path, or a one-key mapping {path: options}
    paths = [d if isinstance(d, str) else next(iter(d)) for d in deps]
    return [Path(os.path.abspath(dvc_yaml.parent / p)) for p in paths]


def _under(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip(os.sep) + os.sep) for d in deps)


def check_declared(
    cfg: DatasetConfig, videos: Iterable[Path], *, dvc_yaml: Path, stage: str = "prepare"
) -> None:
    """Raise DepsError unless the dataset's folders and files (``dataset_paths``) and every
    video path lie under a dependency of ``stage`` in ``dvc_yaml``. Paths are compared as
    written (made absolute from the working directory, which is dvc.yaml's folder when DVC
    runs the stage; symbolic links are not resolved, as DVC does not resolve them). The
    demo's videos are prepare's own output, made from its params: nothing to check."""
    if cfg.name == "demo":
        return
    deps = [str(d) for d in declared_deps(dvc_yaml, stage)]
    missing: list[tuple[str, str]] = []
    for setting, path in dataset_paths(cfg):
        p = os.path.abspath(path)
        if not _under(p, deps):
            missing.append((setting, p))
    outside = [os.path.abspath(v) for v in videos]
    outside = [v for v in outside if not _under(v, deps)]
    if outside:  # a CSV's absolute paths outside root: their common folder would be the dep
        common = os.path.commonpath(outside) if len(outside) > 1 else os.path.dirname(outside[0])
        missing.append((f"{len(outside)} video(s) of the listing, e.g. {outside[0]}", common))
    if missing:
        lines = "".join(f"\n      - {p}" for p in dict.fromkeys(p for _, p in missing))
        what = "; ".join(f"{s} ({p})" for s, p in missing)
        raise DepsError(
            f"{dvc_yaml}: the dataset is not a dependency of stage {stage!r}: {what}. DVC "
            f"would not see a video added, changed or removed there. Add under "
            f"stages.{stage}.deps:{lines}"
        )
