"""checkpoint.async: the same guarantees as a synchronous save. Async and sync runs end with bitwise-equal weights
(ZeRO-1 and ZeRO-3 on 2 ranks, and a 2-stage pipeline), a resume from an asynchronous checkpoint included;
kill -9 inside the background write leaves the previous checkpoint as `latest` and the run resumes to the same
weights; a failed background write stops every rank; a preemption signal waits for the write in flight, then
saves and exits 75."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmscale.checkpoint import list_checkpoints, read_latest, verify_checkpoint
from llmscale.testing import cpu_env, run_cli

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _args(data: Path, run_dir: Path, steps: int, **extra) -> list[str]:
    o = {"run_dir": run_dir, "data.path": data, "data.seq_len": 64, "model.preset": "gpt-tiny",
         "model.max_seq_len": 64, "model.dropout": 0.1, "optim.warmup_steps": 2, "parallel.micro_batch_size": 4,
         "parallel.global_batch_size": 16, "train.steps": steps, "train.log_every": 1, "train.eval_every": 0,
         "train.eval_batches": 1, "train.tensorboard": "false", "checkpoint.every_steps": 2,
         "checkpoint.keep_last": 5, **extra}
    return ["train", str(ROOT / "configs" / "quickstart.yaml"), *[f"{k}={v}" for k, v in o.items()]]


def _weights(run: Path) -> dict:
    return torch.load(run / "final" / "model.pt", map_location="cpu", weights_only=True)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("layout", [{"parallel.zero_stage": 1}, {"parallel.zero_stage": 3},
                                    {"parallel.pipeline_parallel": 2, "parallel.zero_stage": 1}],
                         ids=["zero1", "zero3", "pp2"])
def test_async_and_sync_runs_end_bitwise_equal_and_resume(tiny_gpt_dataset, tmp_path, layout):
    sync = tmp_path / "sync"
    run_cli(_args(tiny_gpt_dataset, sync, 6, **layout), nproc=2)
    run = tmp_path / "async"
    extra = {**layout, "checkpoint.async": "true"}
    first = run_cli(_args(tiny_gpt_dataset, run, 3, **extra), nproc=2)  # step 2 in the background; 3 at the end
    assert "written in the background" in first.stderr
    # resume from the asynchronous checkpoint of step 2, then step 4 in the background and 6 at the end
    run_cli([*_args(tiny_gpt_dataset, run, 6, **extra), "--resume-from", str(run / "checkpoints" / "step-000002")],
            nproc=2)
    _same(_weights(sync), _weights(run))
    assert [i.step for i in list_checkpoints(run)] == [2, 3, 4, 6] and read_latest(run) == "step-000006"
    for i in list_checkpoints(run):
        assert verify_checkpoint(i.path) == [], i.name


@pytest.mark.parametrize("phase", ["async_write", "async_hashed"])
def test_kill_inside_the_background_write_keeps_the_previous_checkpoint(tiny_gpt_dataset, tmp_path, phase):
    ref = tmp_path / "ref"
    run_cli(_args(tiny_gpt_dataset, ref, 6), nproc=2)
    run = tmp_path / "run"
    extra = {"checkpoint.async": "true"}
    died = run_cli(_args(tiny_gpt_dataset, run, 6, **extra), nproc=2, check=False,
                   env={"LLMSCALE_TEST_CRASH_AT": f"{phase}:4:1"})  # rank 1 dies writing step 4 in the background
    assert died.returncode != 0
    assert [i.step for i in list_checkpoints(run) if i.complete] == [2] and read_latest(run) == "step-000002"
    assert verify_checkpoint(run / "checkpoints" / "step-000002") == []
    run_cli(_args(tiny_gpt_dataset, run, 6, **extra), nproc=2)
    _same(_weights(ref), _weights(run))
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the interrupted folder was cleaned on resume


def test_a_failed_background_write_stops_every_rank(tiny_gpt_dataset, tmp_path):
    run = tmp_path / "run"
    proc = run_cli(_args(tiny_gpt_dataset, run, 8, **{"checkpoint.async": "true"}), nproc=2, check=False,
                   env={"LLMSCALE_TEST_ASYNC_FAIL": "4:1"})  # rank 1's write of step 4 hits a full disk
    assert proc.returncode != 0
    assert proc.stderr.count("saving checkpoint step-000004 failed") >= 2, proc.stderr[-3000:]  # both ranks say it
    assert "rank 1: background write: OSError" in proc.stderr and "No space left on device" in proc.stderr
    assert f'File "{ROOT / "llmscale"}' not in proc.stderr  # a clear error from llmscale (torchrun adds its own)
    assert [i.step for i in list_checkpoints(run)] == [2] and read_latest(run) == "step-000002"
    assert not (run / "checkpoints" / ".tmp-step-000004").exists()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in metrics) <= 6  # reported at the next step boundaries, not at the end


def test_preemption_waits_for_the_write_in_flight_then_saves_and_exits_75(tiny_gpt_dataset, tmp_path):
    from llmscale.signals import EXIT_REQUEUE

    run = tmp_path / "run"
    env = cpu_env({"LLMSCALE_TEST_ASYNC_DELAY_S": "6"})  # the background write of step 2 takes 6 s or more
    cmd = [sys.executable, "-m", "llmscale", *_args(tiny_gpt_dataset, run, 10_000, **{
        "checkpoint.async": "true", "checkpoint.every_steps": 2})]
    with open(tmp_path / "log.txt", "wb") as out:
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        tmp, done = run / "checkpoints" / ".tmp-step-000002", run / "checkpoints" / "step-000002"
        deadline = time.monotonic() + 300
        while not tmp.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)
        assert tmp.exists() and not done.exists(), (tmp_path / "log.txt").read_text()[-3000:]  # in flight now
        os.kill(p.pid, signal.SIGUSR1)
        assert p.wait(timeout=300) == EXIT_REQUEUE
    steps = [i.step for i in list_checkpoints(run)]
    assert steps[0] == 2 and steps[-1] > 2, steps  # the one in flight finished; the preemption save came after it
    assert read_latest(run) == f"step-{steps[-1]:06d}"
    assert all(verify_checkpoint(i.path) == [] for i in list_checkpoints(run))


def test_snapshot_is_a_frozen_copy_that_keeps_views_as_views():
    from llmscale.checkpoint.async_save import snapshot

    flat = torch.arange(12, dtype=torch.float32)
    p = torch.nn.Parameter(torch.ones(3))
    state = {"flat": flat, "view": flat[4:8].view(2, 2), "param": p, "nested": [flat[:2], (3, "x")]}
    sizes: list[int] = []
    snap = snapshot(state, {}, sizes)
    flat += 100  # training goes on
    p.data.mul_(5)
    assert torch.equal(snap["flat"], torch.arange(12, dtype=torch.float32)) and snap["param"].eq(1).all()
    assert snap["view"].untyped_storage().data_ptr() == snap["flat"].untyped_storage().data_ptr()  # still one storage
    assert snap["nested"][1] == (3, "x") and isinstance(snap["param"], torch.nn.Parameter)
    assert sum(sizes) == 12 * 4 + 3 * 4  # each storage copied once


def test_a_snapshot_that_would_not_fit_is_written_synchronously(tmp_path, monkeypatch, caplog):
    import llmscale.checkpoint.async_save as A

    monkeypatch.setattr(A, "available_memory", lambda: 1000)  # 800 bytes may be used for snapshots
    w = A.AsyncWriter(root=tmp_path, step=1, rank=0, crash=lambda phase: None)
    w.capture({"small": torch.zeros(10)}, str(tmp_path / "a.pt"))  # 40 bytes: snapshot, written later
    assert not (tmp_path / "a.pt").exists()
    with caplog.at_level("WARNING"):
        w.capture(state_dict={"big": torch.zeros(1000)}, path=str(tmp_path / "b.pt"))  # 4 kB: written now
    assert (tmp_path / "b.pt").exists() and "would not fit" in caplog.text
    w.start()
    w.join()
    assert w.error is None and set(w.hashes) == {"a.pt", "b.pt"} and w.snapshot_bytes == 40
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["small"], torch.zeros(10))


def test_async_failure_sync_saves_the_step_again_and_goes_on(tiny_gpt_dataset, tmp_path):
    ref = tmp_path / "ref"
    run_cli(_args(tiny_gpt_dataset, ref, 6), nproc=2)
    run = tmp_path / "run"
    proc = run_cli(_args(tiny_gpt_dataset, run, 6, **{"checkpoint.async": "true", "checkpoint.async_failure": "sync"}),
                   nproc=2, env={"LLMSCALE_TEST_ASYNC_FAIL": "4:1"})
    assert "saving checkpoint step-000004 failed" in proc.stderr and "saving step 5 synchronously" in proc.stderr
    assert [i.step for i in list_checkpoints(run)] == [2, 5, 6] and read_latest(run) == "step-000006"
    assert all(verify_checkpoint(i.path) == [] for i in list_checkpoints(run))
    _same(_weights(ref), _weights(run))  # the failed write changed nothing in training
