"""Checkpoint save/load throughput beside the raw sequential write/read speed of the same disk, measured in the
same run (``llmscale bench ckpt``, :mod:`llmscale.jobs.bench_ckpt`; :func:`run` returns the result dict).

* raw disk: write N MB in 8 MB blocks + fsync, then read it back after evicting it from the page cache
  (``posix_fadvise(DONTNEED)``), like ``dd conv=fsync`` / ``dd iflag=direct``;
* save: :meth:`CheckpointManager.save` of a ZeRO-1 DeepSpeed engine whose fp32 parameters take N MB (the
  checkpoint also holds the Adam moments and fp32 master copy: about 4 N MB); includes hashing + fsync;
* stall: how much longer the training step that saves takes than a median step;
* load: cache evicted, a resume as a restarted run does it (each file read once, hashed as it is read, unpickled
  after its checksum matched); beside it the old order (verify every file, then DeepSpeed reads it again), verify
  alone and DeepSpeed's load alone;
* launch to first resumed step: a fresh process (imports, engine, resume, one step), as after a requeue, once
  with an empty build cache for DeepSpeed's CPU communication op (a machine's first launch) and once with it.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLOCK = 8 << 20


def _evict(path: Path) -> None:
    for p in ([path] if path.is_file() else [q for q in path.rglob("*") if q.is_file()]):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_disk(folder: Path, size_mb: int) -> dict:
    f = folder / "raw.bin"
    buf = os.urandom(BLOCK)
    n = max(size_mb * (1 << 20) // BLOCK, 1)
    t0 = time.perf_counter()
    with open(f, "wb", buffering=0) as fh:
        for _ in range(n):
            fh.write(buf)
        os.fsync(fh.fileno())
    tw = time.perf_counter() - t0
    _evict(f)
    t0 = time.perf_counter()
    with open(f, "rb", buffering=0) as fh:
        while fh.read(BLOCK):
            pass
    tr = time.perf_counter() - t0
    from llmscale.files import sha256_file

    t0 = time.perf_counter()
    sha256_file(f)  # from the page cache now: the cost of checksumming alone
    th = time.perf_counter() - t0
    nbytes = n * BLOCK
    f.unlink()
    return {"bytes": nbytes, "write_gbps": nbytes / tw / 1e9, "read_gbps": nbytes / tr / 1e9,
            "sha256_gbps": nbytes / th / 1e9}


def _model(size_mb: int):
    """Square linear layers holding ``size_mb`` MB of fp32 weights, trained on a squared-norm loss: the engine
    only needs ``forward(input_ids, labels=...)`` returning an output with ``loss``."""
    import torch

    from llmscale.models.layers import ModelOutput

    width = 2048
    layers = max(int(size_mb * (1 << 20) / 4 / (width * width + width)), 1)

    class MatrixStack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

        def forward(self, input_ids, labels=None):
            out = self.net(input_ids)
            return ModelOutput(logits=out, loss=out.pow(2).mean())

    torch.manual_seed(0)
    return MatrixStack()


def _engine(size_mb: int):
    """An llmscale Engine (ZeRO-1 on DeepSpeed, built by ``build_engine`` as in training) for the stack."""
    from llmscale.config import RunConfig, from_dict
    from llmscale.dist import World
    from llmscale.engine import build_engine
    from llmscale.parallel import plan_run

    cfg = from_dict(RunConfig, {
        "data": {"seq_len": 8},
        "model": {"family": "gpt", "n_layers": 1, "d_model": 8, "n_heads": 1, "vocab_size": 8, "max_seq_len": 8},
        "optim": {"lr": 1e-4, "min_lr": 0.0, "warmup_steps": 0, "schedule": "constant"},
        "train": {"precision": "fp32"},
        "parallel": {"zero_stage": 1, "global_batch_size": 4, "micro_batch_size": 4},
    })
    return build_engine(cfg, _model(size_mb), world=World(), plan=plan_run(cfg, 1))


def _step(engine) -> float:
    import torch

    t0 = time.perf_counter()
    engine.train_step([{"input_ids": torch.randn(4, 2048), "labels": torch.zeros(4, 2048)}])
    return time.perf_counter() - t0


class _Count:
    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, s: dict) -> None:
        self.step = int(s["step"])


def _init_single_process() -> None:
    from llmscale import dist as ldist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ldist.init_distributed(ldist.world_for_job({k: v for k, v in os.environ.items()
                                                if k not in ("RANK", "WORLD_SIZE")}), backend="gloo")


def probe(run_dir: str, size_mb: int) -> dict:
    """Child process (``llmscale bench ckpt --resume-probe RUN_DIR``): build, resume, one step; the step resumed."""
    from llmscale.checkpoint import CheckpointManager
    from llmscale.config import CheckpointConfig
    from llmscale.dist import World

    _init_single_process()
    engine = _engine(size_mb)
    counters = _Count()
    step = CheckpointManager(world=World(), run_dir=run_dir, checkpoint=CheckpointConfig()).resume(
        engine, {"trainer": counters})
    _step(engine)
    return {"resumed": step}


def _rss_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _async_phase(engine, run_dir: Path) -> dict:
    """Steps with checkpoint.async saving at step 5: the save step's stall over the median step (target: at most
    one step), the time until the checkpoint is complete, the snapshot's host memory."""
    from llmscale.checkpoint import CheckpointManager
    from llmscale.config import CheckpointConfig
    from llmscale.dist import World

    mgr = CheckpointManager(world=World(), run_dir=run_dir,
                            checkpoint=CheckpointConfig(every_steps=5, keep_last=1, async_=True))
    counters = _Count()
    steps, stall, t_save, durable, snap, writing, overlapped = [], None, None, None, 0, 0, []
    for i in range(1, 16):
        t0 = time.perf_counter()
        dt = _step(engine)
        counters.step = i
        was_writing = t_save is not None and durable is None  # this step ran while the write went on
        mgr.poll()
        if was_writing and mgr.last_saved_step == 5:
            durable = time.perf_counter() - t_save
        path = mgr.maybe_save(i, engine, {"trainer": counters}) if i == 5 else None
        if path is not None:
            t_save = t0 + dt
            stall = time.perf_counter() - t0
            snap = mgr._pending[0].snapshot_bytes if mgr._pending else 0
        else:
            steps.append(time.perf_counter() - t0)
            if was_writing:
                writing += 1
                overlapped.append(steps[-1])  # what the background write costs the steps it overlaps
    if durable is None:  # still writing after the last step
        mgr.wait()
        durable = time.perf_counter() - t_save
    med = statistics.median(steps)  # this phase's own median step (the machine may differ from the sync phase)
    lost = sum(t - med for t in overlapped)
    return {"median_step_s": med, "save_step_s": stall, "training_stall_s": stall - med,
            "stall_in_steps": (stall - med) / med, "meets_target": (stall - med) <= med, "durable_s": durable,
            "snapshot_bytes": snap, "steps_while_writing": writing,
            # the save step's stall plus the extra time of the steps that ran while the write went on: what the
            # save really cost training (on a CPU-only machine the writer and the steps share the cores)
            "training_time_lost_s": (stall - med) + lost, "step_times_s": steps}


def run(*, size_mb: int = 256, workdir: str | None = None, keep: bool = False) -> dict:
    """The benchmark in a temporary folder inside ``workdir`` (default ./runs), removed unless ``keep``."""
    import torch

    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    from llmscale.checkpoint import CheckpointManager
    from llmscale.config import CheckpointConfig
    from llmscale.dist import World

    base = Path(workdir) if workdir else Path("runs")
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=base))
    try:
        raw = raw_disk(folder, max(size_mb * 2, 256))
        _init_single_process()
        engine = _engine(size_mb)
        nparams = sum(p.numel() for p in engine.ds.module.parameters())
        counters = _Count()
        run_dir = folder / "run"
        mgr = CheckpointManager(world=World(), run_dir=run_dir, checkpoint=CheckpointConfig(every_steps=5, keep_last=1))
        steps = []
        stall = None
        saves = []
        for i in range(1, 11):
            dt = _step(engine)
            counters.step = i
            t0 = time.perf_counter()
            path = mgr.maybe_save(i, engine, {"trainer": counters})
            ds = time.perf_counter() - t0
            if path is None:
                steps.append(dt)
            else:
                saves.append(ds)
                stall = dt + ds
        med = statistics.median(steps)
        from llmscale.checkpoint import read_manifest

        m = read_manifest(path)
        nbytes = m["total_bytes"]
        from llmscale.checkpoint import verify_checkpoint

        _evict(path)
        t0 = time.perf_counter()
        assert verify_checkpoint(path) == []
        tv = time.perf_counter() - t0  # cold read + sha256 of every file
        _evict(path)
        t0 = time.perf_counter()
        mgr.load(path, engine, {"trainer": _Count()}, verified=True)
        tl_noverify = time.perf_counter() - t0  # DeepSpeed's torch.load + llmscale state, cold cache
        _evict(path)
        t0 = time.perf_counter()
        mgr.load(path, engine, {"trainer": _Count()})
        tl_twice = time.perf_counter() - t0  # verify every file first, then DeepSpeed reads them again
        _evict(path)
        counters2 = _Count()
        t0 = time.perf_counter()
        resumed = mgr.resume(engine, {"trainer": counters2})  # what a restarted run does: each file read once
        tl = time.perf_counter() - t0
        assert resumed == 10 and counters2.step == 10, (resumed, counters2.step)
        # a fresh process resuming, as after a requeue: first with an empty build cache for DeepSpeed's
        # communication op (a machine's first launch), then again with that cache (every later launch)
        env = dict(os.environ)
        env.pop("MASTER_PORT", None)
        launches = {}
        with tempfile.TemporaryDirectory(prefix="torch-ext-", dir=base) as ext:
            env["TORCH_EXTENSIONS_DIR"] = ext
            for kind in ("first", "repeat"):
                _evict(path)
                t0 = time.perf_counter()
                out = subprocess.run([sys.executable, "-m", "llmscale", "bench", "ckpt", "--resume-probe",
                                      str(run_dir), "--size-mb", str(size_mb)], capture_output=True, text=True,
                                     env=env)
                launches[kind] = time.perf_counter() - t0
                if out.returncode != 0:
                    raise RuntimeError(f"resume probe failed:\n{out.stderr[-3000:]}")
        t_launch = launches["repeat"]
        rss_sync = _rss_peak_mb()
        asy = _async_phase(engine, folder / "run_async")
        asy["rss_peak_increase_mb"] = _rss_peak_mb() - rss_sync
        save_gbps = nbytes / min(saves) / 1e9
        load_gbps = nbytes / tl / 1e9
        result = {
            "benchmark": "ckpt",
            "disk_dir": str(folder),
            "model_params": nparams,
            "model_mb_fp32": nparams * 4 / 1e6,
            "checkpoint_bytes": nbytes,
            "checkpoint_files": len(m["files"]),
            "raw_write_gbps": raw["write_gbps"],
            "raw_read_gbps": raw["read_gbps"],
            "sha256_gbps": raw["sha256_gbps"],
            "save_s": min(saves),
            "save_gbps": save_gbps,
            "save_vs_raw_write": save_gbps / raw["write_gbps"],
            "load_s": tl,
            "load_gbps": load_gbps,
            "load_vs_raw_read": load_gbps / raw["read_gbps"],
            "load_verify_s": tv,
            "load_verify_then_read_s": tl_twice,
            "load_verify_then_read_gbps": nbytes / tl_twice / 1e9,
            "load_without_verify_s": tl_noverify,
            "load_without_verify_gbps": nbytes / tl_noverify / 1e9,
            "median_step_s": med,
            "save_step_s": stall,
            "training_stall_s": stall - med if stall is not None else None,
            "launch_to_first_resumed_step_s": t_launch,
            "launch_to_first_resumed_step_first_build_s": launches["first"],
            # the same engine saving with checkpoint.async: stall at the save step, time until the checkpoint is
            # complete (manifest, rename, latest), and the host memory the snapshot took
            "async": asy,
            "sync_durable_s": min(saves),
            "world_size": 1,
            "zero_stage": 1,
            "cpu_count": os.cpu_count(),
        }
        return result
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
