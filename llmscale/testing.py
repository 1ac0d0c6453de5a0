"""Helpers for tests and benchmarks: run a function on N real processes (gloo, CPU), or run the
real CLI under torchrun.

    def check(rank, world_size, x):      # module-level, so it can be pickled
        ...
        return value
    results = run_distributed(check, world_size=2, args=(x,))   # [value of rank 0, value of rank 1]

A failure on any rank raises :class:`DistributedTestError` carrying that rank's traceback.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence


class DistributedTestError(AssertionError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(extra: Optional[dict] = None) -> dict:
    """Environment for CPU-only distributed runs: DeepSpeed's CPU accelerator, one thread per rank."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict, queue: Any) -> None:
    os.environ.update(cpu_env())
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


def run_distributed(
    fn: Callable,
    world_size: int,
    *,
    args: Sequence[Any] = (),
    kwargs: Optional[dict] = None,
    timeout: float = 600.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned processes joined by gloo.

    Returns the per-rank return values (which must be picklable), in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, tuple(args), dict(kwargs or {}), queue), daemon=False)
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
                raise DistributedTestError(
                    f"run_distributed({fn.__name__}, world_size={world_size}) timed out after {timeout}s; "
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
        raise DistributedTestError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]


def run_cli(
    args: Sequence[str],
    *,
    nproc: int = 1,
    env: Optional[dict] = None,
    cwd: Optional[str | Path] = None,
    timeout: float = 900.0,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``llmscale ARGS`` for real: directly when nproc == 1, else under torchrun (gloo, CPU)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "llmscale", *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "llmscale", *args,
        ]
    proc = subprocess.run(cmd, env=cpu_env(env), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"`{' '.join(cmd)}` exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc
