"""Manifests: which videos exist, their class, their group and their role in each split.

Adapters turn a dataset's own description into one ``Manifest``:

- ``ucf101_manifest``: the official ``classInd.txt`` / ``trainlist0N.txt`` / ``testlist0N.txt``;
- ``hmdb51_manifest``: the official ``<class>_test_splitN.txt`` files (1 train, 2 test, 0 unused);
- ``folder_manifest``: one sub-folder per class, split here (``split_train_test``);
- ``csv_manifest``: a ``path,label[,split][,group]`` table.

No adapter opens a video: whether a file decodes is the prepare stage's business. The manifest
model, its storage and the splitter live in ``pipeline.manifest`` (re-exported here).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.manifest import (  # noqa: F401  (the manifest API is re-exported here)
    _CLASSES_PREFIX,
    _UNSAFE,
    PARTS,
    DatasetError,
    Manifest,
    VideoRecord,
    _grouped_split,
    _read_text,
    _stratified_split,
    read_manifest,
    safe_id,
    split_train_test,
    write_manifest,
)

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mkv", ".webm", ".gif", ".mpg", ".mpeg")
_UCF_GROUP = re.compile(r"_(g\d+)_c\d+", re.IGNORECASE)
_HMDB_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<n>\d+)\.txt$")
_HMDB_MARKERS = {"0": "unused", "1": "train", "2": "test"}


# ----------------------------------------------------------------------------- helpers


def _check_split_numbers(splits: Sequence[int]) -> list[int]:
    numbers = [int(n) for n in splits]
    if not numbers:
        raise ValueError("splits must name at least one split")
    if len(set(numbers)) != len(numbers) or any(n < 1 for n in numbers):
        raise ValueError(f"splits must be distinct numbers >= 1, got {list(splits)}")
    return numbers


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped line) for the non-blank lines; CRLF and trailing spaces go."""
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        line = line.strip()
        if line:
            yield lineno, line


class _CaseResolver:
    """Joins relative paths to ``root``, using the on-disk spelling where only the case differs.

    The official lists and the extracted archives do not always agree on case (UCF101's
    HandstandPushups folder holds v_HandStandPushups_* files). Each directory is listed once;
    when ``root`` does not exist the paths are joined as written.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.enabled = root.is_dir()
        self._listings: dict[Path, tuple[frozenset[str], dict[str, str]] | None] = {}

    def _listing(self, directory: Path) -> tuple[frozenset[str], dict[str, str]] | None:
        if directory not in self._listings:
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                self._listings[directory] = None
            else:
                lower: dict[str, str] = {}
                for name in names:
                    lower.setdefault(name.lower(), name)
                self._listings[directory] = (frozenset(names), lower)
        return self._listings[directory]

    def join(self, rel: PurePosixPath) -> Path:
        path = self.root
        for part in rel.parts:
            listing = self._listing(path) if self.enabled else None
            if listing is not None and part not in listing[0]:
                part = listing[1].get(part.lower(), part)
            path = path / part
        return path


@dataclass
class _Entry:
    """A video being collected by an adapter: splits filled in as the lists are read."""

    path: Path
    label: int
    group: str
    source: str  # "<file>:<line>" where it was first seen
    splits: list[str]


def _add_entry(
    entries: dict[str, _Entry],
    *,
    video_id: str,
    path: Path,
    label: int,
    group: str,
    split_index: int,
    role: str,
    n_splits: int,
    source: str,
) -> None:
    entry = entries.get(video_id)
    if entry is None:
        entry = _Entry(path, label, group, source, ["unused"] * n_splits)
        entries[video_id] = entry
    elif str(entry.path).lower() != str(path).lower() or entry.label != label:
        raise DatasetError(
            f"{source}: duplicate video_id {video_id!r}: {entry.path} and {path} "
            f"(first seen at {entry.source})"
        )
    if entry.splits[split_index] != "unused":
        raise DatasetError(
            f"{source}: {path.name} is listed twice in one split (first at {entry.source})"
        )
    entry.splits[split_index] = role


def _manifest_from_entries(
    classes: Sequence[str], split_names: Sequence[str], entries: dict[str, _Entry]
) -> Manifest:
    videos = tuple(
        VideoRecord(video_id=vid, path=e.path, label=e.label, group=e.group, splits=tuple(e.splits))
        for vid, e in sorted(entries.items(), key=lambda kv: (kv[1].label, kv[0]))
    )
    return Manifest(classes=tuple(classes), split_names=tuple(split_names), videos=videos)


def _compile_group_pattern(pattern: str) -> re.Pattern[str]:
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"group_pattern {pattern!r} is not a regular expression: {e}") from None
    if compiled.groups != 1:
        raise ValueError(
            f"group_pattern {pattern!r} must have exactly one capture group, has {compiled.groups}"
        )
    return compiled


def _group_from_name(pattern: re.Pattern[str], name: str) -> str | None:
    m = pattern.search(name)
    return m.group(1) if m is not None and m.group(1) else None


@dataclass
class _Item:
    """A video of a folder or CSV dataset before it is split."""

    video_id: str
    path: Path
    label: int
    group: str
    source: str


def _check_unique(items: Sequence[_Item]) -> None:
    seen: dict[str, _Item] = {}
    for item in items:
        first = seen.setdefault(item.video_id, item)
        if first is not item:
            raise DatasetError(
                f"{item.source}: duplicate video_id {item.video_id!r}: {first.path} and {item.path}"
            )


def _split_items(
    items: list[_Item], *, grouped: bool, test_fraction: float, seed: int
) -> dict[str, _Entry]:
    items.sort(key=lambda it: (it.label, it.video_id))
    roles = split_train_test(
        [it.label for it in items],
        [it.group for it in items] if grouped else None,
        test_fraction=test_fraction,
        seed=seed,
    )
    return {
        it.video_id: _Entry(it.path, it.label, it.group, it.source, [role])
        for it, role in zip(items, roles, strict=True)
    }


def _summary(name: str, m: Manifest) -> None:
    for k, s in enumerate(m.split_names):
        roles = Counter(v.splits[k] for v in m.videos)
        log.info(
            "%s split %s: %d classes, %d train, %d test, %d unused",
            name,
            s,
            len(m.classes),
            roles["train"],
            roles["test"],
            roles["unused"],
        )


# ----------------------------------------------------------------------------- adapters


def ucf101_manifest(*, root: Path, splits_dir: Path, splits: Sequence[int]) -> Manifest:
    """UCF101 from its official ``classInd.txt``, ``trainlist0N.txt`` and ``testlist0N.txt``.

    root: the folder holding one sub-folder per class (need not exist yet). The label of a video
    is its folder's class (matched to classInd.txt ignoring case); a label in a train list must
    agree with it. group is the "gXX" of the file name. A video in no list of a split is "unused"
    there.
    """
    numbers = _check_split_numbers(splits)
    splits_dir = Path(splits_dir)
    resolver = _CaseResolver(Path(root).absolute())

    class_file = splits_dir / "classInd.txt"
    indexed: dict[int, str] = {}
    for lineno, line in _lines(class_file):
        fields = line.split()
        if len(fields) != 2 or not fields[0].isdigit():
            raise DatasetError(f"{class_file}:{lineno}: expected '<index> <class>', got {line!r}")
        if int(fields[0]) in indexed:
            raise DatasetError(f"{class_file}:{lineno}: class index {fields[0]} appears twice")
        indexed[int(fields[0])] = fields[1]
    if sorted(indexed) != list(range(1, len(indexed) + 1)):
        raise DatasetError(f"{class_file}: class indices are not 1..{len(indexed)}")
    classes = [indexed[i] for i in range(1, len(indexed) + 1)]
    lookup: dict[str, int] = {}
    for i, c in enumerate(classes):
        if lookup.setdefault(c.lower(), i) != i:
            raise DatasetError(f"{class_file}: class {c!r} appears twice (ignoring case)")

    entries: dict[str, _Entry] = {}
    for k, n in enumerate(numbers):
        for role, list_file in (
            ("train", splits_dir / f"trainlist{n:02d}.txt"),
            ("test", splits_dir / f"testlist{n:02d}.txt"),
        ):
            if not list_file.is_file():
                raise DatasetError(f"{list_file}: missing split file (UCF101 split {n})")
            for lineno, line in _lines(list_file):
                where = f"{list_file}:{lineno}"
                fields = line.split()
                if len(fields) not in (1, 2):
                    raise DatasetError(
                        f"{where}: expected '<class>/<video> [<label>]', got {line!r}"
                    )
                rel = PurePosixPath(fields[0].replace("\\", "/"))
                if len(rel.parts) < 2:
                    raise DatasetError(f"{where}: {fields[0]!r} has no class folder")
                label = lookup.get(rel.parts[0].lower())
                if label is None:
                    raise DatasetError(
                        f"{where}: class folder {rel.parts[0]!r} not in {class_file}"
                    )
                if len(fields) == 2:
                    if not fields[1].isdigit() or int(fields[1]) - 1 != label:
                        raise DatasetError(
                            f"{where}: label {fields[1]!r} disagrees with folder {rel.parts[0]!r} "
                            f"(class {label + 1} in {class_file.name})"
                        )
                m = _UCF_GROUP.search(rel.stem)
                _add_entry(
                    entries,
                    video_id=safe_id(rel.stem),
                    path=resolver.join(rel),
                    label=label,
                    group=m.group(1).lower() if m else "",
                    split_index=k,
                    role=role,
                    n_splits=len(numbers),
                    source=where,
                )
    manifest = _manifest_from_entries(classes, [str(n) for n in numbers], entries)
    _summary("UCF101", manifest)
    return manifest


def hmdb51_manifest(*, root: Path, splits_dir: Path, splits: Sequence[int]) -> Manifest:
    """HMDB51 from its official ``<class>_test_split<N>.txt`` files (1 train, 2 test, 0 unused).

    Classes are the sorted class names of the split files; path is root/<class>/<video>; HMDB51
    has no groups, so group is "".
    """
    numbers = _check_split_numbers(splits)
    splits_dir = Path(splits_dir)
    if not splits_dir.is_dir():
        raise DatasetError(f"{splits_dir}: missing split directory (HMDB51)")
    resolver = _CaseResolver(Path(root).absolute())

    found: dict[int, set[str]] = defaultdict(set)
    for p in splits_dir.iterdir():
        m = _HMDB_FILE.match(p.name)
        if m is not None:
            found[int(m["n"])].add(m["cls"])
    classes = sorted(set().union(*(found[n] for n in numbers)))
    if not classes:
        wanted = ", ".join(f"*_test_split{n}.txt" for n in numbers)
        raise DatasetError(f"{splits_dir}: missing split files ({wanted})")
    label_of = {c: i for i, c in enumerate(classes)}

    entries: dict[str, _Entry] = {}
    for k, n in enumerate(numbers):
        for cls in classes:
            list_file = splits_dir / f"{cls}_test_split{n}.txt"
            if not list_file.is_file():
                raise DatasetError(f"{list_file}: missing split file (HMDB51 split {n})")
            for lineno, line in _lines(list_file):
                where = f"{list_file}:{lineno}"
                fields = line.rsplit(maxsplit=1)
                if len(fields) != 2 or fields[1] not in _HMDB_MARKERS:
                    raise DatasetError(f"{where}: expected '<video> <0|1|2>', got {line!r}")
                rel = PurePosixPath(cls) / fields[0]
                _add_entry(
                    entries,
                    video_id=safe_id(PurePosixPath(fields[0]).stem),
                    path=resolver.join(rel),
                    label=label_of[cls],
                    group="",
                    split_index=k,
                    role=_HMDB_MARKERS[fields[1]],
                    n_splits=len(numbers),
                    source=where,
                )
    manifest = _manifest_from_entries(classes, [str(n) for n in numbers], entries)
    _summary("HMDB51", manifest)
    return manifest


def folder_manifest(
    *,
    root: Path,
    group_pattern: str | None,
    test_fraction: float,
    seed: int,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> Manifest:
    """One sub-folder of ``root`` per class (sorted by name), its videos found recursively.

    Single split "1", made by ``split_train_test``. With ``group_pattern`` (a regex with one
    capture group, searched in the file name) the split keeps groups apart, and a file name it
    does not match is an error. Hidden files and folders are skipped; videos are never opened.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory (folder dataset root)")
    pattern = _compile_group_pattern(group_pattern) if group_pattern is not None else None
    exts = {(e if e.startswith(".") else f".{e}").lower() for e in extensions}

    class_dirs = sorted(
        (d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: d.name,
    )
    if not class_dirs:
        raise DatasetError(f"{root}: no class sub-folders")
    items: list[_Item] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            p
            for p in class_dir.rglob("*")
            if p.suffix.lower() in exts
            and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
            and p.is_file()
        )
        if not files:
            log.warning("%s: class folder holds no video (%s)", class_dir, ", ".join(sorted(exts)))
        for p in files:
            group = ""
            if pattern is not None:
                found = _group_from_name(pattern, p.name)
                if found is None:
                    raise DatasetError(
                        f"{p}: file name does not match group_pattern {pattern.pattern!r}"
                    )
                group = found
            items.append(_Item(safe_id(p.stem), p, label, group, str(p)))
    if not items:
        raise DatasetError(f"{root}: no video files ({', '.join(sorted(exts))}) in class folders")
    _check_unique(items)
    entries = _split_items(
        items, grouped=pattern is not None, test_fraction=test_fraction, seed=seed
    )
    manifest = _manifest_from_entries([d.name for d in class_dirs], ["1"], entries)
    _summary(f"folder {root}", manifest)
    return manifest


def csv_manifest(
    *,
    csv_path: Path,
    root: Path | None,
    test_fraction: float,
    seed: int,
    group_pattern: str | None = None,
) -> Manifest:
    """A CSV table with a header row ``path,label[,split][,group]`` (any column order).

    label is a class name (classes sorted by name); relative paths resolve against ``root``, or
    the CSV's folder when ``root`` is None. split is train / test / unused; without a split
    column the single split "1" is made by ``split_train_test``, keeping groups apart when a
    group column or ``group_pattern`` (searched in the file name) gives them. An empty group
    cell is a group of its own. Bad rows raise DatasetError("<csv>:<line>: <reason>").
    """
    csv_path = Path(csv_path)
    base = Path(root if root is not None else csv_path.parent).absolute()
    pattern = _compile_group_pattern(group_pattern) if group_pattern is not None else None
    reader = csv.reader(io.StringIO(_read_text(csv_path, encoding="utf-8-sig"), newline=""))
    expected = "path,label[,split][,group]"
    header = next(reader, None)
    if header is None:
        raise DatasetError(f"{csv_path}: empty file, expected a header row {expected}")
    columns = [h.strip().lower() for h in header]
    unknown = [c for c in columns if c not in ("path", "label", "split", "group")]
    if unknown or "path" not in columns or "label" not in columns:
        raise DatasetError(f"{csv_path}:1: header must be {expected}, got {','.join(header)}")
    if len(set(columns)) != len(columns):
        raise DatasetError(f"{csv_path}:1: repeated column in header {','.join(header)}")
    has_split = "split" in columns
    if pattern is not None and "group" in columns:
        raise DatasetError(f"{csv_path}: has a group column and group_pattern is set; use one")

    rows: list[tuple[str, Path, str, str, str]] = []  # source, path, label name, group, split
    for row in reader:
        where = f"{csv_path}:{reader.line_num}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(columns):
            raise DatasetError(f"{where}: expected {len(columns)} fields, got {len(row)}")
        cell = {c: v.strip() for c, v in zip(columns, row, strict=True)}
        if not cell["path"]:
            raise DatasetError(f"{where}: empty path")
        if not cell["label"]:
            raise DatasetError(f"{where}: empty label (expected a class name)")
        role = cell.get("split", "").lower()
        if has_split and role not in PARTS:
            raise DatasetError(f"{where}: split {cell['split']!r} is not one of {PARTS}")
        path = base / Path(cell["path"])  # an absolute path replaces base
        group = cell.get("group", "")
        if pattern is not None:
            found = _group_from_name(pattern, path.name)
            if found is None:
                raise DatasetError(
                    f"{where}: {path.name} does not match group_pattern {pattern.pattern!r}"
                )
            group = found
        rows.append((where, path, cell["label"], group, role))
    if not rows:
        raise DatasetError(f"{csv_path}: no data rows after the header")

    classes = sorted({label for _, _, label, _, _ in rows})
    label_of = {c: i for i, c in enumerate(classes)}
    items = [
        _Item(safe_id(path.stem), path, label_of[label], group, where)
        for where, path, label, group, _ in rows
    ]
    _check_unique(items)
    if has_split:
        entries = {
            it.video_id: _Entry(it.path, it.label, it.group, it.source, [role])
            for it, (_, _, _, _, role) in zip(items, rows, strict=True)
        }
    else:
        grouped = pattern is not None or "group" in columns
        entries = _split_items(items, grouped=grouped, test_fraction=test_fraction, seed=seed)
    manifest = _manifest_from_entries(classes, ["1"], entries)
    _summary(f"csv {csv_path}", manifest)
    return manifest
