"""A real one-node SLURM cluster (munged + slurmctld + slurmd from Debian's slurm-wlm) built in a
temporary folder, and real jobs submitted to it with sbatch/srun: the distributed rank discovery under
srun, slurm/train.sbatch end to end, and preemption -> checkpoint -> `scontrol requeue` -> resume.

The cluster: NodeName=localhost (CPUs=2) in one partition, munge with its own key and socket, every
state/spool/log/pid path and both ports private to this test, SLURM_CONF pointing at the generated
slurm.conf (given to every client command and inherited by the jobs). Needs root (the daemons run as
SlurmUser=root) and the binaries; CI installs them (`apt-get install slurm-wlm munge`, see .ci/run).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from llmscale.testing import metrics_records

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SBATCH = ROOT / "slurm" / "train.sbatch"

pytestmark = pytest.mark.slurm

_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")


def _missing_reason() -> Optional[str]:
    missing = [b for b in _BINARIES if shutil.which(b) is None]
    if missing:
        return (f"SLURM test cluster needs {', '.join(missing)} (install as root: "
                f"apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        return "SLURM test cluster needs root (slurmd launches jobs as SlurmUser=root)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    root: Path
    env: dict
    procs: dict = field(default_factory=dict)  # name -> Popen

    def cmd(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        p = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"`{' '.join(args)}` exited {p.returncode}: {p.stderr.strip()}\n{self.logs()}")
        return p

    def sbatch(self, script: Path, *args: str, options: tuple = (), env: Optional[dict] = None) -> int:
        p = subprocess.run(
            ["sbatch", "--parsable", *options, str(script), *args],
            env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60,
        )
        assert p.returncode == 0, f"sbatch failed ({p.returncode}): {p.stderr}\n{self.logs()}"
        return int(p.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.cmd("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_job(self, job_id: int, states: tuple[str, ...], *, timeout: float, log: Optional[Path] = None) -> dict:
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        text = log.read_text() if log and log.exists() else "(no job log)"
        raise AssertionError(
            f"job {job_id} not in {states} after {timeout}s: {info.get('JobState')} "
            f"({info.get('Reason')})\n--- job log ---\n{text[-6000:]}\n{self.logs()}"
        )

    def logs(self, tail: int = 2500) -> str:
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            f = self.root / "log" / name
            if f.exists():
                parts.append(f"--- {name} ---\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        # Cancel what still runs so no job outlives its cluster, then stop the daemons we started.
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True, timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                q = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True, timeout=30)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _slurm_conf(root: Path, *, ctld_port: int, slurmd_port: int) -> str:
    # Kept as small as Slurm 22.05/23.x allow: no cgroups (proctrack/linuxproc, task/none), no
    # accounting; the node's CPUs/memory are taken as configured (config_overrides) so the test does
    # not depend on the machine's size. cred_expire also sets how long a requeued job waits before it
    # may start again (default 120 s); the scheduler runs every second instead of every minute.
    return textwrap.dedent(f"""\
        ClusterName=llmscaletest
        SlurmctldHost=localhost(127.0.0.1)
        SlurmctldPort={ctld_port}
        SlurmdPort={slurmd_port}
        SlurmUser=root
        SlurmdUser=root
        AuthType=auth/munge
        CredType=cred/munge
        AuthInfo=socket={root}/munge/munge.sock,cred_expire=5
        StateSaveLocation={root}/state
        SlurmdSpoolDir={root}/spool
        SlurmctldPidFile={root}/run/slurmctld.pid
        SlurmdPidFile={root}/run/slurmd.pid
        SlurmctldLogFile={root}/log/slurmctld.log
        SlurmdLogFile={root}/log/slurmd.log
        SlurmctldDebug=info
        SlurmdDebug=info
        MailProg=/bin/true
        ProctrackType=proctrack/linuxproc
        TaskPlugin=task/none
        SelectType=select/cons_tres
        SelectTypeParameters=CR_CPU
        SchedulerType=sched/backfill
        SchedulerParameters=sched_interval=1,bf_interval=1
        MpiDefault=none
        SwitchType=switch/none
        JobAcctGatherType=jobacct_gather/none
        AccountingStorageType=accounting_storage/none
        JobCompType=jobcomp/none
        SlurmdParameters=config_overrides
        ReturnToService=2
        JobRequeue=1
        KillWait=20
        MinJobAge=3600
        InactiveLimit=0
        NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=4000 State=UNKNOWN
        PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
        """)


def _start(cluster: SlurmCluster, name: str, args: list[str]) -> None:
    out = open(cluster.root / "log" / f"{name}.out", "w")
    cluster.procs[name] = subprocess.Popen(args, env=cluster.env, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def slurm_cluster():
    reason = _missing_reason()
    if reason:
        pytest.skip(reason)
    # Short path: the munge socket path must stay under the 108-byte limit of unix sockets.
    root = Path(tempfile.mkdtemp(prefix="llmscale-slurm-"))
    for d in ("munge", "state", "spool", "log", "run", "jobs"):
        (root / d).mkdir()
    (root / "munge").chmod(0o755)
    key = root / "munge" / "munge.key"
    if shutil.which("mungekey"):
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
    else:
        key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    ctld_port = _free_port()
    slurmd_port = _free_port()
    while slurmd_port == ctld_port:
        slurmd_port = _free_port()
    conf.write_text(_slurm_conf(root, ctld_port=ctld_port, slurmd_port=slurmd_port))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
        del env[k]  # a surrounding real SLURM job must not leak into the test cluster's jobs
    cluster = SlurmCluster(root=root, env=env)
    try:
        _start(cluster, "munged", [
            "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={root}/munge/munge.sock",
            f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log",
            f"--seed-file={root}/munge/munged.seed",
        ])
        deadline = time.monotonic() + 20
        while not (root / "munge" / "munge.sock").exists():
            assert cluster.procs["munged"].poll() is None and time.monotonic() < deadline, \
                f"munged did not start:\n{(root / 'log' / 'munged.out').read_text()}\n{cluster.logs()}"
            time.sleep(0.1)
        _start(cluster, "slurmctld", ["slurmctld", "-D", "-i"])
        _start(cluster, "slurmd", ["slurmd", "-D", "-N", "localhost"])
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            for name, p in cluster.procs.items():
                assert p.poll() is None, (
                    f"{name} exited with {p.returncode}:\n{(root / 'log' / f'{name}.out').read_text()[-3000:]}\n"
                    f"{cluster.logs()}")
            q = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], env=env, capture_output=True,
                               text=True, timeout=30)
            state = q.stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"node not idle after 60 s (sinfo: {state!r})\n{cluster.logs()}")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- tests

_ALLREDUCE = textwrap.dedent("""\
    import os, sys, torch, torch.distributed as dist
    from llmscale.dist import discover_world, init_distributed, shutdown
    world = discover_world()
    init_distributed(world, backend="gloo")
    t = torch.tensor([float(world.rank + 1)])
    dist.all_reduce(t)
    print(f"rank={world.rank} world_size={world.world_size} local_rank={world.local_rank} "
          f"master={world.master_addr}:{world.master_port} sum={t.item()}", flush=True)
    shutdown()
    """)


def test_srun_tasks_find_their_ranks(slurm_cluster, tmp_path):
    """Two srun tasks discover rank/world from SLURM_* alone and complete a gloo all_reduce."""
    script = tmp_path / "allreduce.py"
    script.write_text(_ALLREDUCE)
    job = tmp_path / "job.sh"
    job.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        unset RANK WORLD_SIZE LOCAL_RANK
        export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
        srun --ntasks=2 {sys.executable} {script}
        """))
    log = tmp_path / "job.out"
    jid = slurm_cluster.sbatch(job, options=("--ntasks=2", f"--output={log}", f"--chdir={tmp_path}"),
                               env={"OMP_NUM_THREADS": "1"})
    info = slurm_cluster.wait_job(jid, ("COMPLETED", "FAILED", "CANCELLED"), timeout=90, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    lines = sorted(re.findall(r"rank=\d .*", text))
    assert len(lines) == 2, text
    for r, line in enumerate(lines):
        assert line.startswith(f"rank={r} world_size=2 local_rank={r} master=localhost:"), line
        assert line.endswith("sum=3.0"), line


def _finished(info: dict) -> bool:
    return info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def tiny_dataset(slurm_cluster, corpus_path, tmp_path_factory) -> Path:
    """A small GPT dataset made by slurm/prepare.sbatch on the test cluster (1 CPU)."""
    root = tmp_path_factory.mktemp("slurm-data")
    corpus = root / "corpus.txt"
    corpus.write_text(corpus_path.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    out, log = root / "ds", root / "prepare.out"
    jid = slurm_cluster.sbatch(
        ROOT / "slurm" / "prepare.sbatch", "--input", str(corpus), "--output", str(out), "--vocab-size", "400",
        "--seq-len", "64", "--val-fraction", "0.05",
        options=("--cpus-per-task=1", "--mem=500M", f"--output={log}"),
        env={"PYTHON": sys.executable, "LLMSCALE_DIR": str(ROOT)},
    )
    info = slurm_cluster.wait_job(jid, ("COMPLETED", "FAILED", "CANCELLED"), timeout=120, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert "--num-proc 1" in text, text  # SLURM_CPUS_PER_TASK became the tokenizer's thread count
    assert (out / "manifest.json").is_file(), text
    return out


# CPU node: two tasks of one CPU each, no GPUs (the sbatch defaults are 8 GPUs per node).
_CPU_JOB = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1")


def _records(run_dir: Path, kind: str = "train") -> list[dict]:
    return metrics_records(run_dir, kind)


STEPS = 300  # enough that a preemption signal lands mid-run; a step takes ~0.03 s on one CPU


@pytest.fixture(scope="module")
def uninterrupted_run(slurm_cluster, tiny_dataset, tiny_config, tmp_path_factory) -> dict:
    """slurm/train.sbatch as a user submits it, run to the end: {log, info, run_dir}."""
    root = tmp_path_factory.mktemp("slurm-train")
    run_dir = root / "run"
    cfg = tiny_config(root / "tiny.yaml", dataset=tiny_dataset, run_dir=run_dir, steps=STEPS,
                      checkpoint={"every_steps": 0})
    log = root / "train.out"
    jid = slurm_cluster.sbatch(
        TRAIN_SBATCH, str(cfg), "train.eval_every=100",
        options=(*_CPU_JOB, f"--output={log}"),
        env={"PYTHON": sys.executable, "LLMSCALE_DIR": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    info = slurm_cluster.wait_job(jid, ("COMPLETED", "FAILED", "CANCELLED"), timeout=180, log=log)
    return {"log": log.read_text(), "info": info, "run_dir": run_dir}


def test_train_sbatch_runs_two_ranks(uninterrupted_run):
    """srun starts 2 ranks (one per 'GPU' slot) on the CPU node; they train to the end."""
    text, info, run_dir = uninterrupted_run["log"], uninterrupted_run["info"], uninterrupted_run["run_dir"]
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", text
    assert "procs/node=2" in text and "accelerator=cpu" in text and "dp=2" in text, text
    assert "training step exited with code 0" in text, text
    steps = [r["step"] for r in _records(run_dir)]
    assert steps and steps[-1] == STEPS, steps
    assert [r["step"] for r in _records(run_dir, "val")] == [100, 200, 300]  # the override reached the trainer
    assert (run_dir / "final" / "model.pt").is_file()


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, tiny_dataset, tiny_config, uninterrupted_run,
                                                       tmp_path):
    """The early-warning signal of a preemption, sent the way --signal=B:USR1@300 sends it (to the batch
    shell only): the script forwards it, the ranks save at a step boundary and exit with the requeue
    code, the script runs `scontrol requeue`, and the second run resumes from that checkpoint and ends
    where the uninterrupted run ended."""
    from llmscale.checkpoint import list_checkpoints
    from llmscale.signals import EXIT_REQUEUE

    steps = STEPS
    run_dir = tmp_path / "run"
    cfg = tiny_config(tmp_path / "tiny.yaml", dataset=tiny_dataset, run_dir=run_dir, steps=steps,
                      checkpoint={"every_steps": 0})
    log = tmp_path / "train.out"
    jid = slurm_cluster.sbatch(
        TRAIN_SBATCH, str(cfg),
        options=(*_CPU_JOB, f"--output={log}"),
        env={"PYTHON": sys.executable, "LLMSCALE_DIR": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while not _records(run_dir):  # training is under way (the signal handlers are installed)
        info = slurm_cluster.job(jid)
        assert not _finished(info) and time.monotonic() < deadline, \
            f"training never started: {info.get('JobState')}\n{log.read_text() if log.exists() else ''}"
        time.sleep(0.2)
    slurm_cluster.cmd("scancel", "--batch", "--signal=USR1", str(jid))

    info = slurm_cluster.wait_job(jid, ("COMPLETED", "FAILED", "CANCELLED"), timeout=240, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert "got SIGUSR1" in text, text
    assert f"training step exited with code {EXIT_REQUEUE}" in text, text
    assert "requeueing job" in text and "restart 1] nodes=" in text, text  # a second run of the same job

    saved = [c.step for c in list_checkpoints(run_dir) if c.complete]
    assert saved and saved[-1] == steps, saved  # the end-of-run save
    preempt_step = saved[0]
    assert 0 < preempt_step < steps, saved  # the save made on the signal (every_steps=0: no periodic saves)
    resumed = [int(s) for s in re.findall(r"resumed at step (\d+)", text)]
    assert resumed == [preempt_step], text

    # metrics.jsonl is appended by both runs: the second continues where the first stopped.
    logged = [r["step"] for r in _records(run_dir)]
    assert logged == sorted(set(logged)) and logged[-1] == steps, logged
    assert any(s <= preempt_step for s in logged) and any(s > preempt_step for s in logged), logged

    # Exact resume: the interrupted-and-requeued run ends with the uninterrupted run's validation loss.
    val, ref = _records(run_dir, "val"), _records(uninterrupted_run["run_dir"], "val")
    assert val and ref and val[-1]["step"] == ref[-1]["step"] == steps
    assert val[-1]["val_loss"] == pytest.approx(ref[-1]["val_loss"], rel=1e-5), (val[-1], ref[-1])


def test_train_sbatch_refuses_misuse(tmp_path):
    """Outside a job, or without a config, the script says what to run instead (no cluster needed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run(["bash", str(TRAIN_SBATCH)], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "sbatch slurm/train.sbatch CONFIG.yaml" in p.stderr, p.stderr
    cfg = tmp_path / "x.yaml"
    cfg.write_text("train: {steps: 1}\n")
    p = subprocess.run(["bash", str(TRAIN_SBATCH), str(cfg)], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "not inside a SLURM job" in p.stderr, p.stderr
    p = subprocess.run(["bash", str(TRAIN_SBATCH), "missing.yaml"], env={**env, "SLURM_JOB_ID": "7"},
                       capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert p.returncode == 2 and "config missing.yaml not found" in p.stderr, p.stderr
