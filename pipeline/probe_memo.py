"""The prepare stage's memo of finished probes, so that a dataset that gained, lost or changed a
few videos costs a probe of those videos only, not of the 13,320 (UCF101) or ~650k (Kinetics)
it had: probing decodes every frame and hashes every byte of a video. The decode stage keeps its
frame checks the same way (pipeline/planning.py): their key is the plan entry, the video's
sha256 included, so a check is reused only for the same bytes and the same sampled frames.

The journal (pipeline/journal.py) makes a killed run resume, but is deleted once the outputs
are written, so that the DVC output holds the same bytes whatever its history. The memo keeps
its records beside the output instead, in ``<out>/../.<out name>.probes.jsonl`` (not in the
DVC output: its keys are this machine's paths and mtimes, so it would differ between two
clones that hold the same videos, and a teammate who pulls the output has other mtimes anyway,
as DVC's own state database of file hashes is per machine):

- before probing, the memo is copied into the journal (``seed_journal``), where
  ``journaled_map`` reuses every record whose key (absolute path, size, mtime_ns) and code
  fingerprint equal the video's now, as it reuses a killed run's;
- after a run, the memo is rewritten (``write_memo``) with one record per video of the
  listing whose journaled key is its key now, in id order: a function of the files and the
  code, whatever the history. Failures are not kept: a video that failed is probed again by
  the next run (a transient read error must not stick), which costs only the failed ones.

Format: the journal's JSON lines (``{"code": ..., "key": {...}, "result": {...}}``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

MEMO_FILE = "memo.jsonl"  # the memo's name inside the journal while a run reuses it


def memo_path(out: Path, what: str = "probes") -> Path:
    """Where the memo of the stage writing ``out`` lives: beside it, hidden, not in it
    (prepare's probes; decode's frame checks: ``what="checks"``)."""
    return out.parent / f".{out.name}.{what}.jsonl"


def seed_journal(memo: Path, journal: Path) -> bool:
    """Copy ``memo`` into the ``journal`` folder (once: a killed run's copy stays) -> whether
    the journal now holds it. A missing memo (first run, another machine) seeds nothing."""
    target = journal / MEMO_FILE
    if target.exists():
        return True
    if not memo.is_file():
        return False
    journal.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")  # not *.jsonl: a kill mid-copy leaves nothing readable
    shutil.copyfile(memo, tmp)
    os.replace(tmp, target)
    return True


def _records(journal: Path, code: str) -> dict[str, dict]:
    """{canonical key text: record} of the successful records of ``code`` in ``journal``'s
    complete lines (a torn or unreadable line is skipped: that video is probed again)."""
    found: dict[str, dict] = {}
    for path in sorted(journal.glob("*.jsonl")):
        with path.open("rb") as fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    break
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if (
                    isinstance(r, dict)
                    and r.get("code") == code
                    and isinstance(r.get("key"), dict)
                    and "result" in r
                    and r.get("error") is None
                ):
                    found[json.dumps(r["key"], sort_keys=True)] = r
    return found


def write_memo(memo: Path, journal: Path, keys: Iterable[dict], *, code: str) -> int:
    """Rewrite ``memo`` from the records in ``journal`` whose key is one of ``keys`` (every
    video's key now, in id order) -> the number of records kept. Written aside and renamed,
    so a kill leaves the old memo or the new one."""
    found = _records(journal, code) if journal.is_dir() else {}
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
    kept = 0
    with tmp.open("wb") as fh:
        for key in keys:
            r = found.get(json.dumps(key, sort_keys=True))
            if r is not None:
                record = {"code": code, "key": key, "result": r["result"]}
                fh.write(json.dumps(record, sort_keys=True).encode("ascii") + b"\n")
                kept += 1
    os.replace(tmp, memo)
    return kept
