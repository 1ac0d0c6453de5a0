"""Checkpoint core: exact resume on 2 real DeepSpeed ranks, retention, list/verify commands, RNG and state
encoding without pickle, the bad-step guard and the preemption flag."""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _ckpt_common as C  # noqa: E402

from llmscale.checkpoint import (  # noqa: E402
    CheckpointError,
    CheckpointManager,
    list_checkpoints,
    read_latest,
    read_manifest,
    verify_checkpoint,
)
from llmscale.checkpoint.codec import load_state_files, save_state_files  # noqa: E402
from llmscale.config import CheckpointConfig  # noqa: E402
from llmscale.dist import World  # noqa: E402
from llmscale.testing import run_distributed  # noqa: E402
from llmscale.trainer import BadStepGuard  # noqa: E402


def test_rng_state_roundtrip_without_pickle(tmp_path):
    from llmscale.rng import load_rng_state, restore_rng_state, save_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # cached gaussians are part of the state
    files = save_rng_state(tmp_path / "rng")
    assert {f.suffix for f in files} == {".json", ".safetensors"}
    draw = lambda: (random.random(), random.gauss(0, 1), float(np.random.randn()), torch.rand(3).tolist(),  # noqa: E731
                    torch.nn.functional.dropout(torch.ones(8), 0.5).tolist())
    want = draw()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert draw() != want
    restore_rng_state(*load_rng_state(tmp_path / "rng"))
    assert draw() == want


def test_state_files_roundtrip_and_refuse_objects(tmp_path):
    state = {"loader": {"epoch": 1, "pos": np.int64(7), "perm": np.arange(5), "w": torch.ones(2, 2),
                        "t": (1, 2), "lr": float("inf"), 3: "int key"}, "trainer": {"step": 4}}
    save_state_files(tmp_path / "s", state)
    back = load_state_files(tmp_path / "s")
    assert back["loader"]["epoch"] == 1 and back["loader"]["pos"] == 7
    assert np.array_equal(back["loader"]["perm"], np.arange(5))
    assert torch.equal(back["loader"]["w"], torch.ones(2, 2))
    assert back["loader"]["t"] == (1, 2) and back["loader"]["lr"] == float("inf") and back["loader"][3] == "int key"
    with pytest.raises(CheckpointError, match="no pickles"):
        save_state_files(tmp_path / "bad", {"x": {"obj": object()}})


def test_bad_step_guard():
    g = BadStepGuard(3)
    assert [g.update(b) for b in (True, True, False, True, True, True, True)] == [False] * 5 + [True, False]
    off = BadStepGuard(0)
    assert not any(off.update(True) for _ in range(10))


def test_preemption_flag_second_signal_and_deadline():
    from llmscale.signals import EXIT_REQUEUE, Preemption

    exits = []
    with Preemption(exit_fn=exits.append) as p:
        assert not p.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert p.requested and p.should_stop() and exits == []
        os.kill(os.getpid(), signal.SIGTERM)  # second signal: exit now
        assert exits == [EXIT_REQUEUE]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL or signal.getsignal(signal.SIGUSR1) != p._handle
    import time

    exits.clear()
    with Preemption(exit_fn=exits.append, grace_s=0.2):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.6)
        assert exits == [EXIT_REQUEUE]


@pytest.mark.slow
def test_preemption_grace_comes_from_the_environment():
    from llmscale.errors import ConfigError
    from llmscale.signals import grace_from_env

    assert grace_from_env({}) is None and grace_from_env({"LLMSCALE_PREEMPT_GRACE_S": ""}) is None
    assert grace_from_env({"LLMSCALE_PREEMPT_GRACE_S": "110"}) == 110.0
    for bad in ("soon", "0", "-5", "nan"):
        with pytest.raises(ConfigError, match="LLMSCALE_PREEMPT_GRACE_S=.*positive number of seconds"):
            grace_from_env({"LLMSCALE_PREEMPT_GRACE_S": bad})


def test_resume_is_bitwise_exact_with_retention_list_and_verify(tmp_path, capsys):
    full = run_distributed(C.train, 2, args=(str(tmp_path / "full"), 6), timeout=600)
    kw = {"every_steps": 1, "keep_last": 2, "keep_every": 3}
    first = run_distributed(C.train, 2, args=(str(tmp_path / "run"), 6), kwargs={**kw, "stop_after": 4}, timeout=600)
    assert first[0]["resumed"] is None and first[0]["step"] == 4
    second = run_distributed(C.train, 2, args=(str(tmp_path / "run"), 6), kwargs=kw, timeout=600)
    assert second[0]["resumed"] == 4 and second[1]["resumed"] == 4
    # the loss of every later step is bitwise identical (dropout RNG and data position restored), and so are the weights
    for step in (5, 6):
        assert second[0]["losses"][step] == full[0]["losses"][step]
    assert second[0]["digest"] == full[0]["digest"] and second[1]["digest"] == full[1]["digest"]

    # retention: last 2 plus every 3rd
    ckdir = tmp_path / "run" / "checkpoints"
    assert [i.step for i in list_checkpoints(ckdir)] == [3, 5, 6]
    assert read_latest(tmp_path / "run") == "step-000006"
    assert not [p for p in ckdir.iterdir() if p.name.startswith(".")]
    m = read_manifest(ckdir / "step-000006")
    assert m["step"] == 6 and m["layout"]["dp"] == 2 and m["layout"]["zero_stage"] == 1
    assert m["state_summary"]["trainer"] == {"step": 6, "tokens_seen": 6 * C.GLOBAL_BATCH}
    assert any(f.startswith("model/zero_pp_rank_1") for f in m["files"]), "DeepSpeed's per-rank optimizer shards"
    assert {"state/rank-00000.json", "state/rank-00001.json", "state/rng-rank-00001.safetensors"} <= set(m["files"])
    assert verify_checkpoint(ckdir / "step-000006") == []

    from llmscale.jobs import ckpt_list, ckpt_verify

    assert ckpt_list.main(argparse.Namespace(run_dir=str(tmp_path / "run"), json=True)) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in listed["checkpoints"]] == ["step-000003", "step-000005", "step-000006"]
    assert listed["checkpoints"][-1]["latest"] and listed["checkpoints"][-1]["tokens_seen"] == 48
    assert ckpt_verify.main(argparse.Namespace(path=str(tmp_path / "run"), no_checksums=False)) == 0
    assert capsys.readouterr().out.count("ok ") == 3
    # a flipped byte is found and named
    victim = ckdir / "step-000005" / "model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert ckpt_verify.main(argparse.Namespace(path=str(ckdir / "step-000005"), no_checksums=False)) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in out and "sha256" in out


@pytest.mark.slow
def test_resume_from_no_resume_and_convert_command(tmp_path, capsys):
    run = tmp_path / "run"
    kw = {"every_steps": 1, "keep_last": 5}
    run_distributed(C.train, 1, args=(str(run), 3), kwargs=kw, timeout=600)
    # an explicit checkpoint wins over the newest one
    out = run_distributed(C.train, 1, args=(str(run), 4),
                          kwargs={**kw, "resume_from": str(run / "checkpoints" / "step-000001")}, timeout=600)[0]
    assert out["resumed"] == 1 and out["loader_step"] == 4
    # --no-resume starts over without destroying anything: the old checkpoints are moved aside
    out = run_distributed(C.train, 1, args=(str(run), 2), kwargs={**kw, "resume": False}, timeout=600)[0]
    assert out["resumed"] is None and out["loader_step"] == 2
    aside = [p for p in run.iterdir() if p.name.startswith("checkpoints.replaced-")]
    assert len(aside) == 1 and (aside[0] / "step-000004" / "manifest.json").is_file()
    assert [i.step for i in list_checkpoints(run)] == [1, 2]
    with pytest.raises(Exception, match="damaged|neither a checkpoint"):
        run_distributed(C.train, 1, args=(str(run), 3), kwargs={**kw, "resume_from": str(tmp_path / "nowhere")},
                        timeout=600)

    from llmscale.jobs import ckpt_convert

    assert ckpt_convert.main(argparse.Namespace(checkpoint=str(run), workers=1)) == 0
    uni = Path(capsys.readouterr().out.strip())
    assert uni == run / "checkpoints" / "step-000002" / "universal" and (uni / "zero").is_dir()
    m = read_manifest(run / "checkpoints" / "step-000002")
    assert m["universal"] == "universal" and any(f.startswith("universal/zero/") for f in m["files"])
    assert verify_checkpoint(run / "checkpoints" / "step-000002") == []


def test_save_schedule_steps_minutes_and_force(tmp_path):
    import time

    m = CheckpointManager(world=World(), run_dir=tmp_path,
                          checkpoint=CheckpointConfig(every_steps=5, every_minutes=0.5))
    assert [s for s in range(1, 16) if m.should_save(s)] == [5, 10, 15]
    m._last_save_time = time.monotonic() - 31  # half a minute since the last save
    assert m.should_save(7) and m.should_save(7, force=True)
    off = CheckpointManager(world=World(), run_dir=tmp_path,
                            checkpoint=CheckpointConfig(every_steps=0, every_minutes=0))
    assert not any(off.should_save(s) for s in range(1, 50)) and off.should_save(3, force=True)
