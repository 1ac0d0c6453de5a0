"""`llmscale bench eval`: the report's rates are the ones its per-step times give, on real ranks; the target is
reported, never asserted (performance is measured in benchmarks, not in timed tests)."""
from __future__ import annotations

import json

import pytest

from llmscale.testing import run_cli

pytestmark = pytest.mark.slow


def test_bench_eval_reports_eval_and_training_rates_on_1_and_2_processes(tmp_path):
    out = tmp_path / "eval.json"
    run_cli(["bench", "eval", "--steps", "2", "--warmup", "1", "--micro-batch", "4", "--seq-len", "64",
             "--output", str(out)], timeout=900)
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"1", "2"} and report["target"] == 2.0
    for n, r in report["runs"].items():
        assert r["processes"] == int(n) and r["train"]["steps"] == r["eval"]["steps"] == 2
        assert r["train"]["tokens_per_s"] > 0 and r["eval"]["tokens_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["eval"]["tokens_per_s"] / r["train"]["tokens_per_s"])
        assert r["meets_target"] == (r["ratio"] >= 2.0)
