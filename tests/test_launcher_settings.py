"""accelerate the way its users use it: `accelerate launch --config_file F -m llmscale train CONFIG` with the
config files users already have (MULTI_GPU; DEEPSPEED with zero_stage / gradient_accumulation_steps /
mixed_precision / offload_*; DEEPSPEED with a deepspeed_config_file). llmscale reads what accelerate passes
(llmscale/launcher_settings.py): unset in the llmscale config -> taken; set in both and different -> refused
before anything is built, naming both; nothing ignored silently; "auto" resolved by llmscale with dp = world /
(tp * pp). The files in launch/accelerate/ each train 2 CPU processes here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmscale.config import RunConfig, load_config
from llmscale.errors import ConfigError
from llmscale.launcher_settings import launcher_settings, merge_launcher_settings
from llmscale.testing import cpu_env

ROOT = Path(__file__).resolve().parents[1]
FILES = ROOT / "launch" / "accelerate"


def _ds_env(**kw) -> dict:
    return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "no", **kw}


def test_unset_taken_set_and_equal_kept_different_refused():
    env = _ds_env(ACCELERATE_DEEPSPEED_ZERO_STAGE="2", ACCELERATE_GRADIENT_ACCUMULATION_STEPS="4",
                  ACCELERATE_GRADIENT_CLIPPING="0.5", ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu",
                  ACCELERATE_MIXED_PRECISION="bf16")
    out = merge_launcher_settings({"parallel": {"micro_batch_size": 4}}, env)
    assert out["parallel"] == {"micro_batch_size": 4, "zero_stage": 2, "grad_accum_steps": 4, "offload_optimizer": True}
    assert out["optim"] == {"grad_clip": 0.5} and out["train"] == {"precision": "bf16"}
    assert merge_launcher_settings({"parallel": {"zero_stage": 2}}, env)["parallel"]["zero_stage"] == 2
    with pytest.raises(ConfigError, match=r"parallel.zero_stage: the llmscale config says 1, accelerate "
                                          r"\(DeepSpeed plugin\): zero_stage says 2"):
        merge_launcher_settings({"parallel": {"zero_stage": 1}}, env)
    with pytest.raises(ConfigError, match="train.precision: the llmscale config says 'fp32'.*'bf16'"):
        merge_launcher_settings({"train": {"precision": "fp32"}}, env)
    # precision "auto" is llmscale's unset; accelerate's "no" is accelerate's unset
    assert merge_launcher_settings({"train": {"precision": "auto"}}, env)["train"]["precision"] == "bf16"
    assert "train" not in merge_launcher_settings({}, _ds_env())
    assert merge_launcher_settings({"x": 1}, {}) == {"x": 1}  # not under accelerate: nothing changes


def test_what_llmscale_cannot_honour_is_refused_or_said():
    with pytest.raises(ConfigError, match="offload_param device=cpu.*set it to none"):
        launcher_settings(_ds_env(ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="cpu"))
    with pytest.raises(ConfigError, match="offload_optimizer device='nvme'"):
        launcher_settings(_ds_env(ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="nvme"))
    with pytest.raises(ConfigError, match="fp8 is not supported"):
        launcher_settings({"ACCELERATE_MIXED_PRECISION": "fp8"})
    with pytest.raises(ConfigError, match="FSDP.*zero_stage"):
        launcher_settings({"ACCELERATE_USE_FSDP": "true"})
    _, notes = launcher_settings(_ds_env(ACCELERATE_DEEPSPEED_ZERO3_INIT="true",
                                         ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL="true"))
    assert any("zero3_init_flag" in n for n in notes) and any("zero3_save_16bit_model" in n for n in notes)


def test_deepspeed_file_auto_values_mapped_values_and_refusals(tmp_path):
    f = tmp_path / "ds.json"

    def settings(ds: dict, **env) -> dict:
        f.write_text(json.dumps(ds))
        found, _ = launcher_settings(_ds_env(ACCELERATE_DEEPSPEED_CONFIG_FILE=str(f), **env))
        return {k: v for k, (v, _) in found.items()}

    shipped = json.loads((FILES / "ds_config.json").read_text())
    assert settings(shipped) == {"optim.grad_clip": 1.0, "parallel.zero_stage": 1,
                                 "parallel.offload_optimizer": False, "deepspeed.overlap_comm": False,
                                 "deepspeed.steps_per_print": 1000000}  # every "auto" left to llmscale
    got = settings({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 16,
                    "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 3e-4,
                                                                                        "betas": [0.9, 0.95]}}})
    assert got == {"parallel.micro_batch_size": 4, "parallel.grad_accum_steps": 2, "parallel.global_batch_size": 16,
                   "train.precision": "bf16", "optim.lr": 3e-4, "optim.beta1": 0.9, "optim.beta2": 0.95}
    with pytest.raises(ConfigError, match="fancy_key have no llmscale equivalent"):
        settings({"fancy_key": 1})
    with pytest.raises(ConfigError, match="scheduler WarmupLR.*warmup_num_steps"):
        settings({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100}}})
    with pytest.raises(ConfigError, match="optimizer type 'Lamb'"):
        settings({"optimizer": {"type": "Lamb"}})
    with pytest.raises(ConfigError, match="parallel.zero_stage: accelerate .*zero_stage gives 2, .*gives 3"):
        settings({"zero_optimization": {"stage": 3}}, ACCELERATE_DEEPSPEED_ZERO_STAGE="2")


def test_batch_arithmetic_with_auto_uses_dp_of_the_layout(monkeypatch, tmp_path):
    """gradient_accumulation_steps from accelerate + llmscale's micro batch: the global batch solves with
    dp = world / (tp * pp); a file's train_batch_size that does not fit is refused by the plan, naming it."""
    from llmscale.parallel import plan_run

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"data": {"path": "x", "seq_len": 8}, "model": {"preset": "gpt-tiny"},
                                        "parallel": {"micro_batch_size": 2, "tensor_parallel": 2}}))
    for k, v in _ds_env(ACCELERATE_GRADIENT_ACCUMULATION_STEPS="3").items():
        monkeypatch.setenv(k, v)
    cfg = load_config(RunConfig, cfg_file)
    plan = plan_run(cfg, 8)  # dp = 8 / 2 = 4
    assert (plan.batch.micro_batch_size, plan.batch.grad_accum_steps, plan.batch.global_batch_size) == (2, 3, 24)
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_batch_size": 20, "gradient_accumulation_steps": 3}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(f))
    from llmscale.errors import LayoutError

    with pytest.raises(LayoutError, match="global_batch_size=20 but micro_batch_size\\*grad_accum_steps"):
        plan_run(load_config(RunConfig, cfg_file), 8)


# --------------------------------------------------------------------------- real launches, 2 CPU processes


def _launch(file: Path, cfg: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(file), "--num_processes", "2",
         "-m", "llmscale", "train", str(cfg), "train.log_every=1", *extra],
        env=cpu_env({"PYTHON": sys.executable}), capture_output=True, text=True, timeout=420, cwd=ROOT)


def _tiny(tiny_config, tmp_path: Path, dataset: Path, name: str, **parallel) -> tuple[Path, Path]:
    run = tmp_path / name
    cfg = tiny_config(tmp_path / f"{name}.yaml", dataset=dataset, run_dir=run, steps=2)
    raw = yaml.safe_load(cfg.read_text())
    raw["parallel"] = {"micro_batch_size": 4, **parallel}  # no global batch: accelerate's accumulation counts
    raw.setdefault("train", {}).pop("precision", None)
    cfg.write_text(yaml.safe_dump(raw))
    return cfg, run


@pytest.mark.slow
@pytest.mark.parametrize("file, want", [
    ("multi_gpu.yaml", {"zero_stage": 0, "grad_accum_steps": None}),
    ("deepspeed_zero2.yaml", {"zero_stage": 2, "grad_accum_steps": 2, "offload_optimizer": False}),
    ("deepspeed_zero3_offload.yaml", {"zero_stage": 3, "offload_optimizer": True}),
    ("deepspeed_config_file.yaml", {"zero_stage": 1, "offload_optimizer": False}),
])
def test_shipped_accelerate_files_train_two_processes(file, want, tiny_gpt_dataset, tiny_config, tmp_path):
    cfg, run = _tiny(tiny_config, tmp_path, tiny_gpt_dataset, "run")
    extra = () if "grad_accum_steps" in want and want["grad_accum_steps"] else ("parallel.grad_accum_steps=1",)
    p = _launch(FILES / file, cfg, tmp_path, *extra)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    for k, v in want.items():
        if v is not None:
            assert resolved["parallel"][k] == v, (k, resolved["parallel"])
    assert "dp=2" in out and (run / "final" / "model.pt").is_file()
    if "zero3" in file:
        assert "zero3_init_flag" in out and "zero3_save_16bit_model" in out  # said, not silently dropped


@pytest.mark.slow
def test_a_conflict_with_the_accelerate_file_is_refused_before_anything_runs(tiny_gpt_dataset, tiny_config,
                                                                            tmp_path):
    cfg, run = _tiny(tiny_config, tmp_path, tiny_gpt_dataset, "run", zero_stage=1)
    p = _launch(FILES / "deepspeed_zero2.yaml", cfg, tmp_path)
    err = p.stdout + p.stderr
    assert p.returncode != 0
    assert "parallel.zero_stage: the llmscale config says 1, accelerate (DeepSpeed plugin): zero_stage says 2" in err
    # a clean refusal from every rank (torchrun, under accelerate, then prints its own ChildFailedError report)
    assert f'File "{ROOT / "llmscale"}' not in err and not (run / "checkpoints").exists()
