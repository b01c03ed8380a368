"""Running per-video work: progress bars, process pools, and the failures record.

Every long loop shows a tqdm bar (this is the one place that builds them). Per-video work runs
through ``map_videos``, which turns an exception raised for one video into a recorded failure
with its reason, so one corrupt file never stops a stage.
"""

from __future__ import annotations

import csv
import logging
import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from pipeline.manifest import portable_path

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Failure:
    video_id: str
    path: str
    stage: str
    reason: str


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "video"):  # noqa: ANN201
    """The project's progress bar (tqdm on stderr, refreshed at most once a second)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, mininterval=1.0, dynamic_ncols=True)


def resolve_workers(n: int) -> int:
    """0 means every core."""
    return n if n > 0 else (os.cpu_count() or 1)


def _call(fn: Callable[[T], R], item: T) -> tuple[T, R | None, str | None]:
    try:
        return item, fn(item), None
    except Exception as e:  # one video's failure must not stop the others
        return item, None, f"{type(e).__name__}: {e}"


def _call_packed(args: tuple[Callable[[Any], Any], Any]) -> tuple[Any, Any, str | None]:
    return _call(*args)


def map_videos(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: int,
    desc: str,
    initializer: Callable[[], None] | None = None,
) -> Iterator[tuple[T, R | None, str | None]]:
    """Apply ``fn`` to every item -> (item, result, None) or (item, None, reason), in completion
    order. ``workers`` > 1 uses a spawn-context process pool (safe with torch and OpenCV
    threads); ``fn`` must then be picklable (a module-level function or a partial of one).
    """
    workers = min(resolve_workers(workers), max(1, len(items)))
    if workers <= 1:
        if initializer:
            initializer()
        for item in progress(items, desc=desc):
            yield _call(fn, item)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=initializer) as pool:
        it = pool.imap_unordered(_call_packed, [(fn, item) for item in items], chunksize=1)
        yield from progress(it, desc=desc, total=len(items))


FAILURE_FIELDS = ("video_id", "path", "stage", "reason")


def write_failures(path: Path, failures: Iterable[Failure]) -> int:
    """Write the failures CSV (header always present) and return how many rows it has.

    A video inside the project is written by its relative path, in the path column and in the
    reason (which starts with the path the decoder was given, an absolute one), as the manifest
    and the plan write it: a clone at another path then writes the same bytes, and DVC sees no
    change."""
    rows = sorted(failures, key=lambda f: f.video_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(FAILURE_FIELDS)
        for f in rows:
            shown = portable_path(Path(f.path))
            w.writerow([f.video_id, shown, f.stage, f.reason.replace(str(f.path), shown)])
    return len(rows)


def read_failures(path: Path) -> list[Failure]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [Failure(**row) for row in csv.DictReader(fh)]


@dataclass(frozen=True)
class Counts:
    """How a per-video stage ended: computed now, kept from an earlier run, failed."""

    done: int
    skipped: int
    failed: int


def finish(
    stage: str, failures_file: Path, failures: Iterable[Failure], *, done: int, skipped: int
) -> Counts:
    """Close a per-video stage: write ``failures_file``, log the counts, and stop the stage
    (SystemExit) when no video succeeded, so DVC never records an empty output as done."""
    failed = write_failures(failures_file, failures)
    msg = f"{stage}: {done} done, {skipped} already done (resumed), {failed} failed"
    if failed:
        log.warning("%s; reasons in %s", msg, failures_file)
    else:
        log.info(msg)
    if done + skipped == 0:
        raise SystemExit(
            f"{stage}: no video succeeded ({failed} failed; reasons in {failures_file})"
        )
    return Counts(done, skipped, failed)
