"""Who am I in the job: world/rank discovery from torchrun, accelerate or SLURM, passed explicitly.

There is no module-level process-group state: code receives a :class:`World` and, for
collectives, the default process group that :func:`init_distributed` created.

Also here: the small collectives every module needs (:func:`barrier`, :func:`broadcast_object`,
:func:`all_gather_object`, :func:`any_rank`; no-ops without a process group), :func:`deadline` (a bounded,
named wait for the other ranks) and :func:`free_port`.
What does not live here: the parallel layout's process groups (:mod:`llmscale.parallel.topology`).
"""
from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # Fallback: the first host of "node[01-04],other" -> "node01", "rack[1-2]n[07,03]" -> "rack1n07".
    head, depth = "", 0
    for ch in nodelist:
        if ch == "," and depth == 0:
            break
        depth += (ch == "[") - (ch == "]")
        head += ch
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], head)


def discover_world(env: Optional[dict] = None) -> World:
    """Read the launcher's environment: torchrun/accelerate (RANK, WORLD_SIZE, LOCAL_RANK, ...) first,
    then SLURM (SLURM_PROCID, SLURM_NTASKS, ...) when a job step launched one task per GPU."""
    env = dict(os.environ if env is None else env)
    port = int(env.get("MASTER_PORT", 29500))
    if "RANK" in env and "WORLD_SIZE" in env:
        ws = int(env["WORLD_SIZE"])
        lws = int(env.get("LOCAL_WORLD_SIZE", ws))
        return World(
            rank=int(env["RANK"]),
            world_size=ws,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=lws,
            node_rank=int(env.get("GROUP_RANK", int(env["RANK"]) // max(lws, 1))),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        ws = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_NNODES", 1))
        return World(
            rank=int(env["SLURM_PROCID"]),
            world_size=ws,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=max(ws // max(nodes, 1), 1),
            node_rank=int(env.get("SLURM_NODEID", 0)),
            master_addr=env.get("MASTER_ADDR") or _first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=port,
        )
    return World()


def export_env(world: World) -> None:
    """Make the torch.distributed env:// variables agree with ``world`` (needed under srun)."""
    os.environ.update(
        RANK=str(world.rank),
        WORLD_SIZE=str(world.world_size),
        LOCAL_RANK=str(world.local_rank),
        LOCAL_WORLD_SIZE=str(world.local_world_size),
        MASTER_ADDR=world.master_addr,
        MASTER_PORT=str(world.master_port),
    )


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(world: World, *, backend: Optional[str] = None, timeout_s: float = 1800) -> None:
    """Create the default process group (also for world_size 1, so collectives work everywhere)."""
    if dist.is_initialized():
        return
    export_env(world)
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank % max(torch.cuda.device_count(), 1))
    dist.init_process_group(
        backend=backend or default_backend(),
        init_method="env://",
        world_size=world.world_size,
        rank=world.rank,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def shutdown() -> None:
    """Destroy the process group (ZeRO-3 can abort at interpreter exit otherwise)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # a peer already gone: still tear down locally
            pass
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on this host now (for a lone process's rendezvous, or tests)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_for_job(env: Optional[dict] = None) -> World:
    """:func:`discover_world`; a lone process without ``MASTER_PORT`` gets a free port, so several such
    runs can share a host."""
    import dataclasses

    env = dict(os.environ if env is None else env)
    world = discover_world(env)
    if world.world_size == 1 and "MASTER_PORT" not in env:
        world = dataclasses.replace(world, master_port=free_port())
    return world


# --------------------------------------------------------------------------- collectives
# Over the default process group; each is a no-op (returns its input) when no group exists, so code
# written for N ranks runs unchanged in one process.


def _group_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _group_ready():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not _group_ready():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order."""
    if not _group_ready():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank when ``flag`` is true on any rank (of ``group``; default: the world)."""
    if not _group_ready():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


EXIT_WAIT_TIMEOUT = 1  # what a rank exits with when a bounded wait for the others expires (a failure, not a requeue)
DEFAULT_WAIT_S = 600.0


@contextlib.contextmanager
def deadline(what: str, seconds: Optional[float] = DEFAULT_WAIT_S) -> Iterator[None]:
    """Bound a section in which this rank waits for the others (collectives, DeepSpeed's barriers).

    If it has not finished after ``seconds``, the process writes one line naming ``what`` it was waiting for
    and exits with :data:`EXIT_WAIT_TIMEOUT`, instead of sitting in a collective until the process group's
    timeout (30 minutes by default, forever on some paths). Nothing is unwound: the other ranks may hold the
    same collective, so cleaning up could hang too; what a save leaves behind is a ``.tmp-`` folder that is
    never taken for a checkpoint. ``seconds`` of 0 or None: no bound. Without a process group: no bound."""
    if not seconds or seconds <= 0 or not _group_ready() or dist.get_world_size() == 1:
        yield
        return
    t0 = time.monotonic()

    def expire() -> None:
        msg = (f"rank {dist.get_rank()}: gave up after {time.monotonic() - t0:.0f}s waiting for the other ranks: "
               f"{what}. A rank died, hangs or failed there (see its own log above); exiting with code "
               f"{EXIT_WAIT_TIMEOUT} instead of waiting for the process-group timeout. The bound is "
               f"train.wait_timeout_s ({seconds:g}s).")
        try:
            sys.stderr.write(f"llmscale: error: {msg}\n")
            sys.stderr.flush()
        finally:
            os._exit(EXIT_WAIT_TIMEOUT)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# --------------------------------------------------------------------------- local ranks (benchmarks, tests)


class RankFailure(RuntimeError):
    """A rank of :func:`run_local_ranks` failed or timed out; the message carries its traceback."""


def _local_rank_main(rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict, queue: Any,
                     env: dict) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args, **kwargs)
        queue.put((rank, True, result))
    except BaseException:  # report everything, including SystemExit from library code
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


# the environment of a spawned CPU rank in the benchmarks: DeepSpeed's CPU accelerator, one thread each (the ranks
# share the machine's cores)
CPU_RANK_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_local_ranks(
    fn: Callable,
    world_size: int,
    *,
    args: Sequence[Any] = (),
    kwargs: Optional[dict] = None,
    timeout: float = 600.0,
    env: Optional[dict] = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned CPU processes of this host joined
    by gloo (benchmarks and tests; ``env`` is added to each rank's environment). ``fn`` must be importable
    (module level). Returns the per-rank return values (picklable), in rank order; a failure on any rank
    raises :class:`RankFailure` with that rank's traceback."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_local_rank_main, args=(r, world_size, port, fn, tuple(args), dict(kwargs or {}), queue,
                                                dict(env or {})), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    import queue as _queue

    try:
        for _ in range(world_size):
            try:
                rank, ok, payload = queue.get(timeout=timeout)
            except _queue.Empty:
                raise RankFailure(
                    f"run_local_ranks({fn.__name__}, world_size={world_size}) timed out after {timeout}s; "
                    f"ranks that reported: {sorted(set(results) | set(errors))}"
                ) from None
            (results if ok else errors)[rank] = payload
            if not ok:
                break  # the other ranks are probably blocked in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        rank = min(errors)
        raise RankFailure(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]
