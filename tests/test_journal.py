"""Tests for pipeline/journal.py: the per-rank JSON-lines journal a killed prepare or decode
resumes from (the stages' resume and torchrun runs: tests/test_resume_prepare.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import pipeline.journal
from pipeline.journal import (
    JOURNAL,
    JournalWriter,
    clear_outputs,
    code_fingerprint,
    journaled_map,
    read_journal,
)
from pipeline.world import World


def _key(item: str) -> dict:
    return {"item": item}


def _work(item: str) -> dict:
    if item.startswith("bad"):
        raise ValueError(f"{item}: cannot be done")
    return {"length": len(item)}


def _run(directory: Path, items: list[str], calls: list[str], code: str = "c1") -> dict:
    def work(item: str) -> dict:
        calls.append(item)
        return _work(item)

    run = journaled_map(
        World(), directory, items, key=_key, work=work, code=code, name=str, workers=1, desc="t"
    )
    return {item: (e.result, e.error, e.resumed) for item, e in run.entries}


def test_a_torn_last_line_is_ignored_and_cut_off_by_the_next_writer(tmp_path: Path) -> None:
    """A kill mid-write leaves a line without its newline: readers skip it (its video is done
    again), and the next writer of the file cuts it off, so its first record is a line."""
    journal = tmp_path / JOURNAL
    with JournalWriter(journal / "rank-0.jsonl") as w:
        w.append({"code": "c1", "key": _key("a"), "result": {"length": 1}})
    with (journal / "rank-0.jsonl").open("ab") as fh:
        fh.write(b'{"code": "c1", "key": {"item": "bb"}, "resu')  # killed here
    assert [e.result for e in read_journal(journal, "c1").values()] == [{"length": 1}]

    calls: list[str] = []
    got = _run(journal, ["a", "bb", "bad"], calls)
    assert calls == ["bb", "bad"]  # "a" was recorded whole; "bb" only torn
    assert got == {
        "a": ({"length": 1}, None, True),
        "bb": ({"length": 2}, None, False),
        "bad": (None, "ValueError: bad: cannot be done", False),
    }
    lines = (journal / "rank-0.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and [json.loads(x)["key"]["item"] for x in lines[:-1]] == [
        "a",
        "bb",
        "bad",
    ]


def test_failures_are_kept_and_records_of_other_code_or_keys_are_not(tmp_path: Path) -> None:
    journal = tmp_path / JOURNAL
    first: list[str] = []
    _run(journal, ["a", "bad"], first)
    again: list[str] = []
    got = _run(journal, ["a", "bad", "c"], again)
    assert again == ["c"]  # the failure is a result too: not tried again
    assert got["bad"] == (None, "ValueError: bad: cannot be done", True)
    other: list[str] = []
    _run(journal, ["a", "bad", "c"], other, code="c2")
    assert other == ["a", "bad", "c"]  # other code: nothing reused


def test_a_line_that_is_not_a_record_is_redone_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A machine crash can leave a block of zeros mid-file: that video is done again."""
    journal = tmp_path / JOURNAL
    journal.mkdir()
    good = json.dumps({"code": "c1", "key": _key("b"), "result": {"length": 1}})
    (journal / "rank-1.jsonl").write_bytes(b"\x00\x00\x00\n" + good.encode() + b"\n")
    calls: list[str] = []
    with caplog.at_level(logging.WARNING, logger="pipeline.journal"):
        _run(journal, ["a", "b"], calls)
    assert calls == ["a"]
    assert "rank-1.jsonl: line 1 is not a record" in caplog.text


def test_the_code_fingerprint_follows_the_source_and_the_extra(tmp_path: Path) -> None:
    a = code_fingerprint(pipeline.journal, extra="pyav 1")
    assert a == code_fingerprint(pipeline.journal, extra="pyav 1")
    assert a != code_fingerprint(pipeline.journal, extra="pyav 2")
    assert a != code_fingerprint(pipeline.journal, logging, extra="pyav 1")


def test_clear_outputs_removes_the_named_keeps_the_journal_and_warns_of_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    (out / JOURNAL).mkdir(parents=True)
    (out / "demo" / "videos").mkdir(parents=True)
    for name in ("plan.json", "failures.csv", "notes.txt", "demo/videos/x.avi"):
        (out / name).write_text("x")
    with caplog.at_level(logging.WARNING, logger="pipeline.journal"):
        clear_outputs(out, ("plan.json", "failures.csv", "demo"))
    assert sorted(p.name for p in out.iterdir()) == [JOURNAL, "notes.txt"]
    assert "notes.txt is not an output of this stage" in caplog.text
