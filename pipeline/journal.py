"""Resumable, sharded per-video work for the stages that write one output for the whole
dataset (prepare, decode): a killed run resumes without redoing its finished videos, and under
torchrun every rank does its share.

The journal is a folder in the stage's output (``JOURNAL``) of JSON-lines files, one per rank
(``rank-<r>.jsonl``: no two processes ever append to one file). Each finished video is one line,
flushed as soon as it is known (a kill -9 loses no finished video; an fsync at most once a
second bounds what a machine crash loses):

    {"code": ..., "key": {...}, "result": {...}}   or   {"code": ..., "key": {...}, "error": "..."}

``key`` is what the result was computed from (the stage chooses: a file's path, size and
mtime; a video's hash and the settings), and ``code`` a fingerprint of the code that computed
it: a record is reused only when both equal the video's now, so a stale one is never used. A
line counts once its newline is written: the torn last line a kill leaves is ignored by readers
and cut off by the next writer of that file.

``journaled_map`` is the protocol: rank 0 reads every journal and sends each rank the videos
not done (all ranks shard the same list), every rank does its share into its own file, and
after a barrier rank 0 reads all the journals again and finds a record for every video, or
stops naming the videos no rank recorded. The stage then writes its outputs from the records
and deletes the journal (``remove_journal``), so the output (a DVC ``persist: true`` out) ends
with the same bytes as an uninterrupted run, whatever its history.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pipeline.runner import Counts, map_videos

if TYPE_CHECKING:  # the distributed module imports torch: spawned pool workers stay light
    from pipeline.world import World

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

JOURNAL = "journal"  # the folder's name inside a stage's output
FSYNC_EVERY_S = 1.0


class JournalError(RuntimeError):
    """The journal cannot vouch for every video (or cannot be read); names the folder."""


def code_fingerprint(*modules: ModuleType, extra: str = "") -> str:
    """A short hash of the source files of ``modules`` and of ``extra`` (a library version):
    the code whose results a journal record holds. Any edit redoes the killed run's videos,
    which costs one run's work where reusing them could mix two versions' results."""
    h = hashlib.sha256(extra.encode())
    for m in modules:
        assert m.__file__, f"{m.__name__} has no source file"
        h.update(Path(m.__file__).read_bytes())
    return h.hexdigest()[:16]


def _canonical(code: str, key: dict) -> bytes:
    """What a record is looked up by: a digest of its code and key (the same dict gives the
    same digest; 20 bytes where a decode key's text is ~0.5 KB, for 650k videos)."""
    text = json.dumps({"code": code, "key": key}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).digest()


@dataclass(frozen=True)
class Entry:
    """One video's recorded outcome: ``result`` (the work's JSON value) or ``error`` (why it
    failed, "ExceptionType: message"); ``resumed`` when an earlier run recorded it."""

    result: Any
    error: str | None
    resumed: bool = False


def _lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every complete line of ``path``. The torn last line a kill
    leaves (no newline) is skipped; a complete line that is not a record (a machine crash can
    leave zeros) is skipped with a warning: its video is redone, never guessed."""
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.endswith(b"\n"):
                log.info("%s: ignoring the torn last line %d (a killed run)", path, lineno)
                return
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("key"), dict):
                    raise ValueError("not a journal record")
            except ValueError as e:
                log.warning(
                    "%s: line %d is not a record (%s); its video is redone", path, lineno, e
                )
                continue
            yield lineno, record


def read_journal(directory: Path, code: str) -> dict[bytes, Entry]:
    """{digest of the key (``_canonical``): Entry} of every record in the ``*.jsonl`` files of ``directory`` (none:
    empty) made by ``code``; records of other code are left out (and counted in the log). Two
    records of one key (two runs did the video) give the later file's, then the later line's:
    either is a result of that key by that code."""
    records: dict[bytes, Entry] = {}
    other = 0
    for path in sorted(Path(directory).glob("*.jsonl")):
        for _, r in _lines(path):
            if r.get("code") != code:
                other += 1
                continue
            error = r.get("error")
            records[_canonical(code, r["key"])] = Entry(r.get("result"), error, resumed=True)
    if other:
        log.info("%s: %d records made by other code are not reused", directory, other)
    return records


def _complete_size(path: Path) -> int:
    """The size of ``path`` up to and including its last newline (0 for none)."""
    with path.open("rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            fh.seek(pos)
            block = fh.read(step)
            i = block.rfind(b"\n")
            if i >= 0:
                return pos + i + 1
    return 0


class JournalWriter:
    """Appends records to one rank's journal file, each flushed at once. Opening cuts off a
    torn last line left by a killed run, so a new record never joins it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            size = _complete_size(path)
            if size != path.stat().st_size:
                with path.open("r+b") as fh:
                    fh.truncate(size)
        self.path = path
        self._fh = path.open("ab")
        self._synced = time.monotonic()

    def append(self, record: dict) -> None:
        # ASCII JSON (non-ASCII and undecodable path characters escaped): one line whatever
        # the names hold
        self._fh.write(json.dumps(record, sort_keys=True).encode("ascii") + b"\n")
        # flushed: in the kernel's hands, so a kill -9 of this process loses nothing
        self._fh.flush()
        if time.monotonic() - self._synced > FSYNC_EVERY_S:
            os.fsync(self._fh.fileno())  # to disk: a crash of the machine loses at most ~1 s
            self._synced = time.monotonic()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_journal(directory: Path) -> None:
    """Delete the journal once the stage wrote its outputs: the output is then the same files
    as an uninterrupted run's, and the next run (other code, other files) starts afresh."""
    if directory.exists():
        shutil.rmtree(directory)


def on_primary(world: World, fn: Callable[[], R]) -> R | None:
    """``fn()`` on rank 0 alone -> its value there, None on the other ranks, which wait until
    rank 0 has finished it (a collective: e.g. the demo videos are written once, by rank 0,
    before any rank reads them). An exception in ``fn`` is sent to the other ranks, which
    raise a JournalError with it, rather than wait for days in the next collective."""
    if world.primary:
        try:
            value = fn()
        except BaseException as e:
            world.broadcast(f"rank 0 stopped: {type(e).__name__}: {e}")
            raise
        world.broadcast(None)
        return value
    err = world.broadcast(None)
    if err is not None:
        raise JournalError(err)
    return None


def _keyed(item: T, *, key: Callable[[T], dict], work: Callable[[T], Any], code: str) -> dict:
    """The journal record of ``item``: its key, taken before the work (a file changed while
    it is probed gets a key that will not match it again), and the work's result or error."""
    k = key(item)
    try:
        return {"code": code, "key": k, "result": work(item)}
    except Exception as e:  # recorded like runner.map_videos's reasons, which the stages wrote
        return {"code": code, "key": k, "error": f"{type(e).__name__}: {e}"}


@dataclass(frozen=True)
class Journaled(Generic[T]):
    """What ``journaled_map`` returns on a rank: ``entries``, on rank 0 every item with its
    Entry (in the order given), on another rank the items of its own share."""

    entries: list[tuple[T, Entry]]

    def counts(self) -> Counts:
        """This rank's counts, for a rank other than 0 (rank 0 writes the outputs and counts
        through runner.finish)."""
        failed = sum(e.error is not None for _, e in self.entries)
        return Counts(done=len(self.entries) - failed, skipped=0, failed=failed)


def journaled_map(
    world: World,
    directory: Path,
    items: Sequence[T] | None,
    *,
    key: Callable[[T], dict],
    work: Callable[[T], Any],
    code: str,
    name: Callable[[T], str],
    workers: int,
    desc: str,
) -> Journaled[T]:
    """Apply ``work`` to every item not already recorded in the journal at ``directory``, on
    every rank of ``world``, and return every item's outcome on rank 0.

    ``items``: rank 0's items (None on the other ranks), in the order they are sharded;
    ``key(item)``: the JSON dict its result depends on (cheap: computed again by rank 0 when
    it resumes and when it merges); ``work(item)``: its JSON-able result, or an exception
    (recorded as its failure). ``key`` and ``work`` must be picklable (module-level functions
    or partials of them) when ``workers`` > 1. ``code``: ``code_fingerprint`` of what runs.
    ``name(item)``: how an error names a video. A collective: every rank calls it.

    Raises JournalError on rank 0 when, after every rank finished, some item has no record
    of its current key (a rank that wrote its journal where rank 0 cannot see it, or a file
    changed during the run): the journal is kept and a new run does only those."""
    directory = Path(directory)

    def todo() -> tuple[str, list[T]]:
        assert items is not None, "rank 0 must be given the items"
        done = read_journal(directory, code)
        left = [it for it in items if _canonical(code, key(it)) not in done]
        if len(left) < len(items):
            log.info(
                "%s: resuming: %d of %d videos recorded by an earlier run",
                directory,
                len(items) - len(left),
                len(items),
            )
        return code, left

    sent = world.broadcast(on_primary(world, todo))
    code0, left = sent
    if code0 != code:  # its records would never match rank 0's, which merges them
        raise JournalError(
            f"{directory}: rank {world.rank} runs other code or settings ({code}) than rank 0 "
            f"({code0}): every machine needs the same checkout, params.yaml and decoder"
        )
    mine = world.shard(left)
    if world.size > 1:
        log.info("%s: rank %d of %d: %d videos to do", desc, world.rank, world.size, len(mine))
    own: list[tuple[T, Entry]] = []
    with JournalWriter(directory / f"rank-{world.rank}.jsonl") as journal:
        for item, record, err in map_videos(
            partial(_keyed, key=key, work=work, code=code), mine, workers=workers, desc=desc
        ):
            if err:  # ``key`` itself raised: a bug, not a video's failure
                raise JournalError(f"{directory}: cannot key {name(item)}: {err}")
            assert record is not None
            journal.append(record)
            own.append((item, Entry(record.get("result"), record.get("error"))))
    world.barrier()  # every rank's records are in its file
    if not world.primary:
        return Journaled(own)
    assert items is not None
    return Journaled(_merge(directory, items, key=key, code=code, name=name, fresh=left))


def _merge(
    directory: Path,
    items: Sequence[T],
    *,
    key: Callable[[T], dict],
    code: str,
    name: Callable[[T], str],
    fresh: Sequence[T],
) -> list[tuple[T, Entry]]:
    """Every item with the record of its key now, read from every rank's journal; ``fresh``:
    the items this run did (the others were resumed)."""
    records = read_journal(directory, code)
    new = {id(it) for it in fresh}
    out, missing = [], []
    for it in items:
        e = records.get(_canonical(code, key(it)))
        if e is None:
            missing.append(name(it))
        else:
            out.append((it, Entry(e.result, e.error, resumed=id(it) not in new)))
    if missing:
        from pipeline.world import SHARED_HINT

        first = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise JournalError(
            f"{directory}: {len(missing)} of {len(items)} videos have no record of their "
            f"current state in the journal of any rank: {first}. Either a rank wrote its "
            f"journal where rank 0 does not see it ({SHARED_HINT}), or the file changed while "
            "the stage ran; run the stage again: it redoes only these"
        )
    return out


def clear_outputs(out: Path, names: Collection[str], *, keep: Collection[str] = ()) -> None:
    """Remove the entries ``names`` of ``out`` left by an earlier run (``keep``: entries the
    stage brings up to date itself). A ``persist: true`` DVC
    output is not emptied by DVC before its stage runs, so the stage does it: a file of an
    earlier run must not survive a run that stops before rewriting it, nor one that no longer
    writes it (it would enter the output's hash). The journal stays (the resume reads it);
    any other entry is not the stage's to delete and is named in a warning."""
    if not out.is_dir():
        return
    for entry in sorted(out.iterdir()):
        if entry.name in names:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        elif entry.name != JOURNAL and entry.name not in keep:
            log.warning("%s: %s is not an output of this stage; left in place", out, entry.name)
