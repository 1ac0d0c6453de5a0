"""A real SLURM cluster for the tests, built in a temporary folder: munged + slurmctld + one slurmd per node from
Debian's slurm-wlm (22.05+). Imported by tests/test_slurm*.py.

* one node (:func:`start_cluster` with ``nodes=1``): NodeName=localhost on 127.0.0.1;
* several nodes (``nodes=2``): every slurmd runs in a network namespace of its own (``ip netns``), joined to
  the host by a veth pair on a bridge, so each node is a host with its own address (10.201.0.11, .12, ...)
  reached over the network, as on a cluster: slurmctld on the bridge address, the ranks of a job on two
  nodes talk over TCP between the namespaces, and a node can be cut off (its link taken down) or have its
  processes killed. The filesystem is shared (like a cluster's shared /home), so the munge socket, the
  configuration and the run directories are the same paths everywhere.

Every state/spool/log/pid path and both ports are private to the cluster; SLURM_CONF points at the generated
slurm.conf (given to every client command and inherited by the jobs). Needs root (the daemons run as
SlurmUser=root, namespaces need CAP_NET_ADMIN) and the binaries (``apt-get install slurm-wlm munge``).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
BRIDGE_ADDR = "10.201.0.1"  # the SLURM cluster's bridge (tag "llms"): slurmctld listens here


def missing_reason(*, netns: bool = False) -> Optional[str]:
    """Why a cluster cannot start here (None when it can)."""
    missing = [b for b in BINARIES + (("ip", "nsenter") if netns else ()) if shutil.which(b) is None]
    if missing:
        return (f"SLURM test cluster needs {', '.join(missing)} (install as root: "
                f"apt-get install slurm-wlm munge{' iproute2' if netns else ''})")
    if os.geteuid() != 0:
        return "SLURM test cluster needs root (slurmd launches jobs as SlurmUser=root)"
    if netns:
        probe = f"llmsprobe{os.getpid()}"
        p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if p.returncode != 0:
            return f"network namespaces unavailable here ({p.stderr.strip()}): the 2-node cluster needs them"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    addr: str
    netns: Optional[str] = None  # None: the host's own network

    def prefix(self) -> list[str]:
        """Run a command on this node: inside its network namespace only (``ip netns exec`` would also remount
        /sys, hiding the cgroup filesystem slurmd needs)."""
        return ["nsenter", f"--net=/var/run/netns/{self.netns}"] if self.netns else []


@dataclass
class SlurmCluster:
    root: Path
    env: dict
    nodes: list[Node]
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
        for f in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {f.name} ---\n{f.read_text(errors='replace')[-tail:]}")
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
        for name in [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def slurm_conf(root: Path, *, nodes: list[Node], ctld_name: str, ctld_addr: str, ctld_port: int, slurmd_port: int,
               cpus: int = 2) -> str:
    # Kept as small as Slurm 22.05/23.x allow: no cgroups (proctrack/linuxproc, task/none), no
    # accounting; the node's CPUs/memory are taken as configured (config_overrides) so the test does
    # not depend on the machine's size. cred_expire also sets how long a requeued job waits before it
    # may start again (default 120 s); the scheduler runs every second instead of every minute.
    node_lines = "\n".join(f"NodeName={n.name} NodeAddr={n.addr} CPUs={cpus} RealMemory=4000 State=UNKNOWN"
                           for n in nodes)
    return textwrap.dedent(f"""\
        ClusterName=llmscaletest
        SlurmctldHost={ctld_name}({ctld_addr})
        SlurmctldPort={ctld_port}
        SlurmdPort={slurmd_port}
        SlurmUser=root
        SlurmdUser=root
        AuthType=auth/munge
        CredType=cred/munge
        AuthInfo=socket={root}/munge/munge.sock,cred_expire=5
        StateSaveLocation={root}/state
        SlurmdSpoolDir={root}/spool/%n
        SlurmctldPidFile={root}/run/slurmctld.pid
        SlurmdPidFile={root}/run/slurmd-%n.pid
        SlurmctldLogFile={root}/log/slurmctld.log
        SlurmdLogFile={root}/log/slurmd-%n.log
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
        SlurmdTimeout=30
        {node_lines}
        PartitionName=debug Nodes={','.join(n.name for n in nodes)} Default=YES MaxTime=INFINITE State=UP
        """)


def _start(cluster: SlurmCluster, name: str, args: list[str]) -> None:
    out = open(cluster.root / "log" / f"{name}.out", "w")
    cluster.procs[name] = subprocess.Popen(args, env=cluster.env, stdout=out, stderr=subprocess.STDOUT)


def _ip(*args: str) -> None:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {p.stderr.strip()}")


def make_netns_nodes(count: int, tag: str, *, subnet: int = 201) -> list[Node]:
    """``count`` network namespaces on a bridge ``{tag}br0``: node i (1-based) at 10.{subnet}.0.(10+i), the host
    at 10.{subnet}.0.1. Different tags/subnets coexist (a SLURM cluster and a bare torchrun pair)."""
    bridge, host_addr = f"{tag}br0", f"10.{subnet}.0.1"
    subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    _ip("link", "add", bridge, "type", "bridge")
    _ip("addr", "add", f"{host_addr}/24", "dev", bridge)
    _ip("link", "set", bridge, "up")
    nodes = []
    for i in range(1, count + 1):
        ns, host_if, node_if = f"{tag}n{i}", f"{tag}h{i}", f"{tag}v{i}"
        addr = f"10.{subnet}.0.{10 + i}"
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)  # left by a run that was killed
        _ip("netns", "add", ns)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", node_if)
        _ip("link", "set", node_if, "netns", ns)
        _ip("link", "set", host_if, "master", bridge)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", node_if)
        _ip("-n", ns, "link", "set", node_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", "default", "via", host_addr)
        nodes.append(Node(name=f"node{i}", addr=addr, netns=ns))
    return nodes


def remove_netns_nodes(nodes: list[Node]) -> None:
    """Kill what still runs in the namespaces (by pid: processes of the tests only; torchrun's workers live in
    sessions of their own and outlive their launcher's process group), then remove them and their bridge."""
    bridges = set()
    for n in nodes:
        if n.netns:
            pids = subprocess.run(["ip", "netns", "pids", n.netns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", n.netns], capture_output=True)
            bridges.add(n.netns.rsplit("n", 1)[0] + "br0")
    for b in bridges:
        subprocess.run(["ip", "link", "del", b], capture_output=True)


def pids_in(node: Node, *, needle: str) -> list[int]:
    """Processes of a node (its network namespace) whose command line contains ``needle``."""
    out = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True).stdout.split()
    found = []
    for pid in out:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            found.append(int(pid))
    return found


def cut_off(node: Node) -> None:
    """Take a node's link down: its processes live on, but nothing reaches them (a dead host, as the network
    sees it)."""
    assert node.netns
    ifs = subprocess.run(["ip", "-n", node.netns, "-o", "link"], capture_output=True, text=True).stdout
    for line in ifs.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name != "lo":
            _ip("-n", node.netns, "link", "set", name, "down")


SSH_BINARIES = ("sshd", "ssh", "ssh-keygen", "pdsh")


@dataclass
class SshHosts:
    """sshd on each node (its namespace), reached with one key: ``bin_dir`` holds an ``ssh`` that uses this
    setup's client configuration, to be put first on PATH (what a user's ~/.ssh/config does for them)."""
    nodes: list[Node]
    root: Path
    bin_dir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def start_sshd(nodes: list[Node], root: Path) -> SshHosts:
    """Passwordless root ssh to every node (namespace hosts): a host key and a client key made here, one
    ``sshd -D`` per node listening on the node's address only; nothing of the machine's ssh setup is read or
    changed (the client runs with ``-F`` this setup's config). Returns once every sshd accepts connections."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    shutil.copy(root / "id.pub", root / "authorized_keys")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    hosts = SshHosts(nodes=nodes, root=root, bin_dir=root / "bin")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    try:
        for n in nodes:
            cfg = root / f"sshd-{n.name}.conf"
            cfg.write_text(textwrap.dedent(f"""\
                ListenAddress {n.addr}
                Port 22
                HostKey {root / "host_key"}
                PidFile {root / f"sshd-{n.name}.pid"}
                AuthorizedKeysFile {root / "authorized_keys"}
                PermitRootLogin prohibit-password
                PasswordAuthentication no
                KbdInteractiveAuthentication no
                UsePAM no
                StrictModes no
                """))
            with open(root / f"sshd-{n.name}.log", "wb") as log:
                hosts.procs.append(subprocess.Popen([*n.prefix(), sshd, "-D", "-e", "-f", str(cfg)],
                                                    stdout=subprocess.DEVNULL, stderr=log))
        (root / "ssh_config").write_text(textwrap.dedent(f"""\
            Host {" ".join(n.addr for n in nodes)}
                User root
                IdentityFile {root / "id"}
                IdentitiesOnly yes
                StrictHostKeyChecking no
                UserKnownHostsFile /dev/null
                LogLevel ERROR
                BatchMode yes
            """))
        hosts.bin_dir.mkdir()
        wrapper = hosts.bin_dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {root / "ssh_config"} "$@"\n')
        wrapper.chmod(0o755)
        deadline = time.monotonic() + 30
        for n in nodes:
            while True:
                try:
                    socket.create_connection((n.addr, 22), timeout=1).close()
                    break
                except OSError as e:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"sshd on {n.addr} did not start: "
                                           f"{(root / f'sshd-{n.name}.log').read_text(errors='replace')}") from e
                    time.sleep(0.2)
    except BaseException:
        hosts.stop()
        raise
    return hosts


def start_cluster(*, nodes: int = 1, cpus: int = 2) -> SlurmCluster:
    """Start munged, slurmctld and one slurmd per node; returns once every node is idle. ``nodes > 1`` puts
    each node in a network namespace of its own. Call :meth:`SlurmCluster.stop` (and for namespaces
    :func:`remove_netns_nodes`) when done."""
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
    if nodes == 1:
        node_list, ctld_name, ctld_addr = [Node(name="localhost", addr="127.0.0.1")], "localhost", "127.0.0.1"
    else:  # slurmctld accepts only this host's own name as its controller name
        node_list, ctld_addr = make_netns_nodes(nodes, "llms"), BRIDGE_ADDR
        ctld_name = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    ctld_port = free_port()
    slurmd_port = free_port()
    while slurmd_port == ctld_port:
        slurmd_port = free_port()
    conf.write_text(slurm_conf(root, nodes=node_list, ctld_name=ctld_name, ctld_addr=ctld_addr, ctld_port=ctld_port,
                               slurmd_port=slurmd_port, cpus=cpus))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
        del env[k]  # a surrounding real SLURM job must not leak into the test cluster's jobs
    cluster = SlurmCluster(root=root, env=env, nodes=node_list)
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
        for n in node_list:
            (root / "spool" / n.name).mkdir()
            _start(cluster, f"slurmd-{n.name}", [*n.prefix(), "slurmd", "-D", "-N", n.name])
        deadline = time.monotonic() + 90
        states: dict = {}
        while time.monotonic() < deadline:
            for name, p in cluster.procs.items():
                assert p.poll() is None, (
                    f"{name} exited with {p.returncode}:\n{(root / 'log' / f'{name}.out').read_text()[-3000:]}\n"
                    f"{cluster.logs()}")
            q = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True, text=True,
                               timeout=30)
            states = dict(line.split() for line in q.stdout.splitlines() if len(line.split()) == 2)
            if len(states) == len(node_list) and all(s == "idle" for s in states.values()):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"nodes not idle after 90 s (sinfo: {states!r})\n{cluster.logs()}")
        return cluster
    except BaseException:
        cluster.stop()
        if nodes > 1:
            remove_netns_nodes(node_list)
        shutil.rmtree(root, ignore_errors=True)
        raise
