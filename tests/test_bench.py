"""`bench train` and `bench ckpt` at their smallest, through the CLI a user runs, so that they cannot rot: every
figure the README quotes is present, finite and consistent with the others (ratios against the limits measured
in the same run). No timing threshold: performance is judged in the benchmarks' JSON, not here."""
from __future__ import annotations

import json
import math

import pytest

from llmscale.testing import run_cli

pytestmark = pytest.mark.slow


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_train_cpu_smallest(tmp_path):
    out = tmp_path / "train.json"
    proc = run_cli(["bench", "train", "--presets", "gpt-char", "--nproc", "1", "--steps", "2", "--warmup", "1",
                    "--skip-gpu", "--output", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["benchmark"] == "train" and rep["gpu"] == {"skipped": "--skip-gpu"}
    [run] = rep["cpu"]["runs"]
    assert run["preset"] == "gpt-char" and run["nproc"] == 1 and run["tokens_per_step"] == 12 * 64
    assert _finite_positive(run["tokens_per_s"]) and _finite_positive(run["step_time_s"]["median"])
    # the same model and batches in plain PyTorch, measured in the same run: the DeepSpeed overhead is its ratio
    [vs] = rep["cpu"]["deepspeed_vs_plain"]
    assert _finite_positive(vs["deepspeed_zero0_step_s"]) and _finite_positive(vs["plain_pytorch_step_s"])
    assert vs["overhead_pct"] == pytest.approx(100 * (vs["deepspeed_zero0_step_s"] / vs["plain_pytorch_step_s"] - 1))
    # both sides trained the same model on the same batches: their last losses agree (the comparison is fair)
    ls = vs["last_losses"]
    assert math.isfinite(ls["deepspeed"]) and ls["deepspeed"] == pytest.approx(ls["plain"], rel=1e-2)


def test_bench_ckpt_smallest(tmp_path):
    out = tmp_path / "ckpt.json"
    proc = run_cli(["bench", "ckpt", "--size-mb", "8", "--workdir", str(tmp_path / "w"), "--output", str(out)],
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["benchmark"] == "ckpt" and r["checkpoint_bytes"] > 8e6  # fp32 weights + Adam moments at least
    for k in ("raw_write_gbps", "raw_read_gbps", "sha256_gbps", "save_gbps", "load_gbps", "load_s",
              "load_verify_s", "load_verify_then_read_s", "launch_to_first_resumed_step_s",
              "launch_to_first_resumed_step_first_build_s", "median_step_s"):
        assert _finite_positive(r[k]), k
    # each speed beside the raw limit measured in the same run
    assert r["load_vs_raw_read"] == pytest.approx(r["load_gbps"] / r["raw_read_gbps"])
    assert r["save_vs_raw_write"] == pytest.approx(r["save_gbps"] / r["raw_write_gbps"])
    assert r["load_gbps"] == pytest.approx(r["checkpoint_bytes"] / r["load_s"] / 1e9)
    assert isinstance(r["async"], dict) and r["async"]
    assert not any((tmp_path / "w").iterdir())  # the benchmark's files are removed unless --keep
