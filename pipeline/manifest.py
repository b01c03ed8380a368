"""The manifest: which videos exist, their class, their group and their role in each split.

A ``Manifest`` is what every stage after ``prepare`` reads. It is stored with ``write_manifest``
and read back, unchanged, with ``read_manifest``; ``split_train_test`` is the seeded splitter the
adapters in ``pipeline.datasets`` use when a dataset has no official split.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import operator
import os
import random
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

PARTS = ("train", "test", "unused")
_CLASSES_PREFIX = "#classes="
_FIXED_COLUMNS = ("video_id", "path", "label", "label_name", "group")


class DatasetError(ValueError):
    """A dataset description is wrong; the message is '<file>[:<line>]: <reason>'."""


# ----------------------------------------------------------------------------- video ids
#
# An id is a '/'-separated path of NFC-normalised Unicode components. It is a key in CSV and
# JSON files and in the caches (which store each video under a hash of its id, never under the
# id itself), so it must survive them unchanged and read the same in a log: no control or
# invisible formatting characters, no empty, "." or ".." components, no component that starts
# with "." or starts or ends with white space. Characters that would break one of these rules are
# percent-escaped (UTF-8 bytes as %XX, and "%" itself as %25), not replaced: replacing them with
# "_" made distinct names one id and aborted the whole prepare stage.

# Controls (Cc), surrogates (Cs: bytes of a file name that is not UTF-8), line and paragraph
# separators (Zl, Zp: str.splitlines breaks on them) and invisible formatting (Cf: direction
# marks make an id display reversed). Unassigned code points (Cn) are kept: which ones are
# unassigned depends on the Python version, and an id must not.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cs", "Cf", "Zl", "Zp"})
# The zero-width (non-)joiners are Cf but part of the correct spelling of Persian and Indic
# words and of emoji sequences.
_KEPT_FORMAT = frozenset({"\u200c", "\u200d"})


def _unsafe_char(c: str) -> bool:
    return unicodedata.category(c) in _ESCAPED_CATEGORIES and c not in _KEPT_FORMAT


def _percent(c: str) -> str:
    if "\udc80" <= c <= "\udcff":  # a byte os.fsdecode could not decode: escape that byte
        data = c.encode("utf-8", "surrogateescape")
    else:
        data = c.encode("utf-8", "surrogatepass")
    return "".join(f"%{b:02X}" for b in data)


def _escape_component(part: str) -> str:
    """One path component of an id: unsafe characters, "%", a leading "." and white space at
    either end percent-escaped. Injective: distinct components give distinct results."""
    n = len(part)
    lead = 0
    while lead < n and part[lead].isspace():
        lead += 1
    trail = n
    while trail > lead and part[trail - 1].isspace():
        trail -= 1
    out: list[str] = []
    escaped = False
    for i, c in enumerate(part):
        # A combining mark right after an escape would compose with its last hex digit under
        # NFC ("%0A" + U+0301 -> "%0Á"), and the id would no longer be NFC: escape it too.
        escaped = (
            c == "%"
            or _unsafe_char(c)
            or i < lead
            or i >= trail
            or (i == 0 and c == ".")
            or (escaped and unicodedata.combining(c) != 0)
        )
        out.append(_percent(c) if escaped else c)
    return "".join(out)


def path_id(rel: PurePosixPath | str) -> str:
    """The id of a video at ``rel``, its path relative to the dataset root (folder and CSV
    datasets): that path without its extension, NFC-normalised, each component escaped
    (``walking/clip_01.avi`` -> ``walking/clip_01``, ``бег_01.avi`` -> ``бег_01``).

    Distinct paths give distinct ids, except paths that differ only in their extension or
    are equal after NFC normalisation. Raises ValueError for a path with no file name or with a
    ".." component (it would not be relative to the root)."""
    rel = PurePosixPath(unicodedata.normalize("NFC", str(rel)))
    if rel.is_absolute() or not rel.parts or ".." in rel.parts:
        raise ValueError(f"{str(rel)!r} is not a relative path below the dataset root")
    if rel.suffix:
        rel = rel.with_suffix("")
    return "/".join(_escape_component(part) for part in rel.parts)


def name_id(name: str) -> str:
    """The id of a UCF101 or HMDB51 video from its file name without extension: ASCII
    characters other than ``[A-Za-z0-9_.-]`` become ``_``, as ids of these datasets have always
    been made, so caches made before stay valid (the official names are unique under this rule:
    tested on the split files); other characters are kept and escaped as ``path_id`` does."""
    name = unicodedata.normalize("NFC", name)
    name = "".join("_" if c.isascii() and not (c.isalnum() or c in "_.-") else c for c in name)
    return _escape_component(name)


def id_problem(video_id: object) -> str | None:
    """Why ``video_id`` cannot be a video id, or None when it can: what ``path_id`` and
    ``name_id`` make always can, and so can every id of a manifest written before ids were
    paths (``[A-Za-z0-9_.-]``, not starting with ".")."""
    if not isinstance(video_id, str) or not video_id:
        return "is empty or not a string"
    bad = next((c for c in video_id if _unsafe_char(c)), None)
    if bad is not None:
        return f"holds the control or formatting character U+{ord(bad):04X}"
    if not unicodedata.is_normalized("NFC", video_id):
        return "is not NFC-normalised Unicode"
    for part in video_id.split("/"):
        if not part:
            return "has an empty path component (a leading, trailing or double '/')"
        if part.startswith("."):
            return f"has a path component {part!r} that starts with '.'"
        if part != part.strip():
            return f"has a path component {part!r} that starts or ends with white space"
    return None


@dataclass(frozen=True)
class VideoRecord:
    """One video: its id (see ``path_id``, ``name_id``), its absolute path, its class and its
    role in each split.

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
        problem = id_problem(self.video_id)
        if problem is not None:
            raise DatasetError(f"{self.path}: video_id {self.video_id!r} {problem}")
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


def _read_text(path: Path, *, encoding: str = "utf-8") -> str:
    try:
        return path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing file") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a directory, expected a file") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not {encoding} text ({e.reason} at byte {e.start})") from None


def portable_path(path: Path) -> str:
    """How a video path is written into a manifest or a plan: relative to the working directory
    when the video is inside it, else absolute. DVC runs every stage in the project directory
    (where dvc.yaml is), so a video inside the project (the demo's, or a dataset under data/)
    is written the same in every clone, and a clone elsewhere keeps the DVC hashes of the
    prepare and decode outputs (nothing re-runs after `dvc pull`)."""
    path = Path(path)
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


def resolve_path(text: str) -> Path:
    """The absolute path of a stored video path (see ``portable_path``)."""
    return Path.cwd() / text  # an absolute ``text`` replaces the working directory


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
                [
                    v.video_id,
                    portable_path(v.path),
                    v.label,
                    manifest.classes[v.label],
                    v.group,
                    *v.splits,
                ]
            )
    os.replace(tmp, path)


def read_manifest(path: Path) -> Manifest:
    """Read a manifest written by ``write_manifest``; the exact inverse.

    The format did not change when folder and CSV ids became paths, and every id of an older
    manifest is still a valid id, so an older manifest is read with the ids it has; prepare
    writes the new ones when it runs again (DVC re-runs it: its code is a dependency)."""
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
                    path=resolve_path(vpath),
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
