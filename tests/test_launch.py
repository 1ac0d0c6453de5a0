"""Workstation launchers (launch/torchrun.sh, launch/accelerate.sh + accelerate/multi_gpu.yaml) run real
2-process jobs, and llmscale.dist.discover_world reads every launcher's environment layout."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmscale.dist import World, _first_host, discover_world
from llmscale.testing import cpu_env, metrics_records

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- discover_world layouts


def test_torchrun_single_node():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29611"}
    assert discover_world(env) == World(rank=1, world_size=2, local_rank=1, local_world_size=2, node_rank=0,
                                        master_addr="127.0.0.1", master_port=29611)


def test_torchrun_second_node_of_two():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}
    w = discover_world(env)
    assert (w.rank, w.world_size, w.local_rank, w.local_world_size, w.node_rank) == (5, 8, 1, 4, 1)
    assert (w.master_addr, w.master_port) == ("10.0.0.1", 29500)
    assert w.distributed and not w.is_main


def test_accelerate_layout():
    # What `accelerate launch` (MULTI_GPU, via torch.distributed.run) puts into each rank's environment.
    env = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO", "RANK": "0",
           "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0", "ROLE_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "41235", "TORCHELASTIC_RUN_ID": "none"}
    w = discover_world(env)
    assert w == World(rank=0, world_size=2, local_rank=0, local_world_size=2, node_rank=0,
                      master_addr="127.0.0.1", master_port=41235)
    assert w.is_main


def test_slurm_task_per_gpu_layout():
    # srun --nodes=2 --ntasks-per-node=4: task 6 is the 3rd task on the 2nd node.
    env = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-a[07-08]", "MASTER_ADDR": "gpu-a07",
           "MASTER_PORT": "23456", "SLURM_JOB_ID": "3456"}
    assert discover_world(env) == World(rank=6, world_size=8, local_rank=2, local_world_size=4, node_rank=1,
                                        master_addr="gpu-a07", master_port=23456)


def test_torchrun_inside_slurm_prefers_torchrun_ranks():
    # torchrun per node inside an sbatch: SLURM_PROCID is the node's task (0), RANK is the real rank.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODEID": "1", "SLURM_NNODES": "2",
           "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
           "MASTER_ADDR": "n1", "MASTER_PORT": "29400"}
    w = discover_world(env)
    assert (w.rank, w.world_size, w.node_rank) == (3, 4, 1)


def test_slurm_master_from_nodelist_without_scontrol(monkeypatch, tmp_path):
    # No MASTER_ADDR and no scontrol on PATH: the fallback parser picks the first host of the list.
    monkeypatch.setenv("PATH", str(tmp_path))
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "node[01-04]"}
    w = discover_world(env)
    assert (w.master_addr, w.local_world_size, w.master_port) == ("node01", 4, 29500)


NODELISTS = {
    "node[01-04]": "node01",
    "node[001-004],login1": "node001",
    "a[7,2-3]": "a7",
    "gpu-a[3,5-7],gpu-b1": "gpu-a3",
    "h-1,h-2": "h-1",
    "rack[1-2]n[07,03],login1": "rack1n07",
    "single": "single",
}


@pytest.mark.parametrize("nodelist", sorted(NODELISTS))
def test_first_host_fallback_parser(nodelist, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # force the fallback
    assert _first_host(nodelist) == NODELISTS[nodelist]


def test_first_host_fallback_agrees_with_scontrol(monkeypatch, tmp_path):
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol not installed (apt-get install slurm-client) to compare the fallback with")
    # `scontrol show hostnames` only parses; a two-line slurm.conf is enough configuration for it.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=check\nSlurmctldHost=localhost\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    for nodelist, first in NODELISTS.items():
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[0] == first, nodelist
        assert _first_host(nodelist) == first


# --------------------------------------------------------------------------- real launches

_PROBE = textwrap.dedent("""\
    import sys, torch, torch.distributed as dist
    from llmscale.dist import discover_world, init_distributed, shutdown
    world = discover_world()
    init_distributed(world, backend="gloo")
    t = torch.tensor([float(world.rank + 1)])
    dist.all_reduce(t)
    # One write per line: print() writes text and newline separately, and the ranks share a pipe.
    sys.stdout.write(f"PROBE rank={world.rank} world_size={world.world_size} local_rank={world.local_rank} "
                     f"local_world_size={world.local_world_size} node_rank={world.node_rank} sum={t.item()}\\n")
    sys.stdout.flush()
    shutdown()
    """)


def _check_probe(out: str) -> None:
    # Non-greedy up to the number that ends a record, so records are found even if interleaved.
    lines = sorted(re.findall(r"PROBE rank=.*?sum=\d+\.\d+", out))
    assert len(lines) == 2, out
    for r, line in enumerate(lines):
        assert line == (f"PROBE rank={r} world_size=2 local_rank={r} local_world_size=2 node_rank=0 sum=3.0"), line


def test_accelerate_config_launches_two_ranks(tmp_path):
    """accelerate launch with launch/accelerate/multi_gpu.yaml gives ranks that discover_world understands."""
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    p = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "launch" / "accelerate" / "multi_gpu.yaml"), str(script)],
        env=cpu_env(), capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    _check_probe(p.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun.sh", "accelerate.sh"])
def test_launcher_trains_two_ranks(launcher, tiny_gpt_dataset, tiny_config, tmp_path):
    """The launcher as a user runs it: NPROC=2 ranks train a tiny GPT to the end on gloo/CPU."""
    run_dir = tmp_path / "run"
    cfg = tiny_config(tmp_path / "tiny.yaml", dataset=tiny_gpt_dataset, run_dir=run_dir, steps=10)
    p = subprocess.run(
        ["bash", str(ROOT / "launch" / launcher), str(cfg), "train.log_every=2"],
        env=cpu_env({"NPROC": "2", "PYTHON": sys.executable}), capture_output=True, text=True, timeout=300,
        cwd=tmp_path,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-8000:]
    assert "dp=2" in out, out[-4000:]  # two data-parallel ranks
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("kind") == "train"]
    assert steps == [2, 4, 6, 8, 10], steps  # the override reached the trainer
    assert (run_dir / "final" / "model.pt").is_file()


def _wait_for(pred, timeout: float, what: str, proc=None):
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the launcher exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.parametrize("launcher,target", [("torchrun.sh", "rank1"), ("accelerate.sh", "launcher")])
def test_launcher_preemption_exits_75_and_resumes(launcher, target, tiny_gpt_dataset, tiny_config, tmp_path):
    """Preemption through the real launcher, as a new user meets it: SIGUSR1 to rank 1 (or to the launcher
    script) -> every rank saves -> the launcher exits 75 (not torchrun's 1), RUN_DIR/PREEMPTED says so; the same
    command again resumes from that checkpoint and finishes."""
    import signal

    import psutil

    run_dir = tmp_path / "run"
    cfg = tiny_config(tmp_path / "tiny.yaml", dataset=tiny_gpt_dataset, run_dir=run_dir, steps=300,
                      checkpoint={"every_steps": 0})
    cmd = ["bash", str(ROOT / "launch" / launcher), str(cfg), "train.log_every=1"]
    env = cpu_env({"NPROC": "2", "PYTHON": sys.executable})
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                         start_new_session=True)
    try:
        _wait_for(lambda: len(metrics_records(run_dir, "train")) >= 3, 240, "training to start", p)
        if target == "launcher":
            p.send_signal(signal.SIGUSR1)
        else:
            ranks = [c for c in psutil.Process(p.pid).children(recursive=True)
                     if "llmscale" in " ".join(c.cmdline()) and c.environ().get("RANK") == "1"]
            assert len(ranks) == 1, [c.cmdline() for c in psutil.Process(p.pid).children(recursive=True)]
            ranks[0].send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=240)
    finally:
        if p.poll() is None:  # stop what this test started, by pid: the launcher and every process under it
            for c in psutil.Process(p.pid).children(recursive=True):
                c.kill()
            p.kill()
    assert p.returncode == 75, out[-8000:]
    marker = json.loads((run_dir / "PREEMPTED").read_text())
    step = marker["step"]
    assert 3 <= step < 300 and marker["exit_code"] == 75
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{step:06d}"  # saved at that step
    assert "exit 75" in out
    if target == "launcher":
        return
    # the same command again: resumes at the saved step, clears the marker, finishes with 0
    q = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert q.returncode == 0, (q.stdout + q.stderr)[-8000:]
    assert f"resumed at step {step}" in q.stdout + q.stderr
    assert not (run_dir / "PREEMPTED").exists()
    assert metrics_records(run_dir, "train")[-1]["step"] == 300


def test_launcher_without_config_explains_usage():
    p = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh")], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "launch/torchrun.sh CONFIG" in p.stdout


# --------------------------------------------------------------------------- two "hosts" on one machine


@pytest.fixture
def two_hosts():
    """Two network namespaces on a bridge (tests/_slurm_cluster.make_netns_nodes): host a = 10.231.0.11, host b =
    10.231.0.12. Only these private namespaces and their bridge get addresses; the machine's own network is
    untouched. Yields [(namespace, address, interface), ...]."""
    sys.path.insert(0, str(Path(__file__).parent))
    import _slurm_cluster as SC

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (`ip netns`) to build two network namespaces")
    first = subprocess.run(["ip", "netns", "add", f"llmcprobe{os.getpid()}"], capture_output=True, text=True)
    if first.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {first.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", f"llmcprobe{os.getpid()}"], capture_output=True)
    nodes = SC.make_netns_nodes(2, "llmc", subnet=231)
    try:
        yield [(n.netns, n.addr, f"llmcv{i + 1}") for i, n in enumerate(nodes)]
    finally:
        SC.remove_netns_nodes(nodes)


@pytest.mark.slow
def test_torchrun_two_nodes_in_network_namespaces(two_hosts, tiny_gpt_dataset, tiny_config, tmp_path):
    """torchrun --nnodes 2 with a c10d rendezvous on host a's address: one rank per "host", gloo over
    the veth link, a shared run directory (as on a cluster file system), trains to the end."""
    run_dir = tmp_path / "run"
    cfg = tiny_config(tmp_path / "tiny.yaml", dataset=tiny_gpt_dataset, run_dir=run_dir, steps=10)
    endpoint = f"{two_hosts[0][1]}:29400"
    procs = []
    for node, (ns, addr, iface) in enumerate(two_hosts):
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "netns",
               # the store host cannot recognise a namespace address as its own: say so; --local-addr makes
               # MASTER_ADDR an address the other namespace can reach (not the shared hostname).
               "--rdzv-conf", f"is_host={'true' if node == 0 else 'false'}", "--local-addr", addr,
               "-m", "llmscale", "train", str(cfg), "train.log_every=2"]
        procs.append(subprocess.Popen(cmd, env=cpu_env({"GLOO_SOCKET_IFNAME": iface}), cwd=tmp_path,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for node, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {node} exited {p.returncode}:\n{out[-6000:]}"
    assert "dp=2" in outs[0], outs[0][-4000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("kind") == "train"]
    assert steps == [2, 4, 6, 8, 10], steps
    assert (run_dir / "final" / "model.pt").is_file()


# --------------------------------------------------------------------------- DeepSpeed's own launcher


def test_local_rank_argument_of_the_deepspeed_launcher_is_taken_out(monkeypatch):
    from llmscale.cli import _take_local_rank

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert _take_local_rank(["--local_rank=1", "train", "c.yaml"]) == ["train", "c.yaml"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert _take_local_rank(["--local-rank", "1", "train"]) == ["train"]
    with pytest.raises(SystemExit, match="--local_rank=0 but LOCAL_RANK=1"):
        _take_local_rank(["--local_rank=0", "train"])


@pytest.mark.slow
def test_deepspeed_launcher_trains_two_ranks(tiny_gpt_dataset, tiny_config, tmp_path):
    """`deepspeed --num_gpus 2 --module llmscale train CONFIG` on the CPU: the launcher's --local_rank and its
    RANK/WORLD_SIZE/MASTER_* variables give two data-parallel ranks that train to the end. (Several nodes with a
    hostfile, through pdsh/ssh: tests/test_multinode.py.)"""
    from llmscale.dist import free_port

    run_dir = tmp_path / "run"
    cfg = tiny_config(tmp_path / "tiny.yaml", dataset=tiny_gpt_dataset, run_dir=run_dir, steps=4)
    launcher = Path(sys.executable).parent / "deepspeed"
    p = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "llmscale",
                        "train", str(cfg), "train.log_every=2"],
                       env=cpu_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    assert "dp=2" in out, out[-3000:]
    assert [r["step"] for r in metrics_records(run_dir, "train")] == [2, 4]
