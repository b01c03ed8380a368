"""Ranks that do not share the output directory (machines without a shared filesystem) stop
every rank with one message instead of losing videos silently (pipeline/distributed.py:
``check_shared_dir`` before any video, ``check_arrived`` after the run).

Two machines without a shared filesystem are played here by two local ranks whose working
directories differ, each given the same relative output path."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import pipeline.distributed as distributed
import pipeline.world as world
from pipeline.cache import open_cache
from pipeline.config import DEFAULT_CACHE, CacheConfig, FlowConfig
from pipeline.runner import Failure
from pipeline.world import World
from stages import flow

ROOT = Path(__file__).resolve().parents[1]
ATTRS = {"kind": "test"}


# -- check_shared_dir in two real gloo processes -----------------------------------------------


def _rank_checks(rank: int, store: str, directory: str, out: mp.Queue) -> None:
    """One rank of a two-process gloo world: check_shared_dir on ``directory`` -> (rank, None
    or the error message) on ``out``."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        world.check_shared_dir(World(rank=rank, size=2), Path(directory))
        out.put((rank, None))
    except world.SharedDirError as e:
        out.put((rank, str(e)))
    except BaseException as e:  # any other error fails the test at once, not after the timeout
        out.put((rank, f"unexpected {e!r}"))
        raise
    finally:
        dist.destroy_process_group()


def _check_in_two_ranks(tmp_path: Path, dir0: Path, dir1: Path) -> dict[int, str | None]:
    """check_shared_dir with rank 0 at ``dir0`` and rank 1 at ``dir1`` -> {rank: None when it
    returned, else its SharedDirError message}. Fails when a rank hangs."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store = tmp_path / "gloo-store"
    procs = [
        ctx.Process(target=_rank_checks, args=(r, str(store), str(d), out))
        for r, d in enumerate([dir0, dir1])
    ]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        hung = p.is_alive()
        if hung:
            p.kill()
        assert not hung and p.exitcode == 0, f"a rank did not finish (exit code {p.exitcode})"
    return results


def _tokens(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob(f"{world.TOKEN_PREFIX}*"))


@pytest.mark.slow
def test_ranks_that_see_one_directory_pass_and_leave_no_token(tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "out"  # rank 0 creates it
    (tmp_path / "machine1").mkdir()
    (tmp_path / "machine1" / "mnt").symlink_to(tmp_path / "shared")  # mounted elsewhere there
    stale = tmp_path / "shared" / "out" / f"{world.TOKEN_PREFIX}deadbeef"
    stale.parent.mkdir(parents=True)
    stale.write_text("left by a killed run\n")
    got = _check_in_two_ranks(tmp_path, shared, tmp_path / "machine1" / "mnt" / "out")
    assert got == {0: None, 1: None}
    assert list(shared.iterdir()) == []  # the stale token and this run's are gone


@pytest.mark.slow
def test_ranks_that_see_other_directories_all_stop_naming_the_rank_and_its_path(
    tmp_path: Path,
) -> None:
    dir0, dir1 = tmp_path / "machine0" / "out", tmp_path / "machine1" / "out"
    dir1.mkdir(parents=True)
    (dir1 / "cache.json").write_text("{}")  # an earlier run's output there
    got = _check_in_two_ranks(tmp_path, dir0, dir1)
    assert got[0] is not None and got[0] == got[1]  # both stop, with one message
    msg = got[0]
    assert "rank 1 on " in msg and f"sees {dir1}: no run token" in msg
    assert "rank 0 on " in msg and f"in {dir0}" in msg
    assert "rank 0 sees" not in msg  # rank 0 found its own token
    assert world.SHARED_HINT in msg
    assert list(dir0.iterdir()) == [] and _tokens(tmp_path) == []
    assert [p.name for p in dir1.iterdir()] == ["cache.json"]


@pytest.mark.slow
def test_a_rank_without_the_directory_stops_every_rank(tmp_path: Path) -> None:
    dir0, dir1 = tmp_path / "machine0" / "out", tmp_path / "machine1" / "out"
    got = _check_in_two_ranks(tmp_path, dir0, dir1)
    assert got[0] is not None and got[0] == got[1]
    assert f"rank 1 on {socket.gethostname()} sees {dir1}: no such directory" in got[0]
    assert not dir1.exists() and list(dir0.iterdir()) == []


def test_a_one_process_world_creates_nothing_but_removes_a_killed_runs_token(
    tmp_path: Path,
) -> None:
    world.check_shared_dir(World(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cache.json").write_text("{}")
    (tmp_path / "out" / f"{world.TOKEN_PREFIX}deadbeef").write_text("left by kill -9\n")
    world.check_shared_dir(World(), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["cache.json"]


# -- check_arrived: every assigned video in rank 0's cache, or failed ----------------------------


def _cache_with(path: Path, ids: list[str], source: str = "sha") -> None:
    with open_cache(path, "w", attrs=ATTRS) as c:
        for k in ids:
            c.write(k, np.zeros((2, 3), np.float16), {"source": f"{source}-{k}"})


def test_videos_another_rank_wrote_elsewhere_are_named_with_the_rank(tmp_path: Path) -> None:
    ids = [f"v{i}" for i in range(10)]
    sources = {k: f"sha-{k}" for k in ids}
    assigned = [World(rank=r, size=2).shard(ids) for r in range(2)]  # rank 1: v1, v3, ...
    _cache_with(tmp_path / "cache", assigned[0])  # only rank 0's videos arrived
    with pytest.raises(world.SharedDirError) as e:
        distributed.check_arrived(tmp_path / "cache", assigned, sources=sources, failed={"v9"})
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'cache'}: 4 of the 10 videos computed by rank(s) 1 ")
    assert "v1 (rank 1), v3 (rank 1), v5 (rank 1), v7 (rank 1);" in msg
    assert "v9" not in msg  # recorded as failed
    assert world.SHARED_HINT in msg


def test_every_video_in_the_cache_or_failed_passes_and_a_stale_one_does_not(
    tmp_path: Path,
) -> None:
    ids = ["a", "b", "c"]
    _cache_with(tmp_path / "cache", ["a", "b"])
    sources = {k: f"sha-{k}" for k in ids}
    distributed.check_arrived(
        tmp_path / "cache", [["a", "c"], ["b"]], sources=sources, failed={"c"}
    )
    # b's entry computed from other input bytes: not the video rank 1 was given
    sources["b"] = "sha-b-new"
    with pytest.raises(world.SharedDirError, match=r"1 of the 3 .* rank\(s\) 1 .*: b \("):
        distributed.check_arrived(
            tmp_path / "cache", [["a", "c"], ["b"]], sources=sources, failed={"c"}
        )


def test_a_run_whose_writes_went_elsewhere_fails_instead_of_reporting_done(
    tmp_path: Path,
) -> None:
    """One process plays a rank whose cache is another directory: its writes are counted,
    but the cache the stage reports on lacks them."""
    ids = ["a", "b", "c"]
    sources = {k: f"sha-{k}" for k in ids}
    with pytest.raises(world.SharedDirError) as e:  # noqa: PT012 - the run's body
        with distributed.sharded_run(
            World(), tmp_path / "cache", ids=ids, sources=sources, attrs=ATTRS,
            cache_cfg=DEFAULT_CACHE,
        ) as run:  # fmt: skip
            elsewhere = open_cache(tmp_path / "elsewhere", "w", attrs=ATTRS)
            run.write("a", np.zeros((2, 3), np.float16), {"source": sources["a"]})
            run.cache, kept = elsewhere, run.cache
            for k in ["b", "c"]:
                run.write(k, np.zeros((2, 3), np.float16), {"source": sources[k]})
            run.cache = kept
            elsewhere.close()
    assert "2 of the 3 videos computed by rank(s) 0 " in str(e.value)
    assert "b (rank 0), c (rank 0); the stage neither wrote them" in str(e.value)
    with open_cache(tmp_path / "cache", "r") as c:
        assert c.keys() == ["a"]  # kept, compacted, for the resume
    assert not (tmp_path / "cache" / ".tmp").exists()


def test_failed_videos_count_as_arrived(tmp_path: Path) -> None:
    ids = ["a", "b"]
    sources = {k: f"sha-{k}" for k in ids}
    with distributed.sharded_run(
        World(), tmp_path / "cache", ids=ids, sources=sources, attrs=ATTRS,
        cache_cfg=DEFAULT_CACHE,
    ) as run:  # fmt: skip
        run.write("a", np.zeros((2, 3), np.float16), {"source": sources["a"]})
        run.fail(Failure("b", "b.avi", "test", "ValueError: broken"))
    assert run.failures == [Failure("b", "b.avi", "test", "ValueError: broken")]


# -- the flow stage under torchrun, each rank in its own working directory -----------------------

WRAPPER = """\
import os, runpy, sys
# each local rank in its own working directory: two machines without a shared filesystem
os.chdir(sys.argv[1 + int(os.environ["LOCAL_RANK"])])
sys.path.insert(0, {root!r})
sys.argv = sys.argv[3:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _flow_in_two_dirs(
    tmp_path: Path, torchrun: Callable[[int], list[str]], plan: Path, dirs: list[Path]
) -> subprocess.CompletedProcess:
    """torchrun of the flow stage (farneback) with rank r in ``dirs[r]``, both given --out out."""
    params = tmp_path / "params.yaml"
    params.write_text("flow:\n  algorithm: farneback\n  workers: 1\ncache:\n  videos_per_pack: 8\n")
    wrapper = tmp_path / "in_rank_dir.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT)))
    stage = ["stages.flow", "--params", str(params), "--plan", str(plan), "--out", "out"]
    cmd = [*torchrun(2), str(wrapper), *map(str, dirs), *stage]
    # a timeout, so that a rank left waiting in a collective fails the test instead of hanging
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _ids(cache: Path) -> list[str]:
    with open_cache(cache, "r") as c:
        return c.keys()


@pytest.mark.slow
def test_flow_ranks_without_a_shared_directory_stop_before_any_video(
    tiny_demo: Path,
    tmp_path: Path,
    torchrun: Callable[[int], list[str]],
    file_bytes: Callable[[Path], dict[str, bytes]],
) -> None:
    plan = tiny_demo / "decode" / "plan.json"
    machine0, machine1 = tmp_path / "machine0", tmp_path / "machine1"
    machine0.mkdir()
    # an earlier run on machine 1 left a cache with the same settings (or a `dvc pull` did)
    cfg = FlowConfig(algorithm="farneback", workers=1)
    flow.main(cfg, plan_path=plan, out=machine1 / "out", cache_cfg=CacheConfig(videos_per_pack=8))
    before = file_bytes(machine1 / "out")
    run = _flow_in_two_dirs(tmp_path, torchrun, plan, [machine0, machine1])
    cache0 = machine0 / "out" / "cache"
    assert run.returncode != 0, (
        f"exit 0 though rank 0's cache holds {len(_ids(cache0))} of the 24 videos:\n"
        + run.stderr[-2000:]
    )
    # both ranks stop (exit 1) with the one-line message, no trace of their own
    assert run.stderr.count("\nflow: the ranks do not share one output directory: ") == 2
    assert "SharedDirError" not in run.stderr
    assert (
        f"rank 1 on {socket.gethostname()} sees {machine1 / 'out' / 'cache'}: no run token"
        in run.stderr
    )
    assert "shared filesystem (NFS, Lustre, ...)" in run.stderr
    assert _ids(cache0) == []  # no video was computed
    assert file_bytes(machine1 / "out") == before  # machine 1's copy untouched
    # nothing of the check is left in rank 0's output (a DVC output: its hash must not change)
    assert sorted(p.name for p in cache0.iterdir()) == ["cache.json", "packs"]


@pytest.mark.slow
def test_flow_ranks_that_reach_one_directory_by_other_paths_finish_it(
    tiny_demo: Path,
    tmp_path: Path,
    torchrun: Callable[[int], list[str]],
) -> None:
    plan = tiny_demo / "decode" / "plan.json"
    machine0, machine1 = tmp_path / "machine0", tmp_path / "machine1"
    (machine0 / "out").mkdir(parents=True)
    machine1.mkdir()
    (machine1 / "out").symlink_to(machine0 / "out")  # the shared directory, mounted elsewhere
    run = _flow_in_two_dirs(tmp_path, torchrun, plan, [machine0, machine1])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "flow: 24 done" in run.stderr
    cache0 = machine0 / "out" / "cache"
    assert len(_ids(cache0)) == 24
    assert sorted(p.name for p in cache0.iterdir()) == ["cache.json", "packs"]  # no token, .tmp
