"""Faults: SIGKILL at random moments and at every phase of a save, damaged newest checkpoints (truncated,
flipped byte, garbage `latest`, missing manifest, planted file), a malicious pickle, a full disk,
NaN steps -> rollback, and a preemption signal -> save -> exit 75. All on CPU with real DeepSpeed ranks."""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _ckpt_common as C  # noqa: E402

from llmscale.checkpoint import CheckpointError, CheckpointManager, list_checkpoints, read_latest, verify_checkpoint  # noqa: E402
from llmscale.config import CheckpointConfig  # noqa: E402
from llmscale.dist import World  # noqa: E402
from llmscale.testing import cpu_env, free_port, run_distributed  # noqa: E402

WORKER = Path(__file__).parent / "_ckpt_worker.py"


def launch(run_dir: Path, kw: dict, *, world_size: int = 2, env: dict | None = None) -> list[subprocess.Popen]:
    """Start the ranks as plain processes sharing one new process group (killpg kills the whole job)."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    for r in range(world_size):
        e = cpu_env({"RANK": r, "WORLD_SIZE": world_size, "LOCAL_RANK": r, "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": port, **(env or {})})
        extra = {"process_group": 0 if r == 0 else procs[0].pid}
        log = open(run_dir.parent / f"{run_dir.name}-rank{r}.log", "ab")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(run_dir), json.dumps(kw)], env=e,
                                      stdout=log, stderr=subprocess.STDOUT, **extra))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            os.killpg(procs[0].pid, signal.SIGKILL)
            raise
    return codes


def logged_steps(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return 0


def assert_resumable(run_dir: Path) -> int:
    """The invariant after any crash: the newest complete checkpoint verifies (or there is none yet)."""
    done = [i for i in list_checkpoints(run_dir) if i.complete]
    if done:
        assert verify_checkpoint(done[-1].path) == [], done[-1].path
        return done[-1].step
    return 0


# ------------------------------------------------------------------------------------ kill -9


@pytest.mark.slow
def test_sigkill_at_random_moments_and_during_save_phases(tmp_path):
    steps = 24
    kw = {"steps": steps, "every_steps": 1, "keep_last": 2, "keep_every": 10, "step_sleep": 0.05}
    ref = tmp_path / "ref"
    assert wait_all(launch(ref, kw)) == [0, 0]
    want = json.loads((ref / "result-rank0.json").read_text())["digest"]

    run = tmp_path / "run"
    rng = random.Random(1234)
    # deterministic crashes inside a save at each phase, on rank 0 or rank 1 ...
    phases = [("state", 1), ("engine", 0), ("hashed", 1), ("manifest", 0), ("rename", 0), ("latest", 0),
              ("retention", 0)]
    kills, newest = 0, 0
    for phase, rank in phases:
        target = newest + 2
        procs = launch(run, {**kw, "loss_log": str(tmp_path / "loss.jsonl")},
                       env={"LLMSCALE_TEST_CRASH_AT": f"{phase}:{target}:{rank}"})
        codes = wait_all(procs)
        assert codes[rank] == 137, (phase, codes)
        os.killpg(procs[0].pid, signal.SIGKILL) if any(p.poll() is None for p in procs) else None
        kills += 1
        newest = assert_resumable(run)
        expect = target if phase in ("rename", "latest", "retention") else target - 1
        assert newest == expect, (phase, newest, expect)
    # ... then SIGKILL of every rank at random moments once training is under way (between steps, inside saves)
    for _ in range(3):
        seen = logged_steps(tmp_path / "loss.jsonl")
        procs = launch(run, {**kw, "loss_log": str(tmp_path / "loss.jsonl")})
        deadline = time.monotonic() + 240
        while logged_steps(tmp_path / "loss.jsonl") <= seen and time.monotonic() < deadline:
            if all(p.poll() is not None for p in procs):
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        os.killpg(procs[0].pid, signal.SIGKILL)
        wait_all(procs)
        kills += 1
        assert_resumable(run)
    assert kills >= 10
    assert wait_all(launch(run, kw)) == [0, 0]
    got = [json.loads((run / f"result-rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["step"] == steps and got[0]["digest"] == want and got[1]["digest"] == want
    assert [i.step for i in list_checkpoints(run)] == [10, 20, 23, 24]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------ damaged checkpoints


class _Plant:
    """A pickle that would create MARKER when unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0x5A
    p.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("damaged") / "run"
    run_distributed(C.train, 2, args=(str(run), 4), kwargs={"every_steps": 2, "keep_last": 3}, timeout=600)
    assert [i.step for i in list_checkpoints(run)] == [2, 4]
    return run


OPT0 = "model/zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "model/mp_rank_00_model_states.pt"


@pytest.mark.parametrize("damage", ["truncated", "flipped", "missing_manifest", "planted_file", "missing_file"])
def test_damaged_newest_falls_back_loudly(two_checkpoints, tmp_path, damage, caplog):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    new = run / "checkpoints" / "step-000004"
    bad = {"truncated": new / OPT0, "flipped": new / "state" / "rank-00001.safetensors",
           "missing_manifest": new / "manifest.json",
           "planted_file": new / "model" / "zero_pp_rank_2_mp_rank_00_optim_states.pt",
           "missing_file": new / MODEL}[damage]
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:100])
    elif damage == "flipped":
        _flip(bad)
    elif damage == "planted_file":
        bad.write_bytes(b"x")
    else:
        bad.unlink()
    m = CheckpointManager(world=World(), run_dir=run, checkpoint=CheckpointConfig())
    with caplog.at_level("WARNING"):
        assert m.find_resumable() == run / "checkpoints" / "step-000002"
    text = caplog.text
    assert "DAMAGED" in text and (bad.name in text or damage == "missing_manifest" and "manifest" in text)
    assert "OLDER checkpoint" in text
    # the damaged one is set aside (kept for inspection), never picked again
    assert not new.exists() and [p for p in (run / "checkpoints").iterdir() if ".corrupt-" in p.name]


@pytest.mark.slow
def test_damage_found_while_reading_once_sets_aside_and_resumes_the_older(two_checkpoints, tmp_path):
    """On the saved layout a resume reads DeepSpeed's files once, hashing them as it reads: a flipped byte in an
    optimizer shard (size unchanged, so only the checksum tells) is found during the load, before that file is
    unpickled; the checkpoint is set aside on every rank and the run resumes from the older one."""
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    _flip(run / "checkpoints" / "step-000004" / OPT0)
    res = run_distributed(C.train, 2, args=(str(run), 6), kwargs={"every_steps": 2, "keep_last": 3}, timeout=600)
    assert [r["resumed"] for r in res] == [2, 2] and [r["step"] for r in res] == [6, 6]
    assert [p.name for p in (run / "checkpoints").iterdir() if ".corrupt-" in p.name and "step-000004" in p.name]
    assert [i.step for i in list_checkpoints(run)] == [2, 4, 6]  # step 4 saved again by the resumed run


def test_garbage_latest_is_ignored_and_none_usable_is_an_error(two_checkpoints, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    (run / "checkpoints" / "latest").write_bytes(b"\x00\xffstep-../../etc\n")
    m = CheckpointManager(world=World(), run_dir=run, checkpoint=CheckpointConfig())
    with caplog.at_level("WARNING"):
        assert m.find_resumable() == run / "checkpoints" / "step-000004"
    assert read_latest(run) is None and "not a checkpoint name" in caplog.text
    for step in (2, 4):
        (run / "checkpoints" / f"step-{step:06d}" / MODEL).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="none is usable.*--no-resume"):
        m.find_resumable()
    # only interrupted saves (.tmp-*) are not checkpoints: a fresh start, and they are cleaned up
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints" / ".tmp-step-000002" / "model").mkdir(parents=True)
    (fresh / "checkpoints" / ".latest.tmp-4242").write_text("step-000002\n")  # an atomic write cut short by a kill
    assert CheckpointManager(world=World(), run_dir=fresh, checkpoint=CheckpointConfig()).find_resumable() is None
    assert list((fresh / "checkpoints").iterdir()) == []


@pytest.mark.slow
def test_malicious_pickle_never_runs_on_resume(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    marker = tmp_path / "PWNED"
    # the attacker replaces DeepSpeed's model file of the newest checkpoint with a pickle that runs code
    with open(run / "checkpoints" / "step-000004" / MODEL, "wb") as f:
        pickle.dump(_Plant(str(marker)), f)
    out = run_distributed(C.train, 2, args=(str(run), 6), kwargs={"every_steps": 2}, timeout=600)
    assert not marker.exists(), "a pickle from the run directory was executed"
    assert out[0]["resumed"] == 2 and out[0]["step"] == 6  # fell back to the older, intact checkpoint


# ------------------------------------------------------------------------------------ disk full


def _train_until_full(rank, world_size, run_dir):
    m = CheckpointManager(world=C.world_of(rank, world_size), run_dir=run_dir,
                          checkpoint=CheckpointConfig(every_steps=1, keep_last=100))
    engine = C.build_ds(world_size=world_size, model=C.toy_model())
    ballast = Path(run_dir) / "ballast"
    loader, counters = C.ToyLoader(dp_rank=rank, dp_size=world_size), C.Counters()
    stateful = {"trainer": counters, "loader": loader}
    C.train_step(engine, loader.next_step())
    counters.step = 1
    m.save(1, engine, stateful)
    # fill the disk so that only part of the next checkpoint fits
    free = shutil.disk_usage(run_dir).free
    ballast.write_bytes(b"\0" * max(free - 150_000, 0))
    C.train_step(engine, loader.next_step())
    counters.step = 2
    try:
        m.save(2, engine, stateful)
    except CheckpointError as e:
        return str(e)
    return None


@pytest.mark.slow
def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}): needs root")
    try:
        err = run_distributed(_train_until_full, 1, args=(str(mnt / "run"),), timeout=600)[0]
        assert err is not None and "step-000002 failed" in err and "No space left" in err
        assert "previous checkpoint is untouched" in err and "step-000001" in err
        run = mnt / "run"
        (run / "ballast").unlink()
        assert [i.step for i in list_checkpoints(run)] == [1] and verify_checkpoint(
            run / "checkpoints" / "step-000001") == []
        assert read_latest(run) == "step-000001"
        assert not (run / "checkpoints" / ".tmp-step-000002").exists()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ------------------------------------------------------------------------------------ NaN -> rollback


@pytest.mark.slow
def test_nan_steps_roll_back_and_skip_the_batches(tmp_path):
    # data steps 5 and 6 yield NaN losses: DeepSpeed skips each update (overflow check); 2 bad in a row -> rollback
    out = run_distributed(C.train, 2, args=(str(tmp_path / "run"), 8),
                          kwargs={"every_steps": 2, "nan_steps": (5, 6), "max_bad_steps": 2}, timeout=600)[0]
    assert out["rollbacks"] == [(6, 4)]
    assert out["step"] == 8 and out["loader_step"] == 10  # batches 5 and 6 were skipped, not replayed
    assert all(v == v for v in out["losses"].values()) and sorted(out["losses"]) == [1, 2, 3, 4, 5, 6, 7, 8]


# ------------------------------------------------------------------------------------ preemption


@pytest.mark.slow
def test_signal_on_one_rank_saves_on_all_and_exits_75(tmp_path):
    from llmscale.signals import EXIT_REQUEUE

    run = tmp_path / "run"
    log = tmp_path / "loss.jsonl"
    procs = launch(run, {"steps": 10_000, "every_steps": 0, "preempt": True, "step_sleep": 0.05, "loss_log": str(log)})
    deadline = time.monotonic() + 240
    while logged_steps(log) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGUSR1)  # only rank 1 is told; rank 0 learns it at the step boundary
    assert wait_all(procs) == [EXIT_REQUEUE, EXIT_REQUEUE]
    res = [json.loads((run / f"result-rank{r}.json").read_text()) for r in (0, 1)]
    assert res[0]["stopped"] and res[0]["step"] == res[1]["step"]
    assert [i.step for i in list_checkpoints(run)] == [res[0]["step"]]
    assert verify_checkpoint(run / "checkpoints" / f"step-{res[0]['step']:06d}") == []


# ------------------------------------------------------------------------------------ the real `llmscale train`


@pytest.fixture(scope="module")
def gpt_data(tiny_gpt_dataset):
    """conftest's tiny GPT dataset (vocab 512, seq_len 64, 5% val, paragraphs); training only reads it."""
    return tiny_gpt_dataset


def _train_cmd(data: Path, run_dir: Path, steps: int) -> list[str]:
    o = {"run_dir": run_dir, "data.path": data, "data.seq_len": 64, "model.preset": "gpt-tiny", "model.max_seq_len": 64,
         "model.dropout": 0.1, "optim.warmup_steps": 2, "parallel.zero_stage": 1, "parallel.micro_batch_size": 4,
         "parallel.global_batch_size": 16, "train.steps": steps, "train.log_every": 1, "train.eval_every": 0,
         "train.eval_batches": 1, "train.tensorboard": "false", "checkpoint.every_steps": 1, "checkpoint.keep_last": 2}
    root = Path(__file__).resolve().parents[1]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llmscale",
            "train", str(root / "configs" / "quickstart.yaml"), *[f"{k}={v}" for k, v in o.items()]]


@pytest.mark.slow
def test_sigkill_real_train_resumes_to_the_same_weights(gpt_data, tmp_path):
    import torch

    steps = 30
    ref = tmp_path / "ref"
    assert subprocess.run(_train_cmd(gpt_data, ref, steps), env=cpu_env(), capture_output=True,
                          timeout=600).returncode == 0
    run = tmp_path / "run"
    rng = random.Random(7)
    for i in range(3):
        seen = logged_steps(run / "metrics.jsonl")
        log = open(tmp_path / f"kill{i}.log", "wb")
        p = subprocess.Popen(_train_cmd(gpt_data, run, steps), env=cpu_env(), stdout=log, stderr=subprocess.STDOUT,
                             process_group=0)
        deadline = time.monotonic() + 300
        while logged_steps(run / "metrics.jsonl") <= seen and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0))
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and both ranks at once
        p.wait(timeout=60)
        newest = assert_resumable(run)
    assert 0 < newest < steps, newest  # the kills interrupted training, and progress was kept
    done = subprocess.run(_train_cmd(gpt_data, run, steps), env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step" in done.stderr
    want = torch.load(ref / "final" / "model.pt", weights_only=True)
    got = torch.load(run / "final" / "model.pt", weights_only=True)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.slow
def test_real_train_installs_its_signal_handlers_and_honours_the_grace_env(gpt_data, tmp_path):
    """`llmscale train` itself turns SIGUSR1 into save-then-exit-75, and LLMSCALE_PREEMPT_GRACE_S bounds how long
    that may take: with a deadline shorter than one step it exits 75 at once, before any save."""
    from llmscale.signals import EXIT_REQUEUE

    def preempted(run_dir: Path, env: dict) -> int:
        cmd = _train_cmd(gpt_data, run_dir, 100_000)
        cmd = [sys.executable, "-m", "llmscale", *cmd[cmd.index("train"):], "checkpoint.every_steps=0"]
        with open(run_dir.parent / f"{run_dir.name}.log", "wb") as log:
            p = subprocess.Popen(cmd, env=cpu_env(env), stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 300
            while logged_steps(run_dir / "metrics.jsonl") < 2 and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            p.send_signal(signal.SIGUSR1)
            return p.wait(timeout=300)

    graceful = tmp_path / "graceful"
    assert preempted(graceful, {}) == EXIT_REQUEUE
    saved = list_checkpoints(graceful)
    assert len(saved) == 1 and verify_checkpoint(saved[0].path) == []  # saved at the step boundary
    hard = tmp_path / "hard"
    assert preempted(hard, {"LLMSCALE_PREEMPT_GRACE_S": "0.001"}) == EXIT_REQUEUE
    assert list_checkpoints(hard) == []  # the deadline ended it before the next step boundary


# ------------------------------------------------------------------------------------ failures end in bounded time


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Return codes; a process still running after ``timeout`` s is a hang: killed, and the test fails."""
    end = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(end - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"rank pid {p.pid} still running after {timeout}s: the failure did not end the job")
    return codes


@pytest.mark.slow
def test_rank_failing_inside_deepspeed_save_ends_every_rank_and_keeps_the_previous_checkpoint(tmp_path):
    """Rank 1 raises while DeepSpeed writes its shards of step 4 (plain processes, no launcher to kill the other
    rank): it says so and exits 1 at once; rank 0, inside DeepSpeed's collectives, fails as soon as rank 1's
    connection closes (gloo) or at the bound. Step 2 stays the newest checkpoint, whole; the run resumes from it."""
    run = tmp_path / "run"
    kw = {"steps": 6, "every_steps": 2, "wait_timeout_s": 60}
    procs = launch(run, kw, env={"LLMSCALE_TEST_CRASH_AT": "engine-file:4:1:raise"})
    codes = _finish(procs, timeout=300)  # far below the 30 min process-group timeout it used to wait for
    assert codes[0] != 0 and codes[1] == 1, codes
    log1 = (tmp_path / "run-rank1.log").read_text(errors="replace")
    assert "failed on rank 1 inside DeepSpeed's save" in log1 and "simulated write failure" in log1
    assert "previous checkpoint is untouched" in log1
    assert [i.step for i in list_checkpoints(run) if i.complete] == [2]
    assert read_latest(run) == "step-000002" and verify_checkpoint(run / "checkpoints" / "step-000002") == []
    # the same command without the fault resumes at step 2 and finishes
    procs = launch(run, kw)
    assert _finish(procs, timeout=300) == [0, 0]
    res = json.loads((run / "result-rank0.json").read_text())
    assert res["resumed"] == 2 and res["step"] == 6


@pytest.mark.slow
def test_a_rank_stuck_in_a_save_makes_the_others_exit_at_the_bound_naming_the_wait(tmp_path):
    """Rank 1 hangs before writing its state of step 4: rank 0 waits for it at the save's first agreement, gives
    up after wait_timeout_s and exits 1 with a line that names what it waited for."""
    run = tmp_path / "run"
    procs = launch(run, {"steps": 6, "every_steps": 2, "wait_timeout_s": 10},
                   env={"LLMSCALE_TEST_CRASH_AT": "state:4:1:hang"})
    try:
        assert _finish(procs[:1], timeout=240) == [1]
        assert procs[1].poll() is None  # still hanging: srun/torchrun stop it once rank 0 has exited
    finally:
        procs[1].kill()
        procs[1].wait(timeout=30)
    log0 = (tmp_path / "run-rank0.log").read_text(errors="replace")
    assert "rank 0: gave up after 1" in log0  # 10-19 s
    assert "checkpoint step-000004: every rank's own state files, before DeepSpeed's save" in log0
    assert "train.wait_timeout_s (10s)" in log0
    assert [i.step for i in list_checkpoints(run) if i.complete] == [2]
