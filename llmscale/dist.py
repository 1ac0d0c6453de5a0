"""Who am I in the job: world/rank discovery from torchrun, accelerate or SLURM, passed explicitly.

There is no module-level process-group state: code receives a :class:`World` and, for
collectives, the default process group that :func:`init_distributed` created.

Also here: the small collectives every module needs (:func:`barrier`, :func:`broadcast_object`,
:func:`all_gather_object`, :func:`any_rank`; no-ops without a process group), :func:`deadline` (a bounded,
named wait for the other ranks) and :func:`free_port`.
What does not live here: the parallel layout's process groups (:mod:`llmscale.parallel.topology`).
"""
from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import re
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # Fallback: the first host of "node[01-04],other" -> "node01", "rack[1-2]n[07,03]" -> "rack1n07".
    head, depth = "", 0
    for ch in nodelist:
        if ch == "," and depth == 0:
            break
        depth += (ch == "[") - (ch == "]")
        head += ch
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], head)


def discover_world(env: Optional[dict] = None) -> World:
    """Read the launcher's environment: torchrun/accelerate (RANK, WORLD_SIZE, LOCAL_RANK, ...) first,
    then SLURM (SLURM_PROCID, SLURM_NTASKS, ...) when a job step launched one task per GPU."""
    env = dict(os.environ if env is None else env)
    port = int(env.get("MASTER_PORT", 29500))
    if "RANK" in env and "WORLD_SIZE" in env:
        ws = int(env["WORLD_SIZE"])
        lws = int(env.get("LOCAL_WORLD_SIZE", ws))
        return World(
            rank=int(env["RANK"]),
            world_size=ws,
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=lws,
            node_rank=int(env.get("GROUP_RANK", int(env["RANK"]) // max(lws, 1))),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        ws = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_NNODES", 1))
        return World(
            rank=int(env["SLURM_PROCID"]),
            world_size=ws,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=max(ws // max(nodes, 1), 1),
            node_rank=int(env.get("SLURM_NODEID", 0)),
            master_addr=env.get("MASTER_ADDR") or _first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=port,
        )
    return World()


def export_env(world: World) -> None:
    """Make the torch.distributed env:// variables agree with ``world`` (needed under srun)."""
    os.environ.update(
        RANK=str(world.rank),
        WORLD_SIZE=str(world.world_size),
        LOCAL_RANK=str(world.local_rank),
        LOCAL_WORLD_SIZE=str(world.local_world_size),
        MASTER_ADDR=world.master_addr,
        MASTER_PORT=str(world.master_port),
    )


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _interface_with(ip: str) -> Optional[str]:
    """The name of the network interface that holds IPv4 address ``ip`` (Linux), else None."""
    import fcntl
    import socket
    import struct

    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == ip:
                return name
    return None


def gloo_interface(master_addr: str) -> Optional[str]:
    """The interface gloo should use to reach the other hosts, when its own choice would fail: gloo binds to
    the address this host's name resolves to, which Debian-style /etc/hosts maps to 127.0.1.1 (and network
    namespaces share one name): ranks on other hosts are then told to connect to a loopback address. Returns
    the interface that routes to ``master_addr`` in that case (GLOO_SOCKET_IFNAME), else None."""
    import ipaddress
    import socket

    try:
        if ipaddress.ip_address(socket.gethostbyname(master_addr)).is_loopback:
            return None  # a one-host job: loopback is right
        mine = ipaddress.ip_address(socket.gethostbyname(socket.gethostname()))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master_addr, 9))
            route_ip = s.getsockname()[0]
    except (OSError, ValueError):
        return None
    if not mine.is_loopback and str(mine) == route_ip:
        return None
    return _interface_with(route_ip)


def init_distributed(world: World, *, backend: Optional[str] = None, timeout_s: float = 1800) -> None:
    """Create the default process group (also for world_size 1, so collectives work everywhere). For gloo
    across hosts whose name resolves to a loopback address, GLOO_SOCKET_IFNAME is set to the interface that
    reaches the master (:func:`gloo_interface`)."""
    if dist.is_initialized():
        return
    export_env(world)
    if (backend or default_backend()) == "gloo" and world.world_size > 1 and "GLOO_SOCKET_IFNAME" not in os.environ:
        ifname = gloo_interface(world.master_addr)
        if ifname:
            os.environ["GLOO_SOCKET_IFNAME"] = ifname
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank % max(torch.cuda.device_count(), 1))
    dist.init_process_group(
        backend=backend or default_backend(),
        init_method="env://",
        world_size=world.world_size,
        rank=world.rank,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def shutdown() -> None:
    """Destroy the process group (ZeRO-3 can abort at interpreter exit otherwise)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # a peer already gone: still tear down locally
            pass
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on this host now (for a lone process's rendezvous, or tests)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_for_job(env: Optional[dict] = None) -> World:
    """:func:`discover_world`; a lone process without ``MASTER_PORT`` gets a free port, so several such
    runs can share a host."""
    import dataclasses

    env = dict(os.environ if env is None else env)
    world = discover_world(env)
    if world.world_size == 1 and "MASTER_PORT" not in env:
        world = dataclasses.replace(world, master_port=free_port())
    return world


# --------------------------------------------------------------------------- collectives
# Over the default process group; each is a no-op (returns its input) when no group exists, so code
# written for N ranks runs unchanged in one process.


def _group_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _group_ready():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not _group_ready():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order."""
    if not _group_ready():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank when ``flag`` is true on any rank (of ``group``; default: the world)."""
    if not _group_ready():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _log():
    from llmscale.log import get_logger

    return get_logger(__name__)


def _last_words(msg: str) -> None:
    """Log an error every rank shows (not only rank 0) and flush it: the process ends right after (os._exit)."""
    import logging

    _log().error("%s", msg)
    for h in logging.getLogger().handlers + logging.getLogger("llmscale").handlers:
        h.flush()
    sys.stderr.flush()


EXIT_WAIT_TIMEOUT = 1  # what a rank exits with when a bounded wait for the others expires (a failure, not a requeue)
DEFAULT_WAIT_S = 600.0


@contextlib.contextmanager
def deadline(what: str, seconds: Optional[float] = DEFAULT_WAIT_S) -> Iterator[None]:
    """Bound a section in which this rank waits for the others (collectives, DeepSpeed's barriers).

    If it has not finished after ``seconds``, the process writes one line naming ``what`` it was waiting for
    and exits with :data:`EXIT_WAIT_TIMEOUT`, instead of sitting in a collective until the process group's
    timeout (30 minutes by default, forever on some paths). Nothing is unwound: the other ranks may hold the
    same collective, so cleaning up could hang too; what a save leaves behind is a ``.tmp-`` folder that is
    never taken for a checkpoint. ``seconds`` of 0 or None: no bound. Without a process group: no bound."""
    if not seconds or seconds <= 0 or not _group_ready() or dist.get_world_size() == 1:
        yield
        return
    t0 = time.monotonic()

    def expire() -> None:
        msg = (f"rank {dist.get_rank()}: gave up after {time.monotonic() - t0:.0f}s waiting for the other ranks: "
               f"{what}. A rank died, hangs or failed there (see its own log above); exiting with code "
               f"{EXIT_WAIT_TIMEOUT} instead of waiting for the process-group timeout. The bound is "
               f"train.wait_timeout_s ({seconds:g}s).")
        try:
            _last_words(msg)
        finally:
            os._exit(EXIT_WAIT_TIMEOUT)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


EXIT_PEER_LOST = 76  # "a rank of this job is gone; the last checkpoint is intact": worth a requeue (slurm/_job.sh)
PEER_LOST_ENV = "LLMSCALE_PEER_LOST_FILE"  # where a rank that saw a peer vanish writes what it saw (JSON)

_COMM_ERRORS = ("connection closed", "connection reset", "broken pipe", "connection refused", "gloo", "nccl",
                "timed out", "timeout", "socket")


def looks_like_lost_peer(err: BaseException) -> bool:
    """Whether an exception from a collective could be a peer that vanished (the monitor then decides)."""
    text = f"{type(err).__name__}: {err}".lower()
    return isinstance(err, (RuntimeError, OSError, ConnectionError)) and any(k in text for k in _COMM_ERRORS)


def _host_label() -> str:
    """What names this rank's host in a report: the SLURM node name, else the hostname, with the address the
    job's master is reached from (network namespaces share a hostname but not an address)."""
    import socket

    name = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    addr = "?"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "1") or 1)))
            addr = s.getsockname()[0]
    except OSError:
        pass
    return f"{name} {addr}"


class PeerMonitor:
    """A failure detector for the ranks of one job, so that a dead node ends the job in bounded time.

    Every rank's monitor thread adds 1 to its own counter in the job's rendezvous store (the TCPStore that
    MASTER_ADDR:MASTER_PORT serves) every ``interval_s`` and reads everyone else's. A rank whose counter has not
    moved for ``timeout_s`` is lost (its process or its host is gone, or it hangs without running Python); a
    store that cannot be reached for ``timeout_s`` means the store's host is lost (rank 0's node, or the launcher
    agent's). Either way the monitor names the lost ranks and their hosts, writes that to
    ``$LLMSCALE_PEER_LOST_FILE`` when set, and ends this process with :data:`EXIT_PEER_LOST` (the survivors
    cannot go on: every step needs every rank). The thread needs the GIL for a moment every interval only.

    ``start()`` and ``stop()`` are collective: start after :func:`init_distributed`, stop before the job's
    last barrier (a rank that has stopped is "done", never "lost"). No-op on one process or ``timeout_s`` 0.
    """

    def __init__(self, *, timeout_s: float, interval_s: Optional[float] = None) -> None:
        self.timeout_s = float(timeout_s)
        self.interval_s = float(interval_s if interval_s is not None else min(max(self.timeout_s / 12, 0.5), 10.0))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._store: Any = None
        self.rank, self.world_size = 0, 1
        self.hosts: list[str] = []
        self.lost: Optional[dict] = None

    @property
    def active(self) -> bool:
        return self._thread is not None

    def start(self) -> PeerMonitor:
        if self.timeout_s <= 0 or not _group_ready() or dist.get_world_size() == 1:
            return self
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.hosts = all_gather_object(_host_label())
        self._store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                    timeout=datetime.timedelta(seconds=max(self.interval_s * 2, 5.0)),
                                    wait_for_workers=False)
        self._store.add(f"llmscale/hb/{self.rank}", 1)
        barrier()  # every counter exists before anyone reads them
        now = time.monotonic()
        self._moved = [now] * self.world_size
        self._counts = [-1] * self.world_size
        self._done: set[int] = set()
        self._store_ok = now
        self._store_error = ""
        # two threads: one talks to the store (a read from a host that vanished can block as long as the socket
        # does), one only looks at the clock and decides, so the verdict never waits on the network
        threading.Thread(target=self._beat, name="llmscale-heartbeat", daemon=True).start()
        self._thread = threading.Thread(target=self._watch, name="llmscale-peer-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """This rank is done (normal end): the others no longer expect its heartbeat. Collective."""
        if self._thread is None:
            return
        self._stop.set()
        try:
            self._store.add(f"llmscale/done/{self.rank}", 1)
        except Exception:  # noqa: BLE001 - the store's host already gone at the end: nothing to tell
            pass
        self._thread.join(timeout=self.interval_s * 3)
        self._thread = None

    def _beat(self) -> None:
        """Add 1 to this rank's counter and read everyone's, every interval."""
        while not self._stop.is_set():
            try:
                self._store.add(f"llmscale/hb/{self.rank}", 1)
                now = time.monotonic()
                for r in range(self.world_size):
                    c = self._store.add(f"llmscale/hb/{r}", 0)
                    if c != self._counts[r]:
                        self._counts[r], self._moved[r] = c, now
                self._done = {r for r in range(self.world_size) if self._store.add(f"llmscale/done/{r}", 0)}
                self._store_ok = time.monotonic()
            except Exception as e:  # noqa: BLE001 - the store's host is unreachable: the watcher decides
                self._store_error = f"{type(e).__name__}: {e}"
            self._stop.wait(self.interval_s)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            verdict = self._verdict(time.monotonic())
            if verdict and not self._stop.is_set():
                self._declare(*verdict)

    def _verdict(self, now: float) -> Optional[tuple[list[int], str]]:
        """Who is lost at ``now``, and why; None while everyone is alive. A peer's silence is measured up to the
        last read that reached the store: while the store does not answer, nobody's counter can be seen, and the
        verdict is then about the store (its host is rank 0's), never a peer's heartbeat that merely went unread."""
        if now - self._store_ok > self.timeout_s:
            return [0], (f"the job's rendezvous store at {os.environ.get('MASTER_ADDR')}:"
                         f"{os.environ.get('MASTER_PORT')} has not answered for {now - self._store_ok:.0f}s"
                         f"{' (' + self._store_error + ')' if self._store_error else ''}")
        seen = self._store_ok
        lost = [r for r in range(self.world_size)
                if r != self.rank and r not in self._done and seen - self._moved[r] > self.timeout_s]
        if lost:
            return lost, f"no heartbeat for {max(seen - self._moved[r] for r in lost):.0f}s"
        return None

    def _declare(self, lost: list[int], why: str) -> None:
        import json

        hosts = sorted({self.hosts[r] for r in lost if r < len(self.hosts)})
        msg = (f"rank {self.rank}: lost rank(s) {', '.join(map(str, lost))} on {'; '.join(hosts) or '?'}: {why}. "
               f"The job cannot go on without them: exiting with code {EXIT_PEER_LOST} (bound: "
               f"train.peer_timeout_s={self.timeout_s:g}s). The last complete checkpoint is intact; run the same "
               f"command again (slurm/*.sbatch requeue the job) to resume from it.")
        self.lost = {"rank": self.rank, "lost_ranks": lost, "hosts": hosts, "why": why, "time": time.time()}
        try:
            _last_words(msg)
            path = os.environ.get(PEER_LOST_ENV)
            if path:
                tmp = f"{path}.tmp-{os.getpid()}"
                with open(tmp, "w") as f:
                    json.dump(self.lost, f)
                os.replace(tmp, path)
        finally:
            os._exit(EXIT_PEER_LOST)

    def settle(self, err: BaseException) -> None:
        """After ``err`` from a collective on the main thread: if it may be a lost peer, give the monitor the time
        to confirm it (it then ends the process with :data:`EXIT_PEER_LOST`); returns if it does not."""
        if self._thread is None or not looks_like_lost_peer(err):
            return
        _log().warning("a collective failed (%s: %s); checking whether a rank is gone (up to %.0fs)",
                       type(err).__name__, str(err)[:300], self.timeout_s + 2 * self.interval_s)
        self._thread.join(timeout=self.timeout_s + 2 * self.interval_s)


# --------------------------------------------------------------------------- local ranks (benchmarks, tests)


class RankFailure(RuntimeError):
    """A rank of :func:`run_local_ranks` failed or timed out; the message carries its traceback."""


def _local_rank_main(rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict, queue: Any,
                     env: dict) -> None:
    os.environ.update(env)
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


# the environment of a spawned CPU rank in the benchmarks: DeepSpeed's CPU accelerator, one thread each (the ranks
# share the machine's cores)
CPU_RANK_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_local_ranks(
    fn: Callable,
    world_size: int,
    *,
    args: Sequence[Any] = (),
    kwargs: Optional[dict] = None,
    timeout: float = 600.0,
    env: Optional[dict] = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned CPU processes of this host joined
    by gloo (benchmarks and tests; ``env`` is added to each rank's environment). ``fn`` must be importable
    (module level). Returns the per-rank return values (picklable), in rank order; a failure on any rank
    raises :class:`RankFailure` with that rank's traceback."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_local_rank_main, args=(r, world_size, port, fn, tuple(args), dict(kwargs or {}), queue,
                                                dict(env or {})), daemon=False)
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
                raise RankFailure(
                    f"run_local_ranks({fn.__name__}, world_size={world_size}) timed out after {timeout}s; "
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
        raise RankFailure(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]
