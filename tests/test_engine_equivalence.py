"""Every parallel layout trains the same model to the same numbers (multi-process, gloo, CPU).

From the same seed and the same fixed synthetic token batches (global batch 8, 10 steps), a single
rank and each layout — DP=2 with ZeRO 0/1/2/3, ZeRO-2 with CPU optimizer offload, TP=2, PP=2, TP2xPP2
and DP2xTP2xPP2 (8 processes) — must give the same per-step losses and gradient norms, the same
consolidated weights (``full_state_dict``) and the same evaluation loss.

Tolerance: relative 1e-5 on losses, 5e-5 on gradient norms, absolute 1e-4 on weights. Everything runs
in fp32; the layouts differ only in floating-point reduction order (gradient all-reduce over ranks vs.
summation inside one matmul, micro-batch accumulation order, split matmuls summed by the tensor-parallel
all-reduce), which moves results by a few ulps (~1e-7 relative) per step. Measured over 10 steps at
lr 1e-2 with clipping active (grad_clip=1.0 is below most norms): losses <= 2e-7, gradient norms <= 6e-6
(a norm also sums the small, noise-dominated gradient entries that AdamW's division by sqrt(v) turns
into full-size steps), weights <= 2e-5. A real bug — a gradient counted twice, a missing tied-weight
all-reduce, a wrong shard, a frozen parameter trained — moves the second step's loss or norm by >1e-3
(the frozen-bias bug this test found moved weights by 6e-5 and norms by 3e-4).

Each layout initialises identical weights: the full model is built from the seed on every rank and
then split (tensor-parallel slices cut from the full weights, pipeline stages share the full model's
modules via LayerDef).
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from llmscale.testing import run_distributed

pytestmark = pytest.mark.slow

STEPS = 10
SEQ = 32
VOCAB = 100
GLOBAL_BATCH = 8
MICRO = 2
RTOL = 1e-5  # losses (measured <= 2e-7)
NTOL = 5e-5  # gradient norms (measured <= 6e-6)
WTOL = 1e-4  # weights, absolute (measured <= 2e-5; one step moves a weight by up to lr = 1e-2)


def _cfg(parallel: dict, *, family: str = "gpt", nan_policy: str = "skip"):
    from llmscale.config import RunConfig, from_dict

    model = {"family": family, "n_layers": 2, "d_model": 64, "n_heads": 4, "vocab_size": VOCAB, "max_seq_len": SEQ,
             "dropout": 0.0}
    if family == "bert":
        model.update(norm_position="post", tie_embeddings=True)
    raw = {
        "data": {"seq_len": SEQ, "format": "bert" if family == "bert" else "gpt"},
        "model": model,
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0, "weight_decay": 0.1},
        "train": {"steps": STEPS, "seed": 7, "precision": "fp32", "nan_policy": nan_policy},
        "parallel": {"global_batch_size": GLOBAL_BATCH, "micro_batch_size": MICRO, **parallel},
    }
    return from_dict(RunConfig, raw)


def _gpt_batches(step: int) -> torch.Tensor:
    """The global batch of optimizer step ``step``: [GLOBAL_BATCH, SEQ + 1] tokens from a fixed seed."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=g)
    stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=g)  # learnable: next = token + stride (mod V)
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


def _gpt_micro(rows: torch.Tensor) -> dict:
    labels = rows[:, 1:].clone()
    labels[0, :3] = -100  # some ignored targets, unevenly spread
    return {"input_ids": rows[:, :-1].contiguous(), "labels": labels, "sample_ids": torch.arange(len(rows))}


def _bert_micro(step: int, rows: slice) -> dict:
    g = torch.Generator().manual_seed(5000 + step)
    start = torch.randint(0, VOCAB - 7, (GLOBAL_BATCH, 1), generator=g)
    stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=g)  # learnable from the neighbours
    ids = 7 + (start + stride * torch.arange(SEQ)) % (VOCAB - 7)  # no special ids
    labels = torch.full_like(ids, -100)
    pick = torch.rand(ids.shape, generator=g) < 0.15
    pick[:, 1] = True  # at least one target per row
    labels[pick] = ids[pick]
    ids = ids.masked_fill(pick, 6)
    ttype = torch.zeros_like(ids)
    ttype[:, SEQ // 2:] = 1
    mask = torch.ones_like(ids)
    mask[:, -4:] = 0
    labels[:, -4:] = -100
    return {"input_ids": ids[rows], "token_type_ids": ttype[rows], "attention_mask": mask[rows],
            "labels": labels[rows], "sample_ids": torch.arange(GLOBAL_BATCH)[rows]}


def _my_micro_batches(family: str, step: int, dp_rank: int, dp_size: int) -> list[dict]:
    per = GLOBAL_BATCH // dp_size
    lo = dp_rank * per
    if family == "bert":
        return [_bert_micro(step, slice(s, s + MICRO)) for s in range(lo, lo + per, MICRO)]
    rows = _gpt_batches(step)[lo:lo + per]
    return [_gpt_micro(c) for c in rows.split(MICRO)]


def _build_model(cfg):
    from llmscale.models import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    for name, p in model.named_parameters():
        if _KEY_BIAS.search(name):
            p.requires_grad_(False)  # see _KEY_BIAS; frozen, it also exercises frozen parameters in every layout
    return model


def _train_job(rank, world_size, parallel, family, steps, eval_step, nan_at, ckpt_dir=None, resume_at=None,
               nan_policy="skip"):
    """Train ``steps`` steps; return per-step (loss, grad_norm, skipped), eval loss and the consolidated weights.
    With ``ckpt_dir``: save before step ``resume_at``, and at the end load that checkpoint into the same engine and
    replay the remaining steps (their losses must repeat exactly)."""
    from llmscale.dist import discover_world, shutdown
    from llmscale.engine import build_engine
    from llmscale.parallel import plan_run

    cfg = _cfg(parallel, family=family, nan_policy=nan_policy)
    plan = plan_run(cfg, world_size)
    engine = build_engine(cfg, _build_model(cfg), world=discover_world(), plan=plan)
    hist = []
    before = after = None
    for step in range(steps):
        if ckpt_dir is not None and step == resume_at:
            engine.save(f"{ckpt_dir}/step{step}", {"step": step})
        mbs = _my_micro_batches(family, step, engine.dp_rank, engine.dp_size)
        if nan_at is not None and step == nan_at[0] and rank == nan_at[1]:
            before = engine.full_state_dict()
            res = _poisoned_step(engine, mbs)
            after = engine.full_state_dict()
        else:
            if nan_at is not None and step == nan_at[0]:
                before = engine.full_state_dict()
                res = engine.train_step(mbs)
                after = engine.full_state_dict()
            else:
                res = engine.train_step(mbs)
        hist.append((res.loss, res.grad_norm, res.skipped, res.lr, sorted(res.timings)))
    # evaluation: this rank's whole share of a global batch as one batch (the union over DP = the global batch)
    parts = _my_micro_batches(family, eval_step, engine.dp_rank, engine.dp_size)
    ev = engine.eval_loss({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    sd = engine.full_state_dict()
    replay = None
    if ckpt_dir is not None:
        client = engine.load(f"{ckpt_dir}/step{resume_at}")
        assert client["step"] == resume_at and engine.global_step == resume_at, (client.get("step"), engine.global_step)
        replay = [engine.train_step(_my_micro_batches(family, s, engine.dp_rank, engine.dp_size)).loss
                  for s in range(resume_at, steps)]
    unchanged = None
    if before is not None and rank == 0:
        unchanged = max(float((before[k] - after[k]).abs().max()) for k in before)
    shutdown()
    # numpy: torch tensors would travel through shared memory that dies with this process
    sd = {k: v.numpy() for k, v in sd.items()} if rank == 0 else None
    return {"hist": hist, "eval": ev, "sd": sd, "unchanged": unchanged, "replay": replay,
            "uc_info": engine.universal_checkpoint_info() if rank == 0 else None,
            "layout": (engine.layout.dp, engine.layout.tp, engine.layout.pp, engine.layout.dp_rank)}


def _poisoned_step(engine, mbs):
    """One step whose first forward on this rank produces NaN (a hook on the model), the others are clean."""
    module = engine.ds.module
    fired = []

    def hook(mod, args, out):
        if not fired:
            fired.append(1)
            return out * float("nan")
        return out

    target = next(m for m in module.modules() if isinstance(m, torch.nn.LayerNorm))
    h = target.register_forward_hook(hook)
    try:
        return engine.train_step(mbs)
    finally:
        h.remove()


def _run(world, parallel, family="gpt", steps=STEPS, nan_at=None, ckpt_dir=None, resume_at=6, nan_policy="skip"):
    return run_distributed(_train_job, world, timeout=600,
                           args=(parallel, family, steps, steps + 1, nan_at, ckpt_dir, resume_at, nan_policy))


def _assert_resumed(got, what):
    """Loading the step-6 checkpoint into the engine and replaying steps 6..9 repeats their losses exactly."""
    assert got["replay"] == [h[0] for h in got["hist"][6:]], f"{what}: resumed losses differ"


# The attention key bias has a mathematically zero gradient (adding b_k shifts every score of a query by
# the same q.b_k, and softmax ignores shifts); AdamW turns its rounding noise into +-lr steps whose sign
# depends on reduction order and then feeds back through rounding (measured: 1e-5 loss drift by step 10
# with it trainable, 1e-7 without). The tests freeze it.
_KEY_BIAS = re.compile(r"attn\.k_proj\.bias$")

_REF: dict = {}


def _reference(family="gpt"):
    if family not in _REF:
        _REF[family] = _run(1, {}, family)[0]
    return _REF[family]


def _assert_same(ref, got, what):
    for step, (a, b) in enumerate(zip(ref["hist"], got["hist"])):
        assert not b[2], f"{what}: step {step} was skipped"
        assert math.isclose(a[0], b[0], rel_tol=RTOL), f"{what}: step {step} loss {b[0]} != single-rank {a[0]}"
        assert math.isclose(a[1], b[1], rel_tol=NTOL), f"{what}: step {step} grad norm {b[1]} != single-rank {a[1]}"
        assert a[3] == b[3], f"{what}: lr differs at step {step}"
    assert math.isclose(ref["eval"][0], got["eval"][0], rel_tol=RTOL) and ref["eval"][1] == got["eval"][1], \
        f"{what}: eval {got['eval']} != {ref['eval']}"
    assert set(ref["sd"]) == set(got["sd"]), f"{what}: state dict keys differ: {set(ref['sd']) ^ set(got['sd'])}"
    diffs = {}
    for k, v in ref["sd"].items():
        assert got["sd"][k].shape == v.shape, f"{what}: {k} shape {tuple(got['sd'][k].shape)} != {tuple(v.shape)}"
        diffs[k] = float(abs(got["sd"][k] - v).max())
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= WTOL, f"{what}: weight {worst} differs by {diffs[worst]}"


def test_reference_run_learns_and_clips():
    ref = _reference()
    losses = [h[0] for h in ref["hist"]]
    assert losses[-1] < losses[0] - 0.3, losses  # it trains
    assert max(h[1] for h in ref["hist"]) > 1.0  # grad_clip=1.0 is active in some steps
    assert all(h[4] == ["backward", "comm", "data", "forward", "optimizer"] for h in ref["hist"])
    sd = ref["sd"]
    model = _build_model(_cfg({}))
    assert set(sd) == set(model.state_dict())  # single-device names


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_data_parallel_zero_stages(stage, tmp_path):
    got = _run(2, {"zero_stage": stage}, ckpt_dir=str(tmp_path) if stage in (1, 3) else None)
    _assert_same(_reference(), got[0], f"DP=2 ZeRO-{stage}")
    assert [g["layout"][3] for g in got] == [0, 1]
    if stage in (1, 3):
        _assert_resumed(got[0], f"DP=2 ZeRO-{stage}")


def test_zero2_optimizer_offload():
    _assert_same(_reference(), _run(2, {"zero_stage": 2, "offload_optimizer": True})[0], "DP=2 ZeRO-2 offload")


def test_tensor_parallel(tmp_path):
    got = _run(2, {"tensor_parallel": 2, "zero_stage": 1}, ckpt_dir=str(tmp_path))[0]
    _assert_same(_reference(), got, "TP=2 ZeRO-1")
    _assert_resumed(got, "TP=2 ZeRO-1")
    info = got["uc_info"]
    assert "^blocks\\.0\\.attn\\.o_proj\\.weight$" in info["parameter_with_row_parallelism_patterns"]
    assert "^blocks\\.0\\.attn\\.o_proj\\.bias$" in info["tp_replicated_parameter_patterns"]
    assert "^tok_embed\\.weight$" in info["tp_replicated_parameter_patterns"]
    assert not any("q_proj" in p for p in info["tp_replicated_parameter_patterns"])  # column-split: default dim 0


def test_pipeline_parallel(tmp_path):
    got = _run(2, {"pipeline_parallel": 2}, ckpt_dir=str(tmp_path))[0]
    _assert_same(_reference(), got, "PP=2")
    _assert_resumed(got, "PP=2")
    info = got["uc_info"]
    assert info["pipeline_replicated_parameter_patterns"] == ["^tied_modules\\.embed\\.inner\\.weight$"]
    assert info["llmscale_param_names"]["tied_modules.embed.inner.weight"] == "tok_embed.weight"


def test_tensor_times_pipeline(tmp_path):
    got = _run(4, {"tensor_parallel": 2, "pipeline_parallel": 2}, ckpt_dir=str(tmp_path))[0]
    _assert_same(_reference(), got, "TP=2 x PP=2")
    _assert_resumed(got, "TP=2 x PP=2")


def test_dp_tp_pp_eight_processes():
    got = _run(8, {"tensor_parallel": 2, "pipeline_parallel": 2, "zero_stage": 1}, steps=STEPS)
    _assert_same(_reference(), got[0], "DP=2 x TP=2 x PP=2 ZeRO-1")
    # every rank reports the same loss (broadcast from the last stage / averaged over DP)
    assert all(g["hist"][-1][0] == got[0]["hist"][-1][0] for g in got)


@pytest.mark.parametrize("parallel", [{"zero_stage": 0}, {"zero_stage": 2}, {"pipeline_parallel": 2}])
def test_non_finite_step_skipped_on_every_rank(parallel):
    """Rank 1 gets a NaN forward at step 1: every rank skips that update (weights bit-identical), reports
    skipped=True, and training continues finitely."""
    got = _run(2, parallel, steps=3, nan_at=(1, 1))
    for g in got:
        skipped = [h[2] for h in g["hist"]]
        assert skipped == [False, True, False], (parallel, skipped)
        assert math.isfinite(g["hist"][2][0])
    assert got[0]["unchanged"] == 0.0


def _bert_reference():
    return _reference("bert")


@pytest.mark.parametrize("parallel", [{"zero_stage": 1}, {"pipeline_parallel": 2}])
def test_bert_through_the_engine(parallel):
    """BERT (post-norm, MLM on padded batches with token types and attention masks travelling between stages)."""
    ref = _bert_reference()
    assert all(math.isfinite(h[0]) for h in ref["hist"]) and ref["eval"][1] > 0
    _assert_same(ref, _run(2, parallel, family="bert")[0], f"BERT {parallel}")


def test_non_finite_step_raises_with_policy_raise():
    """train.nan_policy=raise: the step with a NaN on rank 0 raises NonFiniteError (on every rank, so none hangs)."""
    from llmscale.testing import DistributedTestError

    with pytest.raises(DistributedTestError, match=r"NonFiniteError: step 1: non-finite loss nan.*nan_policy=raise"):
        _run(2, {"zero_stage": 1}, steps=2, nan_at=(1, 0), nan_policy="raise")
