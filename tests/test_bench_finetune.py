"""``llmscale bench finetune`` end to end with tiny settings (1 and 2 CPU ranks, 2 warm-up + 3 measured steps):
the report's structure and the sanity of its numbers, so the benchmark cannot rot. No timing thresholds."""
from __future__ import annotations

import json
import math

import pytest


@pytest.fixture(scope="module")
def report():
    from llmscale.bench.finetune import run

    return run(nprocs=[1, 2], steps=3, warmup=2)


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_bench_finetune_reports_both_models_on_1_and_2_ranks(report):
    json.dumps(report)  # plain JSON
    assert report["benchmark"] == "finetune" and report["machine"]["cpus"] >= 1
    assert report["steps"] == 3 and report["warmup"] == 2 and report["target_ratio"] == 0.80
    data = report["data"]
    assert data["tokenizer"]["vocab_size"] == 1024
    assert data["pretrain"]["gpt"]["tokenizer_hash"] == data["pretrain"]["bert"]["tokenizer_hash"] == \
        data["tokenizer"]["hash"]
    counts = data["classify"]["label_counts"]
    assert sum(counts.values()) == data["classify"]["examples"] > 1000 and min(counts.values()) > 0

    pad = report["padding"]
    for key in ("classify", "sft_dynamic", "sft_packed"):
        assert 0.0 <= pad[key]["fraction"] < 1.0
        assert pad[key]["fraction"] == pytest.approx(1 - pad[key]["real_tokens"] / pad[key]["padded_tokens"])
    # packing holds the same tokens in fewer, fuller rows
    assert pad["sft_packed"]["real_tokens"] == pad["sft_dynamic"]["real_tokens"]
    assert pad["sft_packed"]["rows"] < pad["sft_dynamic"]["rows"]
    assert pad["sft_packed"]["fraction"] < pad["sft_dynamic"]["fraction"]

    runs = {(r["model"], r["nproc"]): r for r in report["runs"]}
    assert set(runs) == {(m, n) for m in ("bert-tiny-cpu", "gpt-tiny") for n in (1, 2)}
    packed_measured = report["packing_throughput"]["measured"]
    for (model, n), r in runs.items():
        assert r["global_batch_size"] == 16 * n
        pre = r["pretrain"]
        assert pre["tokens_per_step"] == 16 * n * 128  # full windows, weak scaling
        assert _positive(pre["tokens_per_s"]) and 0 < pre["real_tokens_per_s"] <= pre["tokens_per_s"]
        assert _positive(pre["step_time_s"]["median"])
        sides = [r["finetune"]] + ([r["finetune_packed"]] if packed_measured and model == "gpt-tiny" else [])
        for ft in sides:
            for k in ("examples_per_s", "real_tokens_per_s", "padded_tokens_per_s"):
                assert _positive(ft[k]), (model, n, k)
            assert ft["real_tokens_per_s"] <= ft["padded_tokens_per_s"]
            assert 0.0 <= ft["padding_fraction"] < 1.0
            step = ft["per_step"]
            assert step["real_tokens"] <= step["padded_tokens"] <= 16 * n * 128
            assert set(ft["breakdown_s"]) == {"data", "forward", "backward", "optimizer", "comm"}
            assert ft["breakdown_s"]["forward"] > 0 and ft["breakdown_s"]["backward"] > 0
        if model == "bert-tiny-cpu":
            assert r["finetune"]["per_step"]["examples"] == 16 * n == r["finetune"]["per_step"]["targets"]
        else:
            ft = r["finetune"]
            assert _positive(ft["target_tokens_per_s"]) and ft["target_tokens_per_s"] < ft["real_tokens_per_s"]
            if packed_measured:  # several examples per row
                assert r["finetune_packed"]["per_step"]["examples"] > 16 * n
            else:
                assert r["finetune_packed"]["real_tokens_per_s"] is None and r["finetune_packed"]["skipped"]

    ratios = report["ratios"]
    assert len(ratios) == 2 * 3  # per process count: classify, SFT dynamic, SFT packed
    for q in ratios:
        r = runs[(q["model"], q["nproc"])]
        assert q["pretrain_tokens_per_s"] == r["pretrain"]["tokens_per_s"]
        side = r["finetune"] if q["variant"] == "dynamic padding" else r["finetune_packed"]
        if q["ratio"] is None:
            assert q["variant"] == "packing" and not packed_measured and q["skipped"]
            continue
        assert q["finetune_real_tokens_per_s"] == side["real_tokens_per_s"]
        assert q["ratio"] == pytest.approx(side["real_tokens_per_s"] / r["pretrain"]["tokens_per_s"])
        assert q["meets_target"] == (q["ratio"] >= q["target"]) and q["target"] == 0.80
