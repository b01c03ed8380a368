"""What sharing a UCF101 cache through a DVC remote costs: files, bytes and seconds of
``dvc add`` and ``dvc push`` to a local remote, and of the push after one video is added.

Features: a synthetic UCF101-size features cache, 13,320 videos of (25, 1280) float16 (one
stream: rgb and flow features have the same shape, so two streams are twice this), written
through ``pipeline.cache.open_cache`` as the features stage writes it (a unit pack per video,
compacted on close into content-defined packs). Values are |N(0, 1)| (non-negative, as pooled
ReLU features are), so zstd finds about as little to squeeze as in real features.

Flow: (25, 5, 2, 256, 340) uint8 stacks, 21.8 MB a video raw, 290 GB for UCF101: too big for
this disk, so ``--flow-videos`` (default 48) are written and pushed, and the totals are
extrapolated linearly to 13,320 videos (a pack holds at most 256 MiB raw, so packs and bytes
grow with the video count). The synthetic flow is smooth (bilinear upsampling of an 8x10 field)
plus +-2 levels of noise around 128: real TV-L1 flow compresses differently, so the flow bytes
are an estimate of the order of magnitude, said so where printed.

    python bench/bench_share.py [--videos 13320] [--flow-videos 48] [--keep]

Everything is written under one temporary folder (about 3 x the cache: the cache, DVC's cache,
the remote), deleted at the end unless ``--keep``. Prints measured numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_dataset_deps import dvc as run_dvc  # bench/ is the script's folder on sys.path

from pipeline.cache import open_cache

ROOT = Path(__file__).resolve().parents[1]
UCF101 = 13_320
FEATURES = (25, 1280)
FLOW = (25, 5, 2, 256, 340)


def dvc(args: list[str], cwd: Path) -> float:
    """Run ``dvc args`` in ``cwd`` -> seconds; a failure stops the bench with its output."""
    return run_dvc(args, cwd)[0]


def tree(path: Path) -> tuple[int, int]:
    """(files, bytes) under ``path``."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def ids(n: int) -> list[str]:
    """UCF101-like ids: 101 classes, groups of 4-7 clips."""
    return [
        f"v_Class{i % 101:03d}_g{(i // 101) % 25 + 1:02d}_c{i // 2525 + 1:02d}" for i in range(n)
    ]


def feature(rng: np.random.Generator) -> np.ndarray:
    return np.abs(rng.standard_normal(FEATURES, dtype=np.float32)).astype(np.float16)


def flow(rng: np.random.Generator) -> np.ndarray:
    """A smooth flow stack around 128 (bound 20 px over [0, 255]) with a little noise."""
    t, pairs, ch, h, w = FLOW
    coarse = rng.normal(0.0, 4.0, size=(t, pairs, ch, 8, 10)).astype(np.float32)
    ys = np.linspace(0, 7, h)
    xs = np.linspace(0, 9, w)
    y0, x0 = np.floor(ys).astype(int).clip(0, 6), np.floor(xs).astype(int).clip(0, 8)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    c = coarse
    up = (
        c[..., y0, :][..., x0] * (1 - fy) * (1 - fx)
        + c[..., y0 + 1, :][..., x0] * fy * (1 - fx)
        + c[..., y0, :][..., x0 + 1] * (1 - fy) * fx
        + c[..., y0 + 1, :][..., x0 + 1] * fy * fx
    )
    noisy = 128 + up * (127.5 / 20) + rng.integers(-2, 3, size=up.shape)
    return noisy.clip(0, 255).astype(np.uint8)


def share(
    repo: Path,
    name: str,
    n: int,
    make,
    attrs: dict,
    remote: Path,  # noqa: ANN001
) -> dict[str, float]:
    """Write the cache ``data/<name>`` of ``n`` videos, ``dvc add`` and ``dvc push`` it; then add
    one video, and ``dvc add`` and push again -> the numbers."""
    cache = repo / "data" / name
    rng = np.random.default_rng(0)
    vids = ids(n + 1)
    t = time.perf_counter()
    with open_cache(cache, "w", attrs=attrs) as c:
        for v in vids[:n]:
            c.write(v, make(rng), {"source": v})
    write_s = time.perf_counter() - t
    files, size = tree(cache)
    add_s = dvc(["add", "-q", f"data/{name}"], repo)
    before = tree(remote) if remote.exists() else (0, 0)
    push_s = dvc(["push", "-q"], repo)
    after = tree(remote)
    with open_cache(cache, "a", attrs=attrs) as c:  # one more video: compaction on close
        c.write(vids[n], make(rng), {"source": vids[n]})
    add2_s = dvc(["add", "-q", f"data/{name}"], repo)
    push2_s = dvc(["push", "-q"], repo)
    again = tree(remote)
    return {
        "videos": n,
        "cache_files": files,
        "cache_bytes": size,
        "write_s": write_s,
        "add_s": add_s,
        "push_s": push_s,
        "pushed_files": after[0] - before[0],
        "pushed_bytes": after[1] - before[1],
        "add1_s": add2_s,
        "push1_s": push2_s,
        "pushed1_files": again[0] - after[0],
        "pushed1_bytes": again[1] - after[1],
    }


def show(name: str, r: dict[str, float], scale: float = 1.0) -> None:
    mb = 1e6
    print(
        f"{name}: {r['videos']} videos: cache {r['cache_files']} files, {r['cache_bytes'] / mb:.0f} MB"
        f" (written in {r['write_s']:.0f} s); dvc add {r['add_s']:.1f} s; dvc push "
        f"{r['pushed_files']} files, {r['pushed_bytes'] / mb:.0f} MB in {r['push_s']:.1f} s; "
        f"one video added: dvc add {r['add1_s']:.1f} s, push {r['pushed1_files']} files, "
        f"{r['pushed1_bytes'] / mb:.1f} MB in {r['push1_s']:.1f} s"
    )
    if scale != 1.0:
        print(
            f"  extrapolated to {UCF101} videos (x{scale:.0f}, linear): ~{r['pushed_files'] * scale:.0f}"
            f" files, ~{r['pushed_bytes'] * scale / 1e9:.0f} GB, push ~{r['push_s'] * scale / 60:.0f} min"
            " to a local remote (synthetic flow: real TV-L1 flow compresses differently)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=UCF101)
    ap.add_argument("--flow-videos", type=int, default=48)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench_share_"))
    try:
        repo, remote = base / "repo", base / "remote"
        repo.mkdir()
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        dvc(["init", "-q"], repo)
        dvc(["remote", "add", "-d", "store", str(remote)], repo)
        feats = share(repo, "features", args.videos, feature, {"bench": "share"}, remote)
        show("features (one stream, (25, 1280) float16)", feats)
        shutil.rmtree(repo / "data" / "features")  # the disk: the flow run needs the room
        fl = share(repo, "flow", args.flow_videos, flow, {"bench": "share-flow"}, remote)
        show("flow ((25, 5, 2, 256, 340) uint8, synthetic)", fl, UCF101 / args.flow_videos)
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
