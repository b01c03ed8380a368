"""The torchrun world: which process this is (rank, world size, ranks on this machine), the
collectives the stages use (barrier, broadcast, gather), and the proof that every rank writes
into the directory rank 0 writes (``check_shared_dir``).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK for every process; without them (plain
``python -m stages.prepare``) the world is one process and nothing here talks to anyone.

Its own module, without the feature cache: prepare and decode shard over ranks too, and
importing the cache package here would make every change to the cache a dependency of those
stages in dvc.yaml (re-probing a whole dataset for nothing). The cache protocol of flow and
features is pipeline/distributed.py.

"Shared" is proved, not assumed: each rank opens the output at the path given on its own
machine, and on machines without a shared filesystem a rank that finds an output of the same
settings there (an earlier run, a ``dvc pull``) would write its videos into that copy and exit 0
while rank 0's output lacks them. So before any video ``check_shared_dir`` has every rank read a
token rank 0 just wrote; it stops every rank with a ``SharedDirError`` otherwise.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

log = logging.getLogger(__name__)

# A barrier waits for the slowest rank to finish its whole shard, which can take hours on a
# large dataset; the default 30-minute collective timeout would kill a healthy run.
TIMEOUT = datetime.timedelta(days=7)

# Rank 0's run token in the directory being checked; a leftover of a killed run is removed by
# the next check (the flow and features outputs persist between runs).
TOKEN_PREFIX = ".shared-check-"
# How long a rank waits for the token to appear before calling it absent: a network filesystem
# may answer a lookup from a stale cache for a moment. Close-to-open consistency (NFS) makes a
# file rank 0 closed before the broadcast visible to an open after it, so this rarely waits.
TOKEN_WAIT_S = 3.0

SHARED_HINT = (
    "multi-machine extraction needs the output directory on a shared filesystem (NFS, Lustre, "
    "...) visible at the same path on every machine, or each machine given the path where it "
    "sees that shared directory"
)


class SharedDirError(RuntimeError):
    """The ranks of a torchrun world do not write into one directory (or it cannot be shown
    that they do): the message names the ranks, their hosts and the paths they saw."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # ranks on this machine, which share its cores

    @property
    def primary(self) -> bool:
        return self.rank == 0

    def cores(self, n: int) -> int:
        """``n`` workers or threads, where 0 means this rank's share of the machine's cores."""
        return n if n > 0 else max((os.cpu_count() or 1) // self.local_size, 1)

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every size-th item from position rank."""
        return list(items[self.rank :: self.size])

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a collective: every rank waits for rank 0)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (a list of one without torchrun)."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def init_world(device: torch.device) -> World:
    """The torchrun world from the environment, with its process group started (gloo on CPU,
    nccl on CUDA, where each process takes GPU LOCAL_RANK)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return World(rank=rank, size=size, local_rank=local, local_size=local_size)


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def _read_token(path: Path, text: str) -> str | None:
    """None when ``path`` holds ``text`` (waiting up to TOKEN_WAIT_S for it to appear), else
    what this rank found there instead."""
    deadline = time.monotonic() + TOKEN_WAIT_S
    while True:
        try:
            found = path.read_text()
        except FileNotFoundError:
            if time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            if not path.parent.is_dir():
                return "no such directory"
            return f"no run token {path.name} there (another directory of the same name)"
        except OSError as e:
            return f"cannot read the run token: {e}"
        return None if found == text else f"another run token there: {found.strip()!r}"


def _remove_tokens(directory: Path) -> None:
    for old in directory.glob(f"{TOKEN_PREFIX}*"):
        log.info("%s: removing %s left by an interrupted run", directory, old.name)
        old.unlink(missing_ok=True)


def check_shared_dir(world: World, directory: Path) -> None:
    """Prove that every rank's ``directory`` (as given on its own machine: relative paths are
    taken from its working directory) is the same directory as rank 0's, before any rank
    writes its share of the output there. A collective: every rank calls it; a one-process
    world talks to no one and creates nothing (it only removes tokens a killed run left).

    Rank 0 creates ``directory`` if needed and writes a run token (random, with its host and
    path) there as ``.shared-check-<hex>``; it broadcasts the token, every rank reads the file
    at its own path, and the results are gathered, so every rank returns, or every rank raises
    the same SharedDirError naming each rank that did not find the token, its host and the
    path it saw. Rank 0 removes the token once all have read it (also on an error), and tokens
    a killed run left before that, so the directory (a DVC output) keeps its hash."""
    directory = Path(directory)
    if world.size == 1:
        if directory.is_dir():
            _remove_tokens(directory)  # a killed torchrun run's, resumed in one process
        return
    host = socket.gethostname()
    token: tuple[str, str] | str | None = None
    path = None
    try:
        if world.primary:
            try:
                directory.mkdir(parents=True, exist_ok=True)
                _remove_tokens(directory)
                name = f"{TOKEN_PREFIX}{uuid.uuid4().hex}"
                text = f"{name}: written by rank 0 on {host} at {os.path.abspath(directory)}\n"
                path = directory / name
                with path.open("w") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())  # on the server before any rank looks for it
                token = (name, text)
            except OSError as e:
                # the others wait in the broadcast below: tell them, rather than leave them
                token = f"{directory}: rank 0 could not write its run token: {e}"
        token = world.broadcast(token)
        if isinstance(token, str):
            raise SharedDirError(token)
        name, text = token
        problem = _read_token(directory / name, text)
        reports = world.gather((world.rank, host, os.path.abspath(directory), problem))
    finally:
        if path is not None:  # every rank has read it once the gather returned
            path.unlink(missing_ok=True)
    bad = [r for r in reports if r[3] is not None]
    if bad:
        _, host0, dir0, _ = reports[0]
        ranks = "; ".join(f"rank {r} on {h} sees {d}: {why}" for r, h, d, why in bad)
        raise SharedDirError(
            f"the ranks do not share one output directory: rank 0 on {host0} wrote the run "
            f"token {name} in {dir0}; {ranks}. Their writes would not reach rank 0's output: "
            f"{SHARED_HINT}"
        )
