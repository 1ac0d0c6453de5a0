"""No code runs from a checkpoint, even a forged one: a pickle that would create a file, planted in a real
checkpoint whose manifest was rewritten to match, is refused on resume, `ckpt convert`, `export` and fine-tune
init, and the file is never created; the loaders behind the scan (DeepSpeed's checkpoint engine, the universal
conversion process, consolidation) refuse it on their own too; the allowlist is what the saves of every layout
need, and no more."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from llmscale.files import sha256_file
from llmscale.testing import run_cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = "model/mp_rank_00_model_states.pt"
OPT0 = "model/zero_pp_rank_0_mp_rank_00_optim_states.pt"


class _Plant:
    """Unpickling this creates MARKER (through os.system): what a forged checkpoint file would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _forge(ckpt: Path, rel: str, marker: Path, *, raw: bool = False) -> None:
    """Replace ckpt/rel with a malicious pickle and rewrite the manifest so that every checksum matches."""
    p = ckpt / rel
    if raw:
        with open(p, "wb") as f:
            pickle.dump({"module": _Plant(str(marker))}, f)
    else:
        torch.save({"module": _Plant(str(marker)), "buffer_names": []}, p)  # a torch zip archive, like DeepSpeed's
    m = json.loads((ckpt / "manifest.json").read_text())
    m["files"][rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    (ckpt / "manifest.json").write_text(json.dumps(m, indent=1, sort_keys=True))


@pytest.fixture(scope="module")
def gpt_run(tiny_gpt_dataset, tiny_config, tmp_path_factory) -> Path:
    """A real 2-step GPT run (1 process, ZeRO-1) with a checkpoint at step 2."""
    root = tmp_path_factory.mktemp("safe")
    cfg = tiny_config(root / "c.yaml", dataset=tiny_gpt_dataset, run_dir=root / "run", steps=2,
                      checkpoint={"every_steps": 2})
    run_cli(["train", str(cfg), "--no-final-weights"])
    return root


def _forged_copy(gpt_run: Path, tmp_path: Path, rels=(MODEL, OPT0), raw: bool = False) -> tuple[Path, Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(gpt_run / "run", run)
    cfg = tmp_path / "c.yaml"
    cfg.write_text((gpt_run / "c.yaml").read_text().replace(str(gpt_run / "run"), str(run)))
    marker = tmp_path / "PWNED"
    for rel in rels:
        _forge(run / "checkpoints" / "step-000002", rel, marker, raw=raw)
    return run, cfg, marker


def _refused(proc, marker: Path, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert not marker.exists(), "a pickle from the checkpoint was executed"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for n in ("asks the unpickler for", "LLMSCALE_TRUST_PICKLE=1", *needles):
        assert n in proc.stderr, (n, proc.stderr[-3000:])


@pytest.mark.slow
def test_a_forged_checkpoint_is_refused_on_resume_convert_export_and_finetune_init(gpt_run, tmp_path):
    run, cfg, marker = _forged_copy(gpt_run, tmp_path)
    ckpt = run / "checkpoints" / "step-000002"
    train = run_cli(["train", str(cfg), "train.steps=4"], check=False)
    _refused(train, marker, "posix.system", str(ckpt / MODEL))
    assert ckpt.is_dir()  # a refusal keeps the folder as it is (not set aside as damaged)
    _refused(run_cli(["ckpt", "convert", str(ckpt)], check=False), marker, "posix.system")
    _refused(run_cli(["export", str(ckpt), str(tmp_path / "out")], check=False), marker, "posix.system")
    assert not (tmp_path / "out").exists()
    ft = run_cli(["finetune", str(ROOT / "configs" / "finetune_sft_gpt.yaml"), f"init.from={ckpt}",
                  f"run_dir={tmp_path / 'ft'}", "train.steps=1"], check=False)
    _refused(ft, marker, "posix.system")
    ev = tmp_path / "ev.yaml"
    ev.write_text(json.dumps({"model": str(run), "tasks": ["perplexity"], "output_dir": str(tmp_path / "ev"),
                              "perplexity": {"files": [str(ROOT / "llmscale" / "corpus" / "tinyshakespeare.txt")]}}))
    _refused(run_cli(["eval", str(ev)], check=False), marker, "posix.system")


def test_a_raw_pickle_is_refused_too(gpt_run, tmp_path):
    run, cfg, marker = _forged_copy(gpt_run, tmp_path, rels=(MODEL,), raw=True)
    proc = run_cli(["export", str(run / "checkpoints" / "step-000002"), str(tmp_path / "out")], check=False)
    _refused(proc, marker, "not a torch.save zip archive")


def _engine_load_forged(rank: int, world_size: int, ckpt: str) -> str:
    """Skip llmscale's scan (verified=True) and hand the forged folder to DeepSpeed: its checkpoint engine refuses."""
    import _ckpt_common as C

    from llmscale.checkpoint import CheckpointManager
    from llmscale.config import CheckpointConfig
    from llmscale.errors import CheckpointError

    m = CheckpointManager(world=C.world_of(rank, world_size), run_dir=str(Path(ckpt).parent.parent),
                          checkpoint=CheckpointConfig(every_steps=1))
    engine = C.build_ds(world_size=world_size, model=C.toy_model())
    try:
        m.load(ckpt, engine, {"trainer": C.Counters(), "loader": C.ToyLoader(dp_rank=rank, dp_size=world_size)},
               verified=True)
    except CheckpointError as e:
        return str(e)
    return "loaded"


def _toy_run(rank: int, world_size: int, run_dir: str) -> None:
    import _ckpt_common as C

    C.train(rank, world_size, run_dir, 2, every_steps=2)


@pytest.mark.slow
def test_the_loaders_behind_the_scan_refuse_on_their_own(tmp_path):
    """Defence in depth: with the scan bypassed, DeepSpeed's checkpoint engine, the universal conversion process
    and consolidation all read through the restricted unpickler."""
    import subprocess
    import sys

    from llmscale.checkpoint.safe_load import restricted_load
    from llmscale.errors import CheckpointError
    from llmscale.testing import cpu_env, run_distributed

    run = tmp_path / "run"
    run_distributed(_toy_run, 1, args=(str(run),))
    ckpt = run / "checkpoints" / "step-000002"
    marker = tmp_path / "PWNED"
    _forge(ckpt, MODEL, marker)
    msg = run_distributed(_engine_load_forged, 1, args=(str(ckpt),))[0]
    assert "asks the unpickler for posix.system" in msg and str(ckpt / MODEL) in msg and not marker.exists()
    proc = subprocess.run([sys.executable, "-m", "llmscale.checkpoint.convert_worker", "--input_folder",
                           str(ckpt / "model"), "--output_folder", str(tmp_path / "uni")], env=cpu_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "asks the unpickler for posix.system" in proc.stderr and not marker.exists()
    with pytest.raises(CheckpointError, match="posix.system"):
        restricted_load(ckpt / MODEL)
    assert not marker.exists()


def test_trust_flag_loads_a_file_that_needs_more_knowingly(tmp_path, monkeypatch):
    """A checkpoint of another tool holding a harmless class outside the allowlist: refused by default, with the
    flag named; loaded with LLMSCALE_TRUST_PICKLE=1."""
    from fractions import Fraction

    from llmscale.checkpoint.safe_load import TRUST_ENV, restricted_load, unsafe_globals
    from llmscale.errors import CheckpointError

    p = tmp_path / "other.pt"
    torch.save({"w": torch.ones(2), "scale": Fraction(1, 3)}, p)
    assert unsafe_globals(p) == ["fractions.Fraction"]
    with pytest.raises(CheckpointError, match=f"fractions.Fraction.*{TRUST_ENV}=1"):
        restricted_load(p)
    monkeypatch.setenv(TRUST_ENV, "1")
    assert restricted_load(p)["scale"] == Fraction(1, 3)


def _layout_run(tmp: Path, dataset: Path, tiny_config, name: str, parallel: dict) -> Path:
    cfg = tiny_config(tmp / f"{name}.yaml", dataset=dataset, run_dir=tmp / name, steps=2,
                      checkpoint={"every_steps": 2}, parallel={"micro_batch_size": 2, "global_batch_size": 8,
                                                               **parallel})
    run_cli(["train", str(cfg), "--no-final-weights"], nproc=2)
    return tmp / name / "checkpoints" / "step-000002"


@pytest.mark.slow
def test_the_allowlist_is_what_every_layout_saves_and_no_more(tiny_gpt_dataset, tiny_config, tmp_path):
    """Saves of ZeRO 0-3, optimizer offload, TP=2, PP=2 and a universal conversion ask for nothing outside the
    allowlist; together they use every entry except the fp16 loss scaler (no fp16 on the CPU)."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    from llmscale.checkpoint import convert_to_universal
    from llmscale.checkpoint.safe_load import ALLOWED_GLOBALS

    layouts = {"zero0": {"zero_stage": 0}, "zero2_offload": {"zero_stage": 2, "offload_optimizer": True},
               "zero3": {"zero_stage": 3}, "tp2": {"tensor_parallel": 2, "zero_stage": 1},
               "pp2": {"pipeline_parallel": 2, "zero_stage": 1}}
    used: dict[str, set[str]] = {}
    for name, parallel in layouts.items():
        ckpt = _layout_run(tmp_path, tiny_gpt_dataset, tiny_config, name, parallel)
        if name == "tp2":
            convert_to_universal(ckpt)  # through the restricted conversion process
        files = sorted(ckpt.rglob("*.pt"))
        assert files, name
        used[name] = {g for f in files for g in get_unsafe_globals_in_checkpoint(str(f))}
    assert any(str(f).count("/universal/") for f in (tmp_path / "tp2").rglob("*.pt"))
    everything = set().union(*used.values())
    assert everything <= set(ALLOWED_GLOBALS), {k: v - set(ALLOWED_GLOBALS) for k, v in used.items()}
    assert set(ALLOWED_GLOBALS) - everything == {"deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"}, used


def test_deepspeeds_universal_loaders_see_a_restricted_torch_load_only_during_the_scope(tmp_path):
    """Engine.load(universal=True) wraps DeepSpeed's load in restricted_torch_in(): inside, the bare torch.load of
    DeepSpeed's universal loaders refuses a forged file; outside, those modules see torch itself again."""
    import importlib

    from llmscale.checkpoint.safe_load import UNIVERSAL_LOADERS, restricted_torch_in
    from llmscale.errors import CheckpointError

    forged, marker = tmp_path / "fp32.pt", tmp_path / "PWNED"
    torch.save(_Plant(str(marker)), forged)
    mods = [importlib.import_module(m) for m in UNIVERSAL_LOADERS]
    with restricted_torch_in():
        for mod in mods:
            assert mod.torch.zeros(2).sum() == 0  # everything else is torch's
            with pytest.raises(CheckpointError, match="posix.system"):
                mod.torch.load(forged, weights_only=False)  # what DeepSpeed's code asks for
    assert all(mod.torch is torch for mod in mods) and not marker.exists()
