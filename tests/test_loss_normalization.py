"""Fine-tuning's loss normalisation (``build_engine(..., loss_over="step_targets")``): every target of an optimizer
step weighs the same, so micro-batch 4 x accumulation 1, micro-batch 1 x accumulation 4 and DP=2 give the same
loss, gradient norm and weights on variable-length data (padding targets -100 in different amounts per row).
The default, per-micro-batch mean, does not: the test shows that too, so it can tell the two apart."""
from __future__ import annotations

import pytest
import torch

from llmscale.testing import run_distributed

pytestmark = pytest.mark.slow

SEQ, VOCAB, GLOBAL, STEPS = 16, 64, 4, 3


def _cfg(micro: int, zero_stage: int):
    from llmscale.config import RunConfig, from_dict

    return from_dict(RunConfig, {
        "data": {"seq_len": SEQ},
        "model": {"family": "gpt", "n_layers": 2, "d_model": 32, "n_heads": 2, "vocab_size": VOCAB, "max_seq_len": SEQ},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 0, "grad_clip": 0.0, "weight_decay": 0.0},
        "train": {"steps": STEPS, "seed": 3, "precision": "fp32"},
        "parallel": {"global_batch_size": GLOBAL, "micro_batch_size": micro, "zero_stage": zero_stage},
    })


def _global_batch(step: int) -> dict:
    """GLOBAL rows with 2..SEQ real targets each (the rest -100): very different counts per row."""
    g = torch.Generator().manual_seed(500 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (GLOBAL, SEQ), generator=g)
    keep = torch.tensor([2, SEQ, 5, 11])[torch.randperm(GLOBAL, generator=g)]
    labels[torch.arange(SEQ)[None, :] >= keep[:, None]] = -100
    return {"input_ids": ids, "labels": labels}


def _job(rank, world_size, micro, loss_over, zero_stage):
    from llmscale.dist import discover_world, shutdown
    from llmscale.engine import build_engine
    from llmscale.models import build_model
    from llmscale.parallel import plan_run

    cfg = _cfg(micro, zero_stage)
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(cfg, build_model(cfg.model), world=discover_world(), plan=plan_run(cfg, world_size),
                          loss_over=loss_over)
    share = GLOBAL // world_size
    hist = []
    for step in range(STEPS):
        gb = _global_batch(step)
        mine = {k: v[rank * share:(rank + 1) * share] for k, v in gb.items()}
        mbs = [{k: v[i:i + micro] for k, v in mine.items()} for i in range(0, share, micro)]
        res = engine.train_step(mbs)
        hist.append((res.loss, res.grad_norm))
    sd = engine.full_state_dict()
    shutdown()
    return {"hist": hist, "sd": {k: v.numpy() for k, v in sd.items()} if rank == 0 else None}


def _runs(loss_over: str, zero_stage: int = 0):
    return {
        "micro4": run_distributed(_job, 1, args=(4, loss_over, zero_stage), timeout=600)[0],
        "micro1x4": run_distributed(_job, 1, args=(1, loss_over, zero_stage), timeout=600)[0],
        "dp2": run_distributed(_job, 2, args=(1, loss_over, zero_stage), timeout=600)[0],
    }


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_step_targets_normalisation_is_the_same_for_every_split(zero_stage):
    runs = _runs("step_targets", zero_stage)
    ref = runs["micro4"]
    # the first step's loss is total nats over all targets / their count, whatever the split
    from llmscale.models import build_model

    cfg = _cfg(4, zero_stage)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    gb = _global_batch(0)
    with torch.no_grad():
        logits = model(gb["input_ids"]).logits
    nats = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), gb["labels"].reshape(-1), ignore_index=-100,
                                             reduction="sum")
    assert ref["hist"][0][0] == pytest.approx(float(nats) / int((gb["labels"] != -100).sum()), rel=1e-5)
    for name in ("micro1x4", "dp2"):
        for (la, na), (lb, nb) in zip(ref["hist"], runs[name]["hist"]):
            assert lb == pytest.approx(la, rel=1e-6, abs=1e-7), name
            assert nb == pytest.approx(na, rel=1e-5), name
        for k, v in ref["sd"].items():
            if k.endswith("attn.k_proj.bias"):
                # its true gradient is 0 (softmax ignores a shift shared by all keys): AdamW scales the rounding
                # noise of 0 up to full-size steps, so it is compared nowhere (tests/test_engine_equivalence.py)
                continue
            assert abs(runs[name]["sd"][k] - v).max() < 1e-5, (name, k)


def test_per_micro_batch_mean_differs_on_variable_lengths():
    """The default weighs each micro-batch's mean equally: another split gives another loss and gradient."""
    runs = _runs("micro_batch")
    a, b = runs["micro4"]["hist"][0], runs["micro1x4"]["hist"][0]
    assert abs(a[0] - b[0]) > 1e-3 and abs(a[1] - b[1]) / a[1] > 1e-3
