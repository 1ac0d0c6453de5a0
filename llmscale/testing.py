"""Helpers for tests only (library code never imports this module): run a function on N real processes (gloo, CPU), or
run the real CLI under torchrun.

    def check(rank, world_size, x):      # module-level, so it can be pickled
        ...
        return value
    results = run_distributed(check, world_size=2, args=(x,))   # [value of rank 0, value of rank 1]

A failure on any rank raises :class:`DistributedTestError` carrying that rank's traceback.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

from llmscale.dist import RankFailure, free_port, run_local_ranks

__all__ = ["DistributedTestError", "cpu_env", "free_port", "run_cli", "run_distributed"]


class DistributedTestError(AssertionError):
    """A rank of :func:`run_distributed` failed; the message carries its traceback."""


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


def run_distributed(
    fn: Callable,
    world_size: int,
    *,
    args: Sequence[Any] = (),
    kwargs: Optional[dict] = None,
    timeout: float = 600.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned processes joined by gloo
    (:func:`llmscale.dist.run_local_ranks` with :func:`cpu_env`). Returns the per-rank return values (which
    must be picklable), in rank order."""
    try:
        return run_local_ranks(fn, world_size, args=args, kwargs=kwargs, timeout=timeout, env=cpu_env())
    except RankFailure as e:
        raise DistributedTestError(str(e)) from None


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
            f"`{' '.join(cmd)}` exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n"
            f"--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc


def metrics_records(run_dir: str | Path, kind: Optional[str] = None) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl`` (only those of ``kind`` when given); [] before the file exists. A
    last line still being written by a running job is left out; a bad line anywhere else raises."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.is_file():
        return []
    lines = [line for line in f.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return [r for r in out if kind is None or r.get("kind") == kind]
