"""llmscale.dist.PeerMonitor, the failure detector behind train.peer_timeout_s, on two plain local processes: a
rank that vanishes without a word is named by the other, which exits 76 and records it; a rank that ends
normally (stop()) is never taken for lost."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from llmscale.dist import EXIT_PEER_LOST, PEER_LOST_ENV, free_port
from llmscale.testing import cpu_env

_RANK = textwrap.dedent("""\
    import os, sys, time
    from llmscale.dist import PeerMonitor, discover_world, init_distributed
    mode = sys.argv[1]
    world = discover_world()
    init_distributed(world, backend="gloo")
    mon = PeerMonitor(timeout_s=3, interval_s=0.5).start()
    if world.rank == 1:
        if mode == "vanish":
            os._exit(9)           # gone without a word (as a SIGKILL or a dead host)
        mon.stop()                # done: the other must not call it lost
        os._exit(0)
    time.sleep(12)                # rank 0 sits outside any collective: only the monitor can notice
    mon.stop()
    print("rank 0 finished", flush=True)
    os._exit(0)
    """)


def _run(tmp_path, mode: str) -> tuple[list[subprocess.Popen], float]:
    script = tmp_path / "rank.py"
    script.write_text(_RANK)
    port = free_port()
    procs = []
    t0 = time.monotonic()
    for r in range(2):
        env = cpu_env({"RANK": r, "WORLD_SIZE": 2, "LOCAL_RANK": r, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                       PEER_LOST_ENV: str(tmp_path / "lost.json")})
        procs.append(subprocess.Popen([sys.executable, str(script), mode], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs, t0


def test_a_rank_that_vanishes_is_named_and_the_other_exits_76(tmp_path):
    procs, t0 = _run(tmp_path, "vanish")
    out0, err0 = procs[0].communicate(timeout=60)
    took = time.monotonic() - t0
    procs[1].wait(timeout=30)
    assert procs[0].returncode == EXIT_PEER_LOST, err0
    assert "rank 0: lost rank(s) 1 on " in err0 and "no heartbeat for" in err0, err0
    assert "rank 0 finished" not in out0 and took < 12, took  # it did not wait out its sleep
    lost = json.loads((tmp_path / "lost.json").read_text())
    assert lost["lost_ranks"] == [1] and lost["rank"] == 0


def test_a_rank_that_stops_normally_is_not_lost(tmp_path):
    procs, _ = _run(tmp_path, "done")
    out0, err0 = procs[0].communicate(timeout=60)
    assert procs[0].returncode == 0 and "rank 0 finished" in out0, err0
    assert not (tmp_path / "lost.json").exists()


@pytest.mark.parametrize("text, lost", [("Connection closed by peer [10.0.0.2]:4711", True),
                                        ("[gloo] Timed out waiting", True), ("shape mismatch", False)])
def test_which_errors_wait_for_the_monitor(text, lost):
    from llmscale.dist import looks_like_lost_peer

    assert looks_like_lost_peer(RuntimeError(text)) is lost
    assert looks_like_lost_peer(ValueError(text)) is False


def _monitor_at(*, store_ok: float, moved: list[float], rank: int = 1):
    from llmscale.dist import PeerMonitor

    mon = PeerMonitor(timeout_s=15, interval_s=1.25)
    mon.rank, mon.world_size = rank, len(moved)
    mon._store_ok, mon._moved, mon._done, mon._store_error = store_ok, list(moved), set(), "TimeoutError: x"
    return mon


def test_a_store_that_stops_answering_is_the_verdict_not_a_peer_heartbeat_left_unread():
    # the CI timeline of the cut-off host: its last read that reached the store was at t=100 and saw rank 0's
    # counter last move at t=99 (rank 0 had not beaten again between two reads); from then on nothing is read
    mon = _monitor_at(store_ok=100.0, moved=[99.0, 100.0])
    assert mon._verdict(114.5) is None            # neither bound has passed since the last read
    lost, why = mon._verdict(115.5)                # rank 0's counter is 16.5 s old, the store 15.5 s silent
    assert lost == [0] and "rendezvous store" in why and "has not answered for 16s" in why, why


def test_a_peer_whose_counter_stops_while_the_store_answers_is_lost_by_heartbeat():
    mon = _monitor_at(store_ok=130.0, moved=[129.0, 115.5, 130.0], rank=0)
    assert mon._verdict(130.5) is None             # rank 1's counter 14.5 s old at the last read: within 15 s
    mon._moved[1] = 113.0
    lost, why = mon._verdict(130.5)
    assert lost == [1] and why == "no heartbeat for 17s", why
    mon._done = {1}                                # a rank that said it is done is never lost
    assert mon._verdict(130.5) is None
