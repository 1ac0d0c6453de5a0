"""Several hosts on one machine: network namespaces joined by a bridge (tests/_slurm_cluster.py), each a host with
its own address, the filesystem shared as on a cluster.

* a real 2-node SLURM cluster (a slurmd per namespace): ``train.sbatch --nodes=2`` equal to the 1-node run with the
  same ranks; a dead node (its ranks SIGKILLed mid-run) ends the job in bounded time, naming the lost rank, and the
  job requeues and finishes with the uninterrupted run's weights; ``prepare.sbatch`` as an array of 3 tasks plus a
  merge equal to one ``prepare`` of the same inputs;
* no SLURM: two torchrun agents on two namespace hosts (``--nnodes 2``); one host's link is cut mid-run (nothing
  closes its connections: the others learn it only by silence) and the survivor exits 76 within
  ``train.peer_timeout_s``, naming the lost rank and its host;
* no SLURM: DeepSpeed's own launcher with a hostfile of the two hosts, each running an sshd of its own (pdsh/ssh,
  as on a cluster without a scheduler).

Needs root (namespaces, the daemons); for the cluster slurm-wlm + munge, for DeepSpeed's launcher pdsh +
openssh-server (CI installs them)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _slurm_cluster as SC  # noqa: E402

from llmscale.testing import cpu_env, metrics_records  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SBATCH = ROOT / "slurm" / "train.sbatch"
PREPARE_SBATCH = ROOT / "slurm" / "prepare.sbatch"
STEPS = 400
PEER_TIMEOUT = 15  # train.peer_timeout_s in these tests (default 120)


@pytest.fixture(scope="module")
def cluster2():
    reason = SC.missing_reason(netns=True)
    if reason:
        pytest.skip(reason)
    c = SC.start_cluster(nodes=2)
    try:
        yield c
    finally:
        c.stop()
        SC.remove_netns_nodes(c.nodes)
        import shutil

        shutil.rmtree(c.root, ignore_errors=True)


def _env() -> dict:
    return {"PYTHON": sys.executable, "LLMSCALE_DIR": str(ROOT), "OMP_NUM_THREADS": "1"}


def _corpus(corpus_path: Path, root: Path) -> Path:
    """7 files of unequal size (an array's parts are ranges of files)."""
    d = root / "corpus"
    d.mkdir()
    paras = corpus_path.read_text(encoding="utf-8").split("\n\n")
    for i in range(7):
        (d / f"f{i}.txt").write_text("\n\n".join(paras[i * 900:(i + 1) * 900 + 100 * i]), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def array_dataset(cluster2, corpus_path, tokenizer_dir, tmp_path_factory) -> dict:
    """prepare.sbatch as an array of 3 tasks (spread over both nodes) and the merge job after it; beside it, one
    prepare job of the same inputs. Returns both datasets and the jobs' wall times."""
    root = tmp_path_factory.mktemp("array")
    corpus = _corpus(corpus_path, root)
    args = ["--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--seq-len", "64", "--val-fraction", "0.05",
            "--doc-split", "paragraph", "--shard-tokens", "50000"]
    t0 = time.monotonic()
    arr = cluster2.sbatch(PREPARE_SBATCH, *args, "--output", str(root / "merged"),
                          options=("--array=0-2", "--cpus-per-task=1", "--mem=500M", f"--output={root}/arr-%a.out"),
                          env=_env())
    merge = cluster2.sbatch(PREPARE_SBATCH, "--merge", "--output", str(root / "merged"),
                            options=(f"--dependency=afterok:{arr}", "--cpus-per-task=1", "--mem=500M",
                                     f"--output={root}/merge.out"), env=_env())
    info = cluster2.wait_job(merge, ("COMPLETED", "FAILED", "CANCELLED"), timeout=300, log=root / "merge.out")
    t_array = time.monotonic() - t0
    logs = "\n".join(p.read_text() for p in sorted(root.glob("*.out")))
    assert info["JobState"] == "COMPLETED", logs
    t0 = time.monotonic()
    one = cluster2.sbatch(PREPARE_SBATCH, *args, "--output", str(root / "one"), "--num-proc", "1",
                          options=("--cpus-per-task=1", "--mem=500M", f"--output={root}/one.out"), env=_env())
    info = cluster2.wait_job(one, ("COMPLETED", "FAILED", "CANCELLED"), timeout=300, log=root / "one.out")
    t_one = time.monotonic() - t0
    assert info["JobState"] == "COMPLETED", (root / "one.out").read_text()
    return {"merged": root / "merged", "one": root / "one", "logs": logs, "t_array": t_array, "t_one": t_one}


@pytest.mark.slow
def test_prepare_array_of_3_and_merge_equal_one_prepare(array_dataset):
    from llmscale.data.shards import open_shard, read_manifest, verify_dataset

    logs = array_dataset["logs"]
    assert all(f"--part {i}/3" in logs for i in range(3)), logs
    assert "node1" in logs and "node2" in logs, logs  # the tasks ran on both hosts
    a, b = read_manifest(array_dataset["one"]), read_manifest(array_dataset["merged"])
    assert verify_dataset(b.root) == [] and b.data["merged_from"]["parts"] == 3
    for split in ("train", "val"):
        for k in ("num_documents", "num_tokens", "num_bytes"):
            assert a.data["splits"][split][k] == b.data["splits"][split][k], (split, k)
        docs = []
        for m in (a, b):
            rows = []
            for s in m.shards(split):
                v = open_shard(m.root / s.path)
                rows += [v.document(i).tobytes() for i in range(v.num_documents)]
            docs.append(rows)
        assert docs[0] == docs[1], split
    for k in ("documents_read", "documents_written", "documents_skipped", "files", "bytes_read"):
        assert a.data["stats"][k] == b.data["stats"][k], k
    print(f"\nprepare: array of 3 + merge {array_dataset['t_array']:.1f}s (submit to merged), one process "
          f"{array_dataset['t_one']:.1f}s (submit to done)")


def _train(cluster, dataset: Path, tiny_config, root: Path, name: str, *, nodes: int, extra=()) -> tuple[int, Path]:
    run_dir = root / name
    cfg = tiny_config(root / f"{name}.yaml", dataset=dataset, run_dir=run_dir, steps=STEPS,
                      checkpoint={"every_steps": 50})
    per_node = 2 // nodes
    jid = cluster.sbatch(TRAIN_SBATCH, str(cfg), f"train.peer_timeout_s={PEER_TIMEOUT}", "train.log_every=10",
                         options=(f"--nodes={nodes}", f"--ntasks-per-node={per_node}", "--gpus-per-node=0",
                                  "--cpus-per-task=1", f"--output={root}/{name}.out", *extra), env=_env())
    return jid, run_dir


@pytest.fixture(scope="module")
def two_node_run(cluster2, array_dataset, tiny_config, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("2node")
    jid, run_dir = _train(cluster2, array_dataset["merged"], tiny_config, root, "two", nodes=2)
    info = cluster2.wait_job(jid, ("COMPLETED", "FAILED", "CANCELLED"), timeout=400, log=root / "two.out")
    return {"info": info, "run_dir": run_dir, "log": (root / "two.out").read_text(), "jid": jid}


@pytest.mark.slow
def test_train_sbatch_on_two_nodes_equals_one_node_with_the_same_ranks(cluster2, array_dataset, two_node_run,
                                                                     tiny_config, tmp_path):
    import torch

    text = two_node_run["log"]
    assert two_node_run["info"]["JobState"] == "COMPLETED", text
    assert "nodes=node[1-2] (2) procs/node=1 master=10.201.0.11" in text, text
    jid, one = _train(cluster2, array_dataset["merged"], tiny_config, tmp_path, "one", nodes=1)
    info = cluster2.wait_job(jid, ("COMPLETED", "FAILED", "CANCELLED"), timeout=400, log=tmp_path / "one.out")
    assert info["JobState"] == "COMPLETED", (tmp_path / "one.out").read_text()
    a = {r["step"]: r["loss"] for r in metrics_records(two_node_run["run_dir"], "train")}
    b = {r["step"]: r["loss"] for r in metrics_records(one, "train")}
    assert sorted(a) == sorted(b) and a[STEPS] == pytest.approx(b[STEPS], rel=1e-6)
    wa = torch.load(two_node_run["run_dir"] / "final" / "model.pt", weights_only=True)
    wb = torch.load(one / "final" / "model.pt", weights_only=True)
    for k in wa:  # gloo sums two ranks over TCP or shared memory: the same two numbers, the same sum
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.slow
def test_dead_node_ends_the_job_in_bounded_time_and_the_requeued_job_resumes(cluster2, array_dataset, two_node_run,
                                                                            tiny_config, tmp_path):
    """node2's rank is SIGKILLed mid-run: the rank on node1 names rank 1 on node2 and exits 76 within
    train.peer_timeout_s (+ one heartbeat interval + the time to notice); the script requeues the job, which
    resumes from the newest checkpoint and ends with the uninterrupted 2-node run's weights."""
    import torch

    jid, run_dir = _train(cluster2, array_dataset["merged"], tiny_config, tmp_path, "dead", nodes=2)
    log = tmp_path / "dead.out"
    deadline = time.monotonic() + 180
    while not any(r["step"] >= 120 for r in metrics_records(run_dir, "train")):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.2)
    node2 = cluster2.nodes[1]
    victims = SC.pids_in(node2, needle="llmscale train")
    assert victims, "no rank found on node2"
    t_kill = time.time()
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    info = cluster2.wait_job(jid, ("COMPLETED", "FAILED", "CANCELLED"), timeout=600, log=log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert re.search(r"lost rank\(s\) 1 on node2 10\.201\.0\.12", text), text
    assert "requeueing job" in text and "after the lost rank" in text, text
    # the survivor's exit, by the script's clock (UTC HH:MM:SS): within the bound
    m = re.search(r"\[train\.sbatch (\d\d):(\d\d):(\d\d) job \d+ restart 0\] train step exited with code (\d+)",
                  text)
    assert m, text
    t = time.gmtime(t_kill)
    exited = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3))
    killed = t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec
    bound = PEER_TIMEOUT + 2 * max(PEER_TIMEOUT / 12, 0.5) + 5
    assert 0 <= (exited - killed) % 86400 <= bound, (exited - killed, bound)
    print(f"\ndead node -> every rank gone: {(exited - killed) % 86400}s (bound {bound:.0f}s)")
    resumed = [int(s) for s in re.findall(r"resumed at step (\d+)", text)]
    assert len(resumed) == 1 and resumed[0] >= 100 and resumed[0] % 50 == 0, text
    ref = torch.load(two_node_run["run_dir"] / "final" / "model.pt", weights_only=True)
    got = torch.load(run_dir / "final" / "model.pt", weights_only=True)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


# --------------------------------------------------------------------------- no SLURM: torchrun on two hosts


def _skip_without_netns() -> None:
    """Skip unless namespace hosts can be built here (root, iproute2, nsenter); SLURM itself is not needed."""
    reason = SC.missing_reason(netns=True) if os.geteuid() == 0 else "needs root (network namespaces)"
    if reason and ("network namespaces" in reason or "root" in reason or "nsenter" in reason):
        pytest.skip(reason)


@pytest.fixture(scope="module")
def netns_hosts():
    _skip_without_netns()
    nodes = SC.make_netns_nodes(2, "llmt", subnet=202)
    try:
        yield nodes
    finally:
        SC.remove_netns_nodes(nodes)


@pytest.mark.slow
def test_torchrun_on_two_hosts_one_cut_off_the_survivor_names_it_and_exits_76(netns_hosts, tiny_gpt_dataset,
                                                                            tiny_config, tmp_path):
    from llmscale.dist import EXIT_PEER_LOST

    run_dir = tmp_path / "run"
    cfg = tiny_config(tmp_path / "t.yaml", dataset=tiny_gpt_dataset, run_dir=run_dir, steps=100000,
                      checkpoint={"every_steps": 0})
    port = 29000 + os.getpid() % 1000
    procs = []
    for rank, node in enumerate(netns_hosts):
        cmd = [*node.prefix(), sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={rank}", f"--master-addr={netns_hosts[0].addr}", f"--master-port={port}",
               "-m", "llmscale", "train", str(cfg), f"train.peer_timeout_s={PEER_TIMEOUT}", "train.log_every=10"]
        out = open(tmp_path / f"host{rank + 1}.log", "wb")
        procs.append(subprocess.Popen(cmd, env=cpu_env(), stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    try:
        deadline = time.monotonic() + 180
        while not any(r["step"] >= 50 for r in metrics_records(run_dir, "train")):
            assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "host1.log").read_text()
            time.sleep(0.2)
        t_cut = time.monotonic()
        SC.cut_off(netns_hosts[1])  # host 2 vanishes from the network; its processes live on
        rc = procs[0].wait(timeout=PEER_TIMEOUT + 120)
        took = time.monotonic() - t_cut
        text = (tmp_path / "host1.log").read_text(errors="replace")
        assert rc != 0, text
        assert re.search(r"rank 0: lost rank\(s\) 1 on \S+ 10\.202\.0\.12: no heartbeat", text), text
        assert f"exiting with code {EXIT_PEER_LOST}" in text, text
        assert took <= PEER_TIMEOUT + 2 * max(PEER_TIMEOUT / 12, 0.5) + 30, took
        print(f"\nnetns torchrun: host cut off -> survivor's launcher exited in {took:.1f}s")
        # the cut-off host's rank lost the store (rank 0's host): it ends itself too, in the same bound
        log2 = tmp_path / "host2.log"
        deadline = time.monotonic() + PEER_TIMEOUT + 60
        while "has not answered" not in log2.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.5)
        text2 = log2.read_text(errors="replace")
        assert "rendezvous store" in text2 and "has not answered" in text2, text2[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        for node in netns_hosts:  # the ranks: torchrun starts each in a session of its own
            for pid in SC.pids_in(node, needle="llmscale"):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- no SLURM: DeepSpeed's launcher, pdsh/ssh


@pytest.fixture(scope="module")
def ssh_hosts(tmp_path_factory):
    """Two namespace hosts, each with its own sshd (passwordless root ssh with a key made here)."""
    import shutil

    _skip_without_netns()
    missing = [b for b in SC.SSH_BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"DeepSpeed's multi-node launcher needs {', '.join(missing)} "
                    "(install as root: apt-get install pdsh openssh-server openssh-client)")
    nodes = SC.make_netns_nodes(2, "llmp", subnet=203)
    hosts = None
    try:
        try:
            hosts = SC.start_sshd(nodes, tmp_path_factory.mktemp("ssh"))
        except (RuntimeError, subprocess.CalledProcessError) as e:  # the machine's sshd, not llmscale
            pytest.skip(f"could not start sshd on the namespace hosts: {e}")
        yield hosts
    finally:
        if hosts is not None:
            hosts.stop()
        SC.remove_netns_nodes(nodes)


@pytest.mark.slow
def test_deepspeed_launcher_with_a_hostfile_trains_across_two_hosts(ssh_hosts, tiny_gpt_dataset, tiny_config,
                                                                   tmp_path):
    """`deepspeed --hostfile H --module llmscale train CONFIG` as on a cluster without SLURM: DeepSpeed's runner
    checks ssh, asks the first host for its address (`hostname -I`), and starts one launcher per host through
    pdsh/ssh; the variables a user's `.deepspeed_env` lists reach the remote ranks. One rank per host, gloo between
    the namespaces, a shared run directory: trains to the end, and the loss equals torchrun's 2 ranks on one
    host."""
    from llmscale.dist import free_port

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{n.addr} slots=1\n" for n in ssh_hosts.nodes))
    (tmp_path / ".deepspeed_env").write_text("DS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\n")
    run_dir = tmp_path / "run"
    cfg = tiny_config(tmp_path / "tiny.yaml", dataset=tiny_gpt_dataset, run_dir=run_dir, steps=6)
    launcher = Path(sys.executable).parent / "deepspeed"
    env = cpu_env({"PATH": f"{ssh_hosts.bin_dir}:{os.environ['PATH']}"})
    p = subprocess.run([str(launcher), "--hostfile", str(hostfile), "--master_port", str(free_port()), "--module",
                        "llmscale", "train", str(cfg), "train.log_every=2"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    a, b = (re.escape(n.addr) for n in ssh_hosts.nodes)
    assert re.search(rf"Using IP address of {a} for node {a}", out), out[-3000:]
    assert "export DS_ACCELERATOR=cpu; export OMP_NUM_THREADS=1;" in out, out[-3000:]  # from .deepspeed_env
    # pdsh prefixes each line with the host it came from: rank 0 ran on host 1, rank 1 on host 2
    assert re.search(rf"^{a}: .* r0 INFO\] .*dp=2", out, re.M), out[-3000:]
    for host, rank in ((a, 0), (b, 1)):  # each host's launcher started its one rank and saw it succeed
        assert re.search(rf"^{host}: .*nnodes=2, num_local_procs=1, node_rank={rank}$", out, re.M), out[-3000:]
        assert re.search(rf"^{host}: .*Process \d+ exits successfully", out, re.M), out[-3000:]
    got = [(r["step"], r["loss"]) for r in metrics_records(run_dir, "train")]
    assert [s for s, _ in got] == [2, 4, 6], got

    ref_dir = tmp_path / "ref"
    ref_cfg = tiny_config(tmp_path / "ref.yaml", dataset=tiny_gpt_dataset, run_dir=ref_dir, steps=6)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        f"--master-port={free_port()}", "-m", "llmscale", "train", str(ref_cfg), "train.log_every=2"],
                       env=cpu_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    ref = [(s["step"], s["loss"]) for s in metrics_records(ref_dir, "train")]
    assert [s for s, _ in ref] == [2, 4, 6], ref
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in ref], rel=1e-6), (got, ref)
