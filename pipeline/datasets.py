"""Manifests: which videos exist, their class, their group and their role in each split.

Adapters turn a dataset's own description into one ``Manifest``:

- ``ucf101_manifest``: the official ``classInd.txt`` / ``trainlist0N.txt`` / ``testlist0N.txt``;
- ``hmdb51_manifest``: the official ``<class>_test_splitN.txt`` files (1 train, 2 test, 0 unused);
- ``folder_manifest``: one sub-folder per class, split here (``split_train_test``);
- ``csv_manifest``: a ``path,label[,split][,group]`` table.

No adapter opens a video: whether a file decodes is the prepare stage's business. A manifest is
stored with ``write_manifest`` and read back, unchanged, with ``read_manifest``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import operator
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

PARTS = ("train", "test", "unused")
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mkv", ".webm", ".gif", ".mpg", ".mpeg")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_UCF_GROUP = re.compile(r"_(g\d+)_c\d+", re.IGNORECASE)
_HMDB_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<n>\d+)\.txt$")
_HMDB_MARKERS = {"0": "unused", "1": "train", "2": "test"}
_CLASSES_PREFIX = "#classes="
_FIXED_COLUMNS = ("video_id", "path", "label", "label_name", "group")


class DatasetError(ValueError):
    """A dataset description is wrong; the message is '<file>[:<line>]: <reason>'."""


def safe_id(name: str) -> str:
    """``name`` with every character outside ``[A-Za-z0-9_.-]`` replaced by ``_``."""
    return _UNSAFE.sub("_", name)


@dataclass(frozen=True)
class VideoRecord:
    """One video: a storage-safe id, its absolute path, its class and its role in each split.

    splits: one of "train" / "test" / "unused" per ``Manifest.split_names`` entry, same order.
    """

    video_id: str
    path: Path
    label: int
    group: str
    splits: tuple[str, ...]

    def __post_init__(self) -> None:
        # Coerce the two fields most easily passed with the wrong type (str, list); a frozen
        # dataclass must use object.__setattr__ to do it.
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "splits", tuple(self.splits))
        try:
            object.__setattr__(self, "label", operator.index(self.label))
        except TypeError:
            raise DatasetError(f"{self.path}: label {self.label!r} is not an integer") from None
        if (
            not self.video_id
            or self.video_id in (".", "..")
            or safe_id(self.video_id) != self.video_id
        ):
            raise DatasetError(f"{self.path}: video_id {self.video_id!r} is not a safe id")
        if not self.path.is_absolute():
            raise DatasetError(f"{self.path}: video path is not absolute")
        if self.label < 0:
            raise DatasetError(f"{self.path}: label {self.label!r} is not a class index")
        bad = [s for s in self.splits if s not in PARTS]
        if bad:
            raise DatasetError(f"{self.path}: split role(s) {bad} not in {PARTS}")


@dataclass(frozen=True)
class Manifest:
    """Classes, split names and videos of one dataset.

    ``videos[i].label`` indexes ``classes``; ``videos[i].splits[k]`` is the role of that video in
    split ``split_names[k]``. Video ids are unique.
    """

    classes: tuple[str, ...]
    split_names: tuple[str, ...]
    videos: tuple[VideoRecord, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "split_names", tuple(self.split_names))
        object.__setattr__(self, "videos", tuple(self.videos))
        if not self.split_names:
            raise ValueError("a manifest needs at least one split name")
        if len(set(self.split_names)) != len(self.split_names):
            raise ValueError(f"duplicate split names in {self.split_names}")
        if len(set(self.classes)) != len(self.classes):
            dups = sorted(c for c, n in Counter(self.classes).items() if n > 1)
            raise ValueError(f"duplicate class names {dups}")
        index: dict[str, int] = {}
        for i, v in enumerate(self.videos):
            if v.label >= len(self.classes):
                raise DatasetError(f"{v.path}: label {v.label} >= {len(self.classes)} classes")
            if len(v.splits) != len(self.split_names):
                raise DatasetError(
                    f"{v.path}: {len(v.splits)} split roles for {len(self.split_names)} splits"
                )
            if v.video_id in index:
                other = self.videos[index[v.video_id]].path
                raise DatasetError(f"duplicate video_id {v.video_id!r}: {other} and {v.path}")
            index[v.video_id] = i

    def subset(self, split: str, part: str) -> list[VideoRecord]:
        """Videos whose role in ``split`` (in ``split_names``) is ``part`` (train/test/unused)."""
        if split not in self.split_names:
            raise ValueError(f"unknown split {split!r}; this manifest has {self.split_names}")
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")
        k = self.split_names.index(split)
        return [v for v in self.videos if v.splits[k] == part]

    def without(self, video_ids: Iterable[str]) -> Manifest:
        """The same manifest less the given ids (ids it does not hold are ignored).

        Classes are kept even when all their videos go, so labels keep their meaning.
        """
        drop = set(video_ids)
        kept = tuple(v for v in self.videos if v.video_id not in drop)
        return Manifest(classes=self.classes, split_names=self.split_names, videos=kept)


# ----------------------------------------------------------------------------- splitting


def split_train_test(
    labels: Sequence[int], groups: Sequence[str] | None, *, test_fraction: float, seed: int
) -> list[str]:
    """A seeded, class-stratified train/test split: one "train" or "test" per video.

    Without ``groups``, every class with n >= 2 videos gets round(n * test_fraction) test videos,
    at least 1 and at most n - 1. With ``groups``, all videos of a group land on the same side
    (an empty group string is a group of its own); groups are keyed by their string across
    classes, since a subject id shared by several classes is the same person. The assignment
    then minimises, per class, the squared distance to n * test_fraction test videos, first of
    all making sure that every class present in >= 2 groups has both a train and a test video.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if groups is not None and len(groups) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(groups)} groups")
    rng = random.Random(seed)
    if groups is None:
        out = _stratified_split(labels, test_fraction, rng)
    else:
        out = _grouped_split(labels, groups, test_fraction, rng)
    if labels and "test" not in out:
        log.warning("split_train_test: the test part is empty (%d videos)", len(labels))
    return out


def _stratified_split(labels: Sequence[int], test_fraction: float, rng: random.Random) -> list[str]:
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    out = ["train"] * len(labels)
    for y in sorted(by_class):
        idx = by_class[y]
        n = len(idx)
        if n < 2:
            continue
        n_test = min(max(int(n * test_fraction + 0.5), 1), n - 1)
        rng.shuffle(idx)
        for i in idx[:n_test]:
            out[i] = "test"
    return out


def _grouped_split(
    labels: Sequence[int], groups: Sequence[str], test_fraction: float, rng: random.Random
) -> list[str]:
    keys = [g if g else f"\0{i}" for i, g in enumerate(groups)]  # "" = a group of its own
    group_of: dict[str, int] = {}
    members: list[list[int]] = []
    for i, key in enumerate(keys):
        g = group_of.setdefault(key, len(members))
        if g == len(members):
            members.append([])
        members[g].append(i)
    n_groups = len(members)
    out = ["train"] * len(labels)
    if n_groups < 2:
        return out

    counts = [Counter(labels[i] for i in m) for m in members]
    sizes = [len(m) for m in members]
    n_class = Counter(labels)
    n_total = len(labels)
    target = {c: test_fraction * n for c, n in n_class.items()}
    groups_per_class = Counter(c for cnt in counts for c in cnt)
    splittable = {c for c, k in groups_per_class.items() if k >= 2}
    # Larger than the whole quadratic term (each class contributes at most n_c), so a class
    # without train or test videos is never traded for a closer fraction elsewhere.
    penalty = float(n_total + 1)

    def class_cost(c: int, t: int) -> float:
        cost = (t - target[c]) ** 2 / n_class[c]
        if c in splittable and (t == 0 or t == n_class[c]):
            cost += penalty
        return cost

    def total_cost(t: int) -> float:
        return penalty if t in (0, n_total) else 0.0

    test_count: Counter[int] = Counter()
    test_total = 0
    in_test = [False] * n_groups

    def delta(g: int) -> float:
        """Change of cost if group g switched sides."""
        sign = -1 if in_test[g] else 1
        d = 0.0
        for c, k in counts[g].items():
            t = test_count[c]
            d += class_cost(c, t + sign * k) - class_cost(c, t)
        return d + total_cost(test_total + sign * sizes[g]) - total_cost(test_total)

    def flip(g: int) -> None:
        nonlocal test_total
        sign = -1 if in_test[g] else 1
        for c, k in counts[g].items():
            test_count[c] += sign * k
        test_total += sign * sizes[g]
        in_test[g] = not in_test[g]

    # Greedy, largest groups first (seeded order among equal sizes), then single-group moves
    # until none lowers the cost.
    order = list(range(n_groups))
    rng.shuffle(order)
    order.sort(key=lambda g: -sizes[g])
    for g in order:
        if delta(g) < 0:
            flip(g)
    for _ in range(100):
        moved = False
        for g in order:
            if delta(g) < -1e-9:
                flip(g)
                moved = True
        if not moved:
            break

    for g, m in enumerate(members):
        if in_test[g]:
            for i in m:
                out[i] = "test"
    return out


# ----------------------------------------------------------------------------- helpers


def _check_split_numbers(splits: Sequence[int]) -> list[int]:
    numbers = [int(n) for n in splits]
    if not numbers:
        raise ValueError("splits must name at least one split")
    if len(set(numbers)) != len(numbers) or any(n < 1 for n in numbers):
        raise ValueError(f"splits must be distinct numbers >= 1, got {list(splits)}")
    return numbers


def _read_text(path: Path, *, encoding: str = "utf-8") -> str:
    try:
        return path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing file") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a directory, expected a file") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not {encoding} text ({e.reason} at byte {e.start})") from None


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


# ----------------------------------------------------------------------------- storage


def write_manifest(manifest: Manifest, path: Path) -> None:
    """Write ``manifest`` as CSV: a ``#classes=<json list>`` line (so classes without videos
    survive), then video_id,path,label,label_name,group,split_<name>... ; atomic replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        f.write(_CLASSES_PREFIX + json.dumps(list(manifest.classes), ensure_ascii=False) + "\n")
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([*_FIXED_COLUMNS, *(f"split_{s}" for s in manifest.split_names)])
        for v in manifest.videos:
            writer.writerow(
                [v.video_id, str(v.path), v.label, manifest.classes[v.label], v.group, *v.splits]
            )
    os.replace(tmp, path)


def read_manifest(path: Path) -> Manifest:
    """Read a manifest written by ``write_manifest``; the exact inverse."""
    path = Path(path)
    first, _, rest = _read_text(path).partition("\n")
    if not first.startswith(_CLASSES_PREFIX):
        raise DatasetError(f"{path}:1: expected a '{_CLASSES_PREFIX}[...]' line (not a manifest)")
    try:
        classes = json.loads(first[len(_CLASSES_PREFIX) :])
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:1: classes line is not JSON ({e.msg})") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DatasetError(f"{path}:1: classes must be a JSON list of strings")

    reader = csv.reader(io.StringIO(rest, newline=""))
    header = next(reader, None)
    n_fixed = len(_FIXED_COLUMNS)
    if (
        header is None
        or tuple(header[:n_fixed]) != _FIXED_COLUMNS
        or len(header) == n_fixed
        or not all(h.startswith("split_") for h in header[n_fixed:])
    ):
        raise DatasetError(
            f"{path}:2: header must be {','.join(_FIXED_COLUMNS)},split_<name>..., got {header}"
        )
    split_names = [h[len("split_") :] for h in header[n_fixed:]]
    videos = []
    for row in reader:
        where = f"{path}:{reader.line_num + 1}"  # +1: the classes line
        if len(row) != len(header):
            raise DatasetError(f"{where}: expected {len(header)} fields, got {len(row)}")
        video_id, vpath, label, label_name, group, *roles = row
        if not label.isdigit() or int(label) >= len(classes):
            raise DatasetError(
                f"{where}: label {label!r} is not an index into {len(classes)} classes"
            )
        if classes[int(label)] != label_name:
            raise DatasetError(
                f"{where}: label_name {label_name!r} != class {int(label)} {classes[int(label)]!r}"
            )
        try:
            videos.append(
                VideoRecord(
                    video_id=video_id,
                    path=Path(vpath),
                    label=int(label),
                    group=group,
                    splits=tuple(roles),
                )
            )
        except DatasetError as e:
            raise DatasetError(f"{where}: {e}") from None
    try:
        return Manifest(
            classes=tuple(classes), split_names=tuple(split_names), videos=tuple(videos)
        )
    except ValueError as e:
        raise DatasetError(f"{path}: {e}") from None
