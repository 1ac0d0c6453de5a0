"""A real one-node SLURM cluster (munged + slurmctld + slurmd from Debian's slurm-wlm, tests/_slurm_cluster.py)
built in a temporary folder, and real jobs submitted to it with sbatch/srun: the distributed rank discovery under
srun, slurm/train.sbatch end to end, and preemption -> checkpoint -> `scontrol requeue` -> resume.

The cluster: NodeName=localhost (CPUs=2) in one partition. Needs root (the daemons run as SlurmUser=root) and the
binaries; CI installs them (`apt-get install slurm-wlm munge`, see .ci/run).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llmscale.testing import metrics_records

sys.path.insert(0, str(Path(__file__).parent))
import _slurm_cluster as SC  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SBATCH = ROOT / "slurm" / "train.sbatch"

pytestmark = pytest.mark.slurm

@pytest.fixture(scope="module")
def slurm_cluster():
    reason = SC.missing_reason()
    if reason:
        pytest.skip(reason)
    cluster = SC.start_cluster(nodes=1)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


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
    assert "train step exited with code 0" in text, text
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
    assert f"train step exited with code {EXIT_REQUEUE}" in text, text
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


# --------------------------------------------------------------------------- the whole pipeline, chained


def _job_times(cluster, jid: int) -> tuple[str, str]:
    info = cluster.job(jid)
    return info["StartTime"], info["EndTime"]


@pytest.mark.slow
def test_pipeline_prepare_train_finetune_eval_chained_and_rerun_skips(slurm_cluster, corpus_path, tiny_config,
                                                                     tmp_path):
    """slurm/pipeline.sh submits prepare -> pretrain -> fine-tune (SFT) -> eval as jobs chained with afterok; the
    eval job writes results.json. Submitted again, every stage finds its done-marker and runs nothing."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_path.read_text(encoding="utf-8")[:150_000], encoding="utf-8")
    ds, pre, ft, ev = tmp_path / "ds", tmp_path / "pre", tmp_path / "ft", tmp_path / "eval"
    train_cfg = tiny_config(tmp_path / "tiny.yaml", dataset=ds, run_dir=pre, steps=20, checkpoint={"every_steps": 10})
    eval_cfg = tmp_path / "eval.yaml"
    eval_cfg.write_text(textwrap.dedent(f"""\
        model: {ft}
        output_dir: {ev}
        tasks: [perplexity]
        batch_size: 4
        perplexity: {{files: [{corpus}], context: 64, stride: 64}}
        """))
    cpu = " ".join(_CPU_JOB)
    env = {**slurm_cluster.env, "PYTHON": sys.executable, "LLMSCALE_DIR": str(ROOT), "OMP_NUM_THREADS": "1",
           "NAME": f"t{os.getpid()}", "SBATCH_OPTS": f"--output={tmp_path}/%x-%j.out",
           "PREPARE_ARGS": f"--input {corpus} --output {ds} --vocab-size 400 --seq-len 64 --val-fraction 0.05 "
                           f"--doc-split paragraph",
           "PREPARE_OPTS": "--cpus-per-task=1 --mem=500M",
           "TRAIN_CONFIG": str(train_cfg), "TRAIN_OPTS": cpu,
           "FINETUNE_CONFIG": str(ROOT / "configs" / "finetune_sft_gpt.yaml"), "FINETUNE_OPTS": cpu,
           "FINETUNE_ARGS": f"init.from={pre} run_dir={ft} train.steps=6 train.eval_every=6 train.log_every=2 "
                            f"sft.max_len=64 parallel.micro_batch_size=4 parallel.global_batch_size=8 "
                            f"checkpoint.every_steps=0 train.tensorboard=false",
           "EVAL_CONFIG": str(eval_cfg), "EVAL_OPTS": cpu}
    marks = ROOT / ".llmscale-jobs" / env["NAME"]
    try:
        out = subprocess.run(["bash", str(ROOT / "slurm" / "pipeline.sh")], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        ids = dict(kv.split("=") for kv in out.stdout.split())
        assert list(ids) == ["prepare", "train", "finetune", "eval"], out.stdout
        logs = lambda: "\n".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("*.out")))  # noqa: E731
        info = slurm_cluster.wait_job(int(ids["eval"]), ("COMPLETED", "FAILED", "CANCELLED"), timeout=600)
        assert info["JobState"] == "COMPLETED", logs()
        for a, b in (("prepare", "train"), ("train", "finetune"), ("finetune", "eval")):
            assert _job_times(slurm_cluster, int(ids[b]))[0] >= _job_times(slurm_cluster, int(ids[a]))[1], (a, b)
        res = json.loads((ev / "results.json").read_text())["tasks"]["perplexity"]
        assert res["tokens"] > 0 and res["perplexity"] > 1, res
        assert (ds / "manifest.json").is_file() and (ft / "final" / "model.pt").is_file()
        assert sorted(p.name for p in marks.iterdir()) == ["eval.done", "finetune.done", "prepare.done", "train.done"]
        # the same pipeline again: every stage is done already, none runs its work
        before = (ev / "results.json").stat().st_mtime_ns
        again = subprocess.run(["bash", str(ROOT / "slurm" / "pipeline.sh")], env=env, capture_output=True,
                               text=True, timeout=120)
        ids2 = dict(kv.split("=") for kv in again.stdout.split())
        assert slurm_cluster.wait_job(int(ids2["eval"]), ("COMPLETED", "FAILED", "CANCELLED"),
                                      timeout=300)["JobState"] == "COMPLETED", logs()
        for stage, jid in ids2.items():
            text = next(tmp_path.glob(f"*-{jid}.out")).read_text()
            assert "already done" in text and "llmscale" in text, (stage, text)
        assert (ev / "results.json").stat().st_mtime_ns == before
    finally:
        shutil.rmtree(marks, ignore_errors=True)


# --------------------------------------------------------------------------- a time limit that really expires


# About 2 minutes of training on one CPU per rank (0.015 s a step): longer than the first run can last. SLURM
# checks time limits about every 30 s, so the warning (--time=2, @60) comes 60-90 s into a run; a job shorter
# than that finished unwarned in one CI run (2,500 steps) and the test failed. On a slower machine the job is
# simply warned and requeued more often.
TL_STEPS = 8000


@pytest.mark.slow
def test_real_time_limit_warns_checkpoints_requeues_and_ends_like_an_uninterrupted_run(
        slurm_cluster, tiny_dataset, tiny_config, tmp_path):
    """Submitted with --time=2 and --signal=B:USR1@60, the job really runs out of time: SLURM's own warning (not
    scancel) reaches the script, the ranks checkpoint and exit 75, the job requeues (as often as needed) and ends
    with the final weights of the same run submitted without a time limit. No step is trained twice."""
    import torch

    from llmscale.signals import EXIT_REQUEUE

    runs = {}
    for name, opts in (("ref", ()), ("limited", ("--time=2", "--signal=B:USR1@60"))):
        run_dir = tmp_path / name
        cfg = tiny_config(tmp_path / f"{name}.yaml", dataset=tiny_dataset, run_dir=run_dir, steps=TL_STEPS,
                          checkpoint={"every_steps": 0})
        log = tmp_path / f"{name}.out"
        jid = slurm_cluster.sbatch(TRAIN_SBATCH, str(cfg), "train.log_every=50", "train.eval_every=0",
                                   options=(*_CPU_JOB, *opts, f"--output={log}"),
                                   env={"PYTHON": sys.executable, "LLMSCALE_DIR": str(ROOT), "OMP_NUM_THREADS": "1"})
        runs[name] = (jid, run_dir, log)
        if name == "ref":  # one at a time: both want the node's two CPUs
            info = slurm_cluster.wait_job(jid, ("COMPLETED", "FAILED", "CANCELLED"), timeout=900, log=log)
            submitted = time.mktime(time.strptime(info["SubmitTime"], "%Y-%m-%dT%H:%M:%S"))
            first = _records(run_dir)[0]
            print(f"\nsbatch -> first logged training step ({first['step']}): {first['time'] - submitted:.1f}s")
    jid, run_dir, log = runs["limited"]
    info = slurm_cluster.wait_job(jid, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=1500, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, text
    assert "got SIGUSR1" in text and f"train step exited with code {EXIT_REQUEUE}" in text, text
    assert "TIME LIMIT" not in text.upper().replace("TIMELIMIT", ""), text  # the warning came in time, every time
    logged = [r["step"] for r in _records(run_dir)]
    assert logged == sorted(set(logged)) and logged[-1] == TL_STEPS, logged  # no step logged twice: 0 lost
    clock = r"\[train\.sbatch (\d\d):(\d\d):(\d\d) job \d+ restart {}\] {}"
    warn = re.search(clock.format(0, "got SIGUSR1"), text)
    again = re.search(clock.format(1, "nodes="), text)
    if warn and again:
        secs = [int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3)) for m in (warn, again)]
        print(f"\ntime-limit warning -> job running again: {(secs[1] - secs[0]) % 86400}s; restarts "
              f"{info['Restarts']}; steps trained twice: 0")
    ref = torch.load(runs["ref"][1] / "final" / "model.pt", weights_only=True)
    got = torch.load(run_dir / "final" / "model.pt", weights_only=True)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
