"""Manifests: which videos exist, their class, their group and their role in each split.

Adapters turn a dataset's own description into a ``Listing``: one ``Manifest`` of the usable
videos, and the rows left out (``Rejected``: two rows that give one video id, a file name that
is not UTF-8), which prepare records as failures so that the rest goes on:

- ``ucf101_manifest``: the official ``classInd.txt`` / ``trainlist0N.txt`` / ``testlist0N.txt``;
- ``hmdb51_manifest``: the official ``<class>_test_splitN.txt`` files (1 train, 2 test, 0 unused);
- ``folder_manifest``: one sub-folder per class, split here (``split_train_test``);
- ``csv_manifest``: a ``path,label[,split][,group]`` table.

Video ids: UCF101 and HMDB51 videos are known by their file names, unique across each dataset
(``name_id``); a folder or CSV dataset's by their path under the root (``path_id``), since two
class folders may well hold a ``clip_01.avi`` each. No adapter opens a video: whether a file
decodes is the prepare stage's business. The manifest model, its storage, the id rules and the
splitter live in ``pipeline.manifest`` (re-exported here).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.manifest import (  # noqa: F401  (the manifest API is re-exported here)
    _CLASSES_PREFIX,
    PARTS,
    DatasetError,
    Manifest,
    VideoRecord,
    _grouped_split,
    _read_text,
    _stratified_split,
    id_problem,
    name_id,
    path_id,
    read_manifest,
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


def shown(path: Path) -> str:
    """``path`` as text that can be written anywhere: the bytes of a file name that is not
    UTF-8 (which Python holds as lone surrogates) as backslash escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Rejected:
    """Rows of a dataset description that cannot become one video, left out of the manifest.

    reason names every row (its file and line, or its path) and what is wrong; prepare records
    it as one failure, so one bad row costs its video and never the stage.
    """

    video_id: str
    paths: tuple[Path, ...]
    reason: str


@dataclass(frozen=True)
class Listing:
    """What an adapter found: the manifest of the usable videos, and the rows it left out."""

    manifest: Manifest
    rejected: tuple[Rejected, ...]


@dataclass(frozen=True)
class _Row:
    """One mention of a video in a dataset description (a line of a split list, a CSV row, a
    file of a folder dataset)."""

    video_id: str
    path: Path
    label: int
    group: str
    source: str  # "<file>:<line>" where it was listed, or the path itself
    split_index: int = 0
    role: str = ""  # "" = not given: split_train_test assigns it after collecting

    def where(self) -> str:
        shown_path = shown(self.path)
        return shown_path if self.source == str(self.path) else f"{self.source} ({shown_path})"


@dataclass
class _Entry:
    """A video collected from its rows: its role in every split ("unused" where not listed)."""

    path: Path
    label: int
    group: str
    splits: list[str]


def _same_file(a: Path, b: Path, *, fold_case: bool) -> bool:
    x, y = os.path.normpath(a), os.path.normpath(b)
    return x.lower() == y.lower() if fold_case else x == y


def _clash(
    video_id: str, rows: Sequence[_Row], *, split_names: Sequence[str], rule: str, fold_case: bool
) -> str:
    """Why ``rows``, which share ``video_id``, cannot be one video: the reason prepare records."""
    first = rows[0]
    same = all(_same_file(r.path, first.path, fold_case=fold_case) for r in rows)
    if same and len({r.label for r in rows}) > 1:
        cause = "one file listed under different classes"
    elif same:
        twice = Counter(r.split_index for r in rows).most_common(1)[0][0]
        where = f" in split {split_names[twice]}" if len(split_names) > 1 else ""
        cause = f"the same file listed more than once{where}"
    elif len({os.path.splitext(os.path.normpath(r.path))[0] for r in rows}) == 1:
        cause = "files that differ only in their extension"
    elif len({unicodedata.normalize("NFC", str(r.path)) for r in rows}) == 1:
        cause = "file names equal after Unicode NFC normalisation"
    else:
        cause = f"different files that give one id ({rule})"
    listed = "; ".join(r.where() for r in rows)
    return f"duplicate video id {video_id!r}: {cause}, left out: {listed}"


def _collect(
    rows: Sequence[_Row], *, split_names: Sequence[str], rule: str, fold_case: bool = False
) -> tuple[dict[str, _Entry], list[Rejected]]:
    """Rows -> {id: entry} and the ids left out. An id may be listed once per split, always for
    the same file (ignoring case with ``fold_case``: official lists and archives disagree on it)
    and class; any other repetition leaves the id out, as one ``Rejected`` naming every row,
    since which row is right cannot be known."""
    by_id: dict[str, list[_Row]] = defaultdict(list)
    for r in rows:
        by_id[r.video_id].append(r)
    entries: dict[str, _Entry] = {}
    rejected: list[Rejected] = []
    for vid, mine in by_id.items():
        first = mine[0]
        fine = len({r.split_index for r in mine}) == len(mine) and all(
            r.label == first.label
            and r.group == first.group
            and _same_file(r.path, first.path, fold_case=fold_case)
            for r in mine
        )
        if not fine:
            reason = _clash(vid, mine, split_names=split_names, rule=rule, fold_case=fold_case)
            log.warning("%s", reason)
            rejected.append(Rejected(vid, tuple(r.path for r in mine), reason))
            continue
        entry = _Entry(first.path, first.label, first.group, ["unused"] * len(split_names))
        for r in mine:
            entry.splits[r.split_index] = r.role
        entries[vid] = entry
    return entries, rejected


def _listing(
    classes: Sequence[str],
    split_names: Sequence[str],
    entries: dict[str, _Entry],
    rejected: Sequence[Rejected],
) -> Listing:
    videos = tuple(
        VideoRecord(video_id=vid, path=e.path, label=e.label, group=e.group, splits=tuple(e.splits))
        for vid, e in sorted(entries.items(), key=lambda kv: (kv[1].label, kv[0]))
    )
    manifest = Manifest(classes=tuple(classes), split_names=tuple(split_names), videos=videos)
    return Listing(manifest, tuple(sorted(rejected, key=lambda r: r.video_id)))


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


def _split_entries(
    entries: dict[str, _Entry], *, grouped: bool, test_fraction: float, seed: int
) -> None:
    """Fill in the single split's role of every entry with ``split_train_test``, in
    (label, id) order so that the split depends on the dataset, not on listing order."""
    order = sorted(entries, key=lambda vid: (entries[vid].label, vid))
    roles = split_train_test(
        [entries[vid].label for vid in order],
        [entries[vid].group for vid in order] if grouped else None,
        test_fraction=test_fraction,
        seed=seed,
    )
    for vid, role in zip(order, roles, strict=True):
        entries[vid].splits[0] = role


def _summary(name: str, listing: Listing) -> Listing:
    m = listing.manifest
    if listing.rejected:
        log.warning(
            "%s: %d video id(s) left out (duplicates or unusable names; prepare records them)",
            name,
            len(listing.rejected),
        )
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
    return listing


# ----------------------------------------------------------------------------- adapters


_OFFICIAL_RULE = "ids of UCF101 and HMDB51 videos are their file names"


def ucf101_manifest(*, root: Path, splits_dir: Path, splits: Sequence[int]) -> Listing:
    """UCF101 from its official ``classInd.txt``, ``trainlist0N.txt`` and ``testlist0N.txt``.

    root: the folder holding one sub-folder per class (need not exist yet). The label of a video
    is its folder's class (matched to classInd.txt ignoring case); a label in a train list must
    agree with it. group is the "gXX" of the file name. A video in no list of a split is "unused"
    there. Ids are file names (``name_id``): ``v_ApplyEyeMakeup_g08_c01``.
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

    rows: list[_Row] = []
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
                rows.append(
                    _Row(
                        video_id=name_id(rel.stem),
                        path=resolver.join(rel),
                        label=label,
                        group=m.group(1).lower() if m else "",
                        source=where,
                        split_index=k,
                        role=role,
                    )
                )
    names = [str(n) for n in numbers]
    entries, rejected = _collect(rows, split_names=names, rule=_OFFICIAL_RULE, fold_case=True)
    return _summary("UCF101", _listing(classes, names, entries, rejected))


def hmdb51_manifest(*, root: Path, splits_dir: Path, splits: Sequence[int]) -> Listing:
    """HMDB51 from its official ``<class>_test_split<N>.txt`` files (1 train, 2 test, 0 unused).

    Classes are the sorted class names of the split files; path is root/<class>/<video>; HMDB51
    has no groups, so group is "". Ids are file names (``name_id``), "!", "(", "[" and the like
    as "_".
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

    rows: list[_Row] = []
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
                rows.append(
                    _Row(
                        video_id=name_id(PurePosixPath(fields[0]).stem),
                        path=resolver.join(rel),
                        label=label_of[cls],
                        group="",
                        source=where,
                        split_index=k,
                        role=_HMDB_MARKERS[fields[1]],
                    )
                )
    names = [str(n) for n in numbers]
    entries, rejected = _collect(rows, split_names=names, rule=_OFFICIAL_RULE, fold_case=True)
    return _summary("HMDB51", _listing(classes, names, entries, rejected))


_PATH_RULE = "ids are paths under the root without their extension"


def folder_manifest(
    *,
    root: Path,
    group_pattern: str | None,
    test_fraction: float,
    seed: int,
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
) -> Listing:
    """One sub-folder of ``root`` per class (sorted by name), its videos found recursively.

    Single split "1", made by ``split_train_test``. With ``group_pattern`` (a regex with one
    capture group, searched in the file name) the split keeps groups apart, and a file name it
    does not match is an error. Hidden files and folders are skipped; videos are never opened.
    Ids are paths under ``root`` (``path_id``): ``walking/clip_01``. A file whose name is not
    UTF-8 is left out (``Rejected``): its path could not be written into the manifest.
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
    for d in class_dirs:
        if shown(Path(d.name)) != d.name:
            raise DatasetError(
                f"{shown(d)}: class folder name is not UTF-8 text; rename it (the class name "
                "is written into the manifest and the results)"
            )
    rows: list[_Row] = []
    unreadable: list[Rejected] = []
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
            vid = path_id(PurePosixPath(*p.relative_to(root).parts))
            if shown(p) != str(p):
                reason = f"{shown(p)}: file name is not UTF-8 text, left out; rename it"
                log.warning("%s", reason)
                unreadable.append(Rejected(vid, (p,), reason))
                continue
            group = ""
            if pattern is not None:
                found = _group_from_name(pattern, p.name)
                if found is None:
                    raise DatasetError(
                        f"{p}: file name does not match group_pattern {pattern.pattern!r}"
                    )
                group = found
            rows.append(_Row(vid, p, label, group, source=str(p)))
    if not rows and not unreadable:
        raise DatasetError(f"{root}: no video files ({', '.join(sorted(exts))}) in class folders")
    entries, rejected = _collect(rows, split_names=["1"], rule=_PATH_RULE)
    _split_entries(entries, grouped=pattern is not None, test_fraction=test_fraction, seed=seed)
    classes = [d.name for d in class_dirs]
    return _summary(f"folder {root}", _listing(classes, ["1"], entries, rejected + unreadable))


def csv_manifest(
    *,
    csv_path: Path,
    root: Path | None,
    test_fraction: float,
    seed: int,
    group_pattern: str | None = None,
) -> Listing:
    """A CSV table with a header row ``path,label[,split][,group]`` (any column order).

    label is a class name (classes sorted by name); relative paths resolve against ``root``, or
    the CSV's folder when ``root`` is None. split is train / test / unused; without a split
    column the single split "1" is made by ``split_train_test``, keeping groups apart when a
    group column or ``group_pattern`` (searched in the file name) gives them. An empty group
    cell is a group of its own. Bad rows raise DatasetError("<csv>:<line>: <reason>").

    Ids are paths under the root without extension (``path_id``; a path outside it: its
    absolute path less the leading "/"). Rows that give one id (a file listed twice, ``a.avi``
    beside ``a.mp4``) are left out together as one ``Rejected``.
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

    parsed: list[tuple[str, Path, str, str, str]] = []  # source, path, label, group, split
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
        parsed.append((where, path, cell["label"], group, role))
    if not parsed:
        raise DatasetError(f"{csv_path}: no data rows after the header")

    classes = sorted({label for _, _, label, _, _ in parsed})
    label_of = {c: i for i, c in enumerate(classes)}
    rows = [
        _Row(_csv_id(path, base, where), path, label_of[label], group, where, role=role)
        for where, path, label, group, role in parsed
    ]
    entries, rejected = _collect(rows, split_names=["1"], rule=_PATH_RULE)
    if not has_split:
        grouped = pattern is not None or "group" in columns
        _split_entries(entries, grouped=grouped, test_fraction=test_fraction, seed=seed)
    return _summary(f"csv {csv_path}", _listing(classes, ["1"], entries, rejected))


def _csv_id(path: Path, base: Path, where: str) -> str:
    """The id of a CSV row's video: its path under ``base``, or, outside it, its absolute path
    less the leading "/" (lexically normalised, so ``./a.avi`` and ``a.avi`` are one file)."""
    norm = PurePosixPath(os.path.normpath(path))
    try:
        rel = norm.relative_to(os.path.normpath(base))
    except ValueError:
        rel = norm.relative_to(norm.anchor)
    try:
        return path_id(rel)
    except ValueError as e:
        raise DatasetError(f"{where}: path {shown(path)} names no video file ({e})") from None
