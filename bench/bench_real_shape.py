"""A UCF101- or HMDB51-shaped end-to-end run: every video name of the official split lists as a
tiny generated clip, the whole DVC pipeline (every head on both streams, the joint head, fusion,
evaluate) on all three splits, with each stage's wall time and peak memory.

    python bench/bench_real_shape.py --dataset hmdb51                 # full size: 6,766 videos
    python bench/bench_real_shape.py --dataset ucf101 --classes 5     # a quick try
    python bench/bench_real_shape.py --dataset ucf101 --epochs 2 --workdir /work/bench_work

What it measures is the pipeline at the real datasets' *shape* (13,320 or 6,766 videos, 101 or
51 classes, three splits of the official sizes, XviD AVIs, names with HMDB51's "!", "(", "[")
on clips small enough for 2 CPU cores: stage overheads, per-video costs at 32 px, memory, and
whether every stage and every head gets through. The accuracies are of a synthetic task, not of
UCF101 or HMDB51.

The dataset. Every file name of the split lists (/work/shared/testdata/splits) becomes a 32x32
XviD (MPEG-4 part 2, codec tag XVID, up to 2 B-frames, as most UCF101 and HMDB51 files are) AVI
written with PyAV, at ``<root>/<class>/<name>`` as pipeline/datasets.py expects them
(``UCF-101/<Class>/v_<Class>_gXX_cYY.avi``, ``hmdb51_org/<class>/<name>.avi``). A clip shows a
disc moving over a static per-video noise texture, with per-frame noise; its class sets the
direction (8), the speed (3) and the hue (golden-ratio steps over the classes) of the disc, the
video sets its start, size and the texture. So flow sees direction and speed, RGB sees hue, and
the heads have something to learn. Lengths are drawn per video from a log-normal shaped like
each dataset's clip lengths, then scaled down and clipped to [12, 40] frames: UCF101 median 160
frames, sigma 0.55, truncated to its 29..1776 frames (25 fps), divided by 6 (median 27 frames);
HMDB51 median 90 frames, sigma 0.5, truncated to 19..1000 (30 fps), divided by 3 (median 30).
These shapes are assumed from the datasets' published length ranges, not fitted to them. Files
are generated in parallel (2 processes), written under a temporary name and renamed, and kept
under ``--workdir``/datasets: a second run generates only what is missing.

The run. The working tree of /work/main (``git ls-files --cached --others --exclude-standard``:
tracked files and new files not yet committed, as they are now, so the run measures the code as
it stands) is copied to ``--workdir``/runs/<dataset>-<classes>/project, never touching
/work/main's data/ or DVC cache (the copy has its own .dvc/, set to ``core.no_scm``: it is not
a git repository). params.yaml gets the dataset and small settings (8 points, 1 flow pair,
Farneback, short side and crop 32, EfficientNet-Lite0 ImageNet on both streams, ``--epochs``
for every head, defaults otherwise: batch sizes, hidden sizes, 2 out-of-fold folds); every
stage's ``cmd`` in the copy's dvc.yaml is prefixed with bench/stage_meter.py, which records its
wall time and peak RSS; then ``dvc repro`` runs with /work/main/.venv/bin first on PATH.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import yaml

MAIN = Path(__file__).resolve().parents[1]
VENV_BIN = MAIN / ".venv" / "bin"
SPLITS = Path("/work/shared/testdata/splits")
SIZE = 32
FPS = {"ucf101": 25, "hmdb51": 30}
# (median frames, sigma of log length, min frames, max frames, divisor): see the module docstring
LENGTHS = {"ucf101": (160.0, 0.55, 29, 1776, 6.0), "hmdb51": (90.0, 0.5, 19, 1000, 3.0)}
MIN_FRAMES, MAX_FRAMES = 12, 40
GENERATOR_VERSION = 1  # bump when the clips change, so a cached tree is regenerated


@dataclass(frozen=True)
class Video:
    """One clip to generate: path under the dataset root, class index in the full dataset."""

    rel: str
    label: int


@dataclass(frozen=True)
class Layout:
    """A dataset as the official lists give it: classes in label order, every video once."""

    name: str
    classes: list[str]
    videos: list[Video]
    root_name: str  # UCF-101 | hmdb51_org


# ---------------------------------------------------------------------------------- split lists


def _lines(path: Path) -> list[str]:
    # the official files have CRLF line ends and trailing blanks
    return [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]


def ucf101_layout() -> Layout:
    """Every video of UCF101's trainlist0N / testlist0N (13,320), classes from classInd.txt."""
    d = SPLITS / "ucf101_splits"
    classes = [line.split()[1] for line in _lines(d / "classInd.txt")]
    label = {c: i for i, c in enumerate(classes)}
    rels = set()
    for n in (1, 2, 3):
        for f in (d / f"trainlist0{n}.txt", d / f"testlist0{n}.txt"):
            rels.update(line.split()[0] for line in _lines(f))
    videos = [Video(r, label[r.split("/")[0]]) for r in sorted(rels)]
    return Layout("ucf101", classes, videos, "UCF-101")


def hmdb51_layout() -> Layout:
    """Every video of HMDB51's <class>_test_splitN.txt files (6,766), classes sorted."""
    d = SPLITS / "hmdb51_splits"
    classes = sorted({p.name.rsplit("_test_split", 1)[0] for p in d.glob("*_test_split*.txt")})
    rels = set()
    for i, c in enumerate(classes):
        for n in (1, 2, 3):
            rels.update(
                (f"{c}/{line.rsplit(maxsplit=1)[0]}", i)
                for line in _lines(d / f"{c}_test_split{n}.txt")
            )
    videos = [Video(r, i) for r, i in sorted(rels)]
    return Layout("hmdb51", classes, videos, "hmdb51_org")


def pick_classes(layout: Layout, n: int | None) -> list[str]:
    """``n`` classes spread evenly over the label order (all when None)."""
    if n is None or n >= len(layout.classes):
        return list(layout.classes)
    k = len(layout.classes)
    return [layout.classes[round(i * k / n)] for i in range(n)]


def write_split_files(layout: Layout, chosen: list[str], out: Path) -> Path:
    """The official split files restricted to ``chosen`` classes, under ``out`` -> that dir
    (UCF101: classInd.txt renumbered 1..n, lists filtered; HMDB51: the chosen classes' files)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    keep = set(chosen)
    if layout.name == "ucf101":
        src = SPLITS / "ucf101_splits"
        lines = [f"{i} {c}" for i, c in enumerate(chosen, 1)]
        (out / "classInd.txt").write_text("\n".join(lines) + "\n")
        index = {c: i for i, c in enumerate(chosen, 1)}
        for n in (1, 2, 3):
            train = [
                f"{line.split()[0]} {index[line.split('/')[0]]}"
                for line in _lines(src / f"trainlist0{n}.txt")
                if line.split("/")[0] in keep
            ]
            test = [
                line for line in _lines(src / f"testlist0{n}.txt") if line.split("/")[0] in keep
            ]
            (out / f"trainlist0{n}.txt").write_text("\n".join(train) + "\n")
            (out / f"testlist0{n}.txt").write_text("\n".join(test) + "\n")
    else:
        for p in (SPLITS / "hmdb51_splits").glob("*_test_split*.txt"):
            if p.name.rsplit("_test_split", 1)[0] in keep:
                shutil.copyfile(p, out / p.name)
    return out


# ------------------------------------------------------------------------------------ the clips


def clip_length(rng: np.random.Generator, dataset: str) -> int:
    """Frames of one clip: a log-normal like the dataset's lengths, scaled down (docstring)."""
    median, sigma, lo, hi, divisor = LENGTHS[dataset]
    real = float(np.clip(np.exp(rng.normal(math.log(median), sigma)), lo, hi))
    return int(np.clip(round(real / divisor), MIN_FRAMES, MAX_FRAMES))


def render(label: int, num_classes: int, rng: np.random.Generator, frames: int) -> np.ndarray:
    """One clip of class ``label`` -> (frames, 32, 32, 3) uint8 RGB: a disc whose direction
    (label % 8), speed (label // 8 % 3) and hue (label x golden ratio) are the class's, moving
    over a static noise texture (wrapping at the edges), plus per-frame noise."""
    angle = 2 * math.pi * (label % 8) / 8
    speed = 0.7 + 0.6 * ((label // 8) % 3)  # px per frame: 0.7, 1.3, 1.9
    hue = (label * 0.618034) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, 0.85, 0.95)) * 255
    texture = rng.uniform(40, 140, (SIZE // 4, SIZE // 4, 3)).repeat(4, 0).repeat(4, 1)
    x0, y0 = rng.uniform(0, SIZE, 2)
    radius = rng.uniform(4.0, 6.5)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    out = np.empty((frames, SIZE, SIZE, 3), dtype=np.uint8)
    for t in range(frames):
        cx = (x0 + speed * t * math.cos(angle)) % SIZE
        cy = (y0 + speed * t * math.sin(angle)) % SIZE
        # distance on the torus, so the disc wraps round the edges instead of leaving
        dx = np.minimum(abs(xx - cx), SIZE - abs(xx - cx))
        dy = np.minimum(abs(yy - cy), SIZE - abs(yy - cy))
        f = texture.copy()
        f[dx * dx + dy * dy <= radius * radius] = colour
        f += rng.normal(0, 6, f.shape)
        out[t] = np.clip(np.round(f), 0, 255).astype(np.uint8)
    return out


def write_avi(path: Path, frames: np.ndarray, fps: int) -> None:
    """(T, H, W, 3) uint8 RGB -> XviD-tagged MPEG-4 part 2 AVI with B-frames, written under a
    temporary name and renamed, so a file that exists is whole."""
    tmp = path.with_name(path.name + ".part")
    with av.open(str(tmp), "w", format="avi") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height = frames.shape[2], frames.shape[1]
        s.pix_fmt = "yuv420p"
        s.codec_context.codec_tag = "XVID"
        s.codec_context.options = {"bf": "2", "g": "12", "qscale": "3"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    os.replace(tmp, path)


def _make(job: tuple[str, str, int, int]) -> int:
    """Write one clip (a worker's job) -> its number of frames."""
    path, dataset, label, num_classes = job
    rng = np.random.default_rng(zlib.crc32(f"{GENERATOR_VERSION}:{path}".encode()))
    frames = clip_length(rng, dataset)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_avi(Path(path), render(label, num_classes, rng, frames), FPS[dataset])
    return frames


def generate(layout: Layout, videos: list[Video], root: Path, workers: int) -> tuple[int, float]:
    """Write the clips of ``videos`` missing under ``root`` -> (how many written, seconds)."""
    stamp = root / f".generator-v{GENERATOR_VERSION}"
    if root.exists() and not stamp.exists():
        shutil.rmtree(root)  # made by another generator version: its clips are not these
    root.mkdir(parents=True, exist_ok=True)
    stamp.touch()
    todo = [v for v in videos if not (root / v.rel).is_file()]
    start = time.perf_counter()
    if todo:
        jobs = [(str(root / v.rel), layout.name, v.label, len(layout.classes)) for v in todo]
        with multiprocessing.Pool(workers) as pool:
            for k, _ in enumerate(pool.imap_unordered(_make, jobs, chunksize=32), 1):
                if k % 1000 == 0 or k == len(jobs):
                    print(f"  generated {k}/{len(jobs)} clips", flush=True)
    return len(todo), time.perf_counter() - start


# ----------------------------------------------------------------------------- the project copy


def copy_project(dest: Path) -> int:
    """Copy /work/main's working tree (tracked and new unignored files) to ``dest`` -> files.
    The demo's dvc.lock is not copied (nothing in it applies); a lock ``dest`` has is kept."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=MAIN,
        check=True,
        capture_output=True,
    ).stdout.decode()
    n = 0
    for rel in filter(None, out.split("\0")):
        src = MAIN / rel
        if not src.is_file() or rel == "dvc.lock":  # deleted in the working tree; the demo's
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
        n += 1
    # not a git repository: DVC must not look for one (and must not find /work/main's)
    (dest / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")
    return n


def write_params(
    project: Path,
    *,
    dataset: str,
    root: Path,
    splits_dir: Path,
    epochs: int,
    oof_folds: int,
    batch_size: int | None,
) -> None:
    """The copy's params.yaml: the dataset, all three splits, and the small settings."""
    path = project / "params.yaml"
    p = yaml.safe_load(path.read_text())
    p["train"]["oof_folds"] = oof_folds
    for head in p["heads"].values():
        head["epochs"] = epochs
        if "pretrain_epochs" in head:  # rtsae's autoencoder stage
            head["pretrain_epochs"] = min(head["pretrain_epochs"], epochs)
        if batch_size is not None:
            head["batch_size"] = batch_size
    p["dataset"].update(name=dataset, root=str(root), splits_dir=str(splits_dir), splits=[1, 2, 3])
    p["decode"].update(num_frames=8, flow_pairs=1, short_side=SIZE)
    p["flow"]["algorithm"] = "farneback"
    for stream in ("rgb", "flow"):
        p["features"][stream].update(
            backbone="efficientnet_lite0", weights="imagenet", crop=SIZE, batch_size=128
        )
    path.write_text(yaml.safe_dump(p, sort_keys=False))


def meter_stages(project: Path, log: Path, dataset: list[Path]) -> None:
    """Prefix every stage's cmd in the copy's dvc.yaml with bench/stage_meter.py, and list the
    dataset's folders under prepare's deps (prepare refuses to run under DVC without them)."""
    path = project / "dvc.yaml"
    d = yaml.safe_load(path.read_text())
    deps = d["stages"]["prepare"]["deps"]
    deps += [str(p) for p in dataset if str(p) not in deps]
    prefix = f"python {project / 'bench' / 'stage_meter.py'} --log {log} -- "
    for stage in d["stages"].values():
        body = stage.get("do", stage)
        cmd = " ".join(str(body["cmd"]).split())
        # idempotent: a resumed run must keep the cmds as they were, or dvc re-runs every stage
        body["cmd"] = cmd if cmd.startswith(prefix) else prefix + cmd
    path.write_text(yaml.safe_dump(d, sort_keys=False))


def run_dvc(project: Path, log: Path) -> tuple[int, float]:
    """``dvc repro`` in ``project``, its output to ``log``, stage starts echoed -> (rc, s)."""
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PYTHONPATH": str(project)}
    start = time.perf_counter()
    with log.open("a", buffering=1) as fh:
        proc = subprocess.Popen(
            # --keep-going: a failing train stage does not stop the others (nor their records)
            [str(VENV_BIN / "dvc"), "repro", "--keep-going"],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            if line.startswith("Running stage"):
                print(f"  [{time.perf_counter() - start:7.0f} s] {line.strip()}", flush=True)
        rc = proc.wait()
    return rc, time.perf_counter() - start


# ------------------------------------------------------------------------------------ the report


def failures(project: Path) -> dict[str, int]:
    """{failures.csv under data/: its rows} (one row per failed video)."""
    out = {}
    for f in sorted((project / "data").rglob("failures.csv")):
        with f.open(newline="", encoding="utf-8") as fh:
            out[str(f.parent.relative_to(project / "data"))] = max(
                0, sum(1 for _ in csv.reader(fh)) - 1
            )
    return out


def print_stages(records: Iterable[dict]) -> None:
    print(
        "\n| stage | wall s | CPU s | peak RSS, largest process (MB) | peak RSS, whole tree (MB) | rc |"
    )
    print("|---|---|---|---|---|---|")
    total = 0.0
    for r in records:
        total += r["wall_s"]
        print(
            f"| {r['stage']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['max_rss_mb']:.0f} "
            f"| {r['tree_peak_rss_mb']:.0f} | {r['rc']} |"
        )
    print(f"| sum of stages | {total:.1f} | | | | |")


def _fmt(acc: dict) -> str:
    std = acc.get("std")
    sd = "n/a" if std is None else f"{std['top1']:.4f}"
    splits = " ".join(f"{s}:{a['top1']:.3f}" for s, a in acc["splits"].items())
    return f"{acc['top1']:.4f} | {sd} | {splits}"


def print_metrics(metrics: dict) -> None:
    print("\n| head | input | top-1 mean | top-1 sample std | per split |")
    print("|---|---|---|---|---|")
    for kind in ("streams", "fusion"):
        for head in sorted(metrics[kind]):
            for name, acc in sorted(metrics[kind][head].items()):
                label = name if kind == "streams" else f"fused: {name}"
                print(f"| {head} | {label} | {_fmt(acc)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=("ucf101", "hmdb51"), default="hmdb51")
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench_work"))
    ap.add_argument("--classes", type=int, default=None, help="a subset of N classes")
    ap.add_argument("--epochs", type=int, default=2, help="every head's epochs")
    ap.add_argument(
        "--head-batch-size",
        type=int,
        default=None,
        help="every head's batch size (default: as shipped, 16)",
    )
    ap.add_argument(
        "--oof-folds",
        type=int,
        default=2,
        help="train.oof_folds (2 as shipped; 0 trains one model per split instead of 3, and the "
        "SVM fusion then fits on in-sample training scores)",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="go on with the run's kept project and data/ (its code as copied then; new params; "
        "dvc re-runs what they change and what failed)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the project copy and its data/")
    ap.add_argument("--workers", type=int, default=2, help="clip generation processes")
    args = ap.parse_args()
    if args.classes is not None and args.classes < 2:
        ap.error("--classes must be at least 2")
    t0 = time.perf_counter()

    layout = ucf101_layout() if args.dataset == "ucf101" else hmdb51_layout()
    chosen = pick_classes(layout, args.classes)
    keep = {layout.classes.index(c) for c in chosen}
    videos = [v for v in layout.videos if v.label in keep]
    data_dir = args.workdir / "datasets" / args.dataset
    root = data_dir / layout.root_name
    tag = f"{args.dataset}-{len(chosen) if args.classes else 'all'}"
    splits_dir = write_split_files(layout, chosen, data_dir / f"splits-{tag}")
    print(f"{args.dataset}: {len(chosen)} of {len(layout.classes)} classes, {len(videos)} videos")
    made, gen_s = generate(layout, videos, root, args.workers)
    missing = [v.rel for v in videos if not (root / v.rel).is_file()]
    if missing:
        sys.exit(f"{root}: {len(missing)} clips missing after generation, e.g. {missing[0]}")
    size_mb = sum((root / v.rel).stat().st_size for v in videos) / 2**20
    print(
        f"  clips: {made} generated in {gen_s:.1f} s, {len(videos) - made} cached; {size_mb:.1f} MB"
    )

    run_dir = args.workdir / "runs" / tag
    project = run_dir / "project"
    if run_dir.exists() and not args.resume:
        shutil.rmtree(run_dir)
    project.mkdir(parents=True, exist_ok=True)
    # --resume: the kept project, code as it was copied (a fresh copy of code others are editing
    # would re-run stages whose output is done); new params re-run only what they change
    copied = (
        "kept from the run before (--resume)" if args.resume else f"{copy_project(project)} files"
    )
    times = run_dir / "stages.jsonl"
    if times.exists():
        times.rename(run_dir / f"stages.{int(time.time())}.jsonl")  # this run's stages only
    write_params(
        project,
        dataset=args.dataset,
        root=root,
        splits_dir=splits_dir,
        epochs=args.epochs,
        oof_folds=args.oof_folds,
        batch_size=args.head_batch_size,
    )
    meter_stages(project, times, [root, splits_dir])
    p = yaml.safe_load((project / "params.yaml").read_text())
    print(
        f"  settings: decode {p['decode']['num_frames']} points x {p['decode']['flow_pairs']} "
        f"flow pair, short side {SIZE}; flow {p['flow']['algorithm']}; features "
        f"{p['features']['rgb']['backbone']} {p['features']['rgb']['weights']} crop {SIZE}; "
        f"{args.epochs} epochs, head batch {args.head_batch_size or 'as shipped'}, "
        f"oof_folds {args.oof_folds}; heads {p['run']['heads']} on "
        f"{p['run']['streams']}, joint {p['run']['joint_heads']}; splits 1, 2, 3"
    )
    print(f"  project copy: {copied} in {project}; dvc repro ...", flush=True)
    rc, repro_s = run_dvc(project, run_dir / "dvc_repro.log")

    records = (
        [json.loads(line) for line in times.read_text().splitlines()] if times.exists() else []
    )
    print_stages(records)
    print(
        "\nfailed videos per stage (failures.csv rows):",
        failures(project) if (project / "data").exists() else {},
    )
    metrics_file = project / "data" / "evaluate" / "metrics.json"
    if rc == 0 and metrics_file.exists():
        print_metrics(json.loads(metrics_file.read_text()))
    total = time.perf_counter() - t0
    print(f"\ndvc repro: {repro_s:.1f} s (rc {rc}); total with generation and copy: {total:.1f} s")
    if rc != 0:
        tail = (run_dir / "dvc_repro.log").read_text().splitlines()[-30:]
        print("\n".join(tail))
        sys.exit(f"dvc repro failed (rc {rc}); log: {run_dir / 'dvc_repro.log'}, project kept")
    if not args.keep:
        shutil.rmtree(project)
        print(f"removed {project} (--keep keeps it)")


if __name__ == "__main__":
    main()
