"""Models: causality, padding invariance, exact parameter counts, FLOPs, loss at init, overfitting,
pipeline layer lists, activation checkpointing, tensor-parallel splits, bf16 autocast."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmscale.config import ConfigError, ModelConfig, from_dict
from llmscale.models import build_model
from llmscale.models.flops import embedding_count, param_count
from llmscale.models.layers import TP_PLAN
from llmscale.models.pipeline import full_names, run_layers
from llmscale.models.presets import PRESETS, REFERENCE_VOCAB

torch.set_num_threads(1)
V = 97  # a vocabulary that is not a power of two


def cfg_of(**kw) -> ModelConfig:
    base = dict(family="gpt", n_layers=2, d_model=32, n_heads=4, max_seq_len=64)
    return from_dict(ModelConfig, {**base, **kw})


GPT_VARIANTS = {
    "gpt2": dict(),
    "rope-swiglu-rms": dict(position="rope", activation="swiglu", norm="rmsnorm", bias=False, tie_embeddings=False),
    "gqa": dict(position="rope", activation="swiglu", norm="rmsnorm", bias=False, n_kv_heads=2),
    "mqa-learned-untied": dict(n_kv_heads=1, tie_embeddings=False),
    "layernorm-nobias": dict(bias=False),
}
BERT_VARIANTS = {
    "post": dict(family="bert", norm_eps=1e-12, norm_position="post"),
    "pre-untied": dict(family="bert", norm_position="pre", tie_embeddings=False),
    "post-nsp": dict(family="bert", norm_position="post", nsp_head=True),
    "swiglu-rms-nobias-nsp": dict(family="bert", activation="swiglu", norm="rmsnorm", bias=False, nsp_head=True),
}
LSTM_VARIANTS = {"lstm": dict(family="lstm"),
                 "lstm-untied-nobias": dict(family="lstm", tie_embeddings=False, bias=False)}
ALL = {**GPT_VARIANTS, **BERT_VARIANTS, **LSTM_VARIANTS}


def make(name: str, seed: int = 0, **extra) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg_of(**{**ALL[name], **extra}), vocab_size=V)


def bert_batch(B=3, T=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, V, (B, T), generator=g)
    types = torch.zeros_like(ids)
    types[:, T // 2:] = 1
    mask = torch.ones_like(ids)
    mask[1, T - 5:] = 0
    return ids, types, mask


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("name", list(GPT_VARIANTS))
def test_gpt_is_causal(name):
    model = make(name).eval()
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(3))
    k = 11
    changed = ids.clone()
    changed[:, k] = (changed[:, k] + 1) % V
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :k], b[:, :k], rtol=0, atol=1e-6)
    assert (a[:, k:] - b[:, k:]).abs().max() > 1e-4, "changing a token must change its own and later logits"


@pytest.mark.parametrize("name", ["post", "pre-untied", "post-nsp"])
def test_bert_padding_does_not_change_real_tokens(name):
    model = make(name).eval()
    ids, types, _ = bert_batch(B=2, T=12)
    pad = 5
    ids_p = torch.cat([ids, torch.zeros(2, pad, dtype=torch.long)], dim=1)
    types_p = torch.cat([types, torch.zeros(2, pad, dtype=torch.long)], dim=1)
    mask_p = torch.cat([torch.ones(2, 12, dtype=torch.long), torch.zeros(2, pad, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ref = model(ids, token_type_ids=types)
        padded = model(ids_p, token_type_ids=types_p, attention_mask=mask_p)
        unmasked = model(ids_p, token_type_ids=types_p)
    torch.testing.assert_close(padded.logits[:, :12], ref.logits, rtol=0, atol=1e-5)
    assert (unmasked.logits[:, :12] - ref.logits).abs().max() > 1e-4, "without the mask the pads must leak in"
    if ref.nsp_logits is not None:
        torch.testing.assert_close(padded.nsp_logits, ref.nsp_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(ALL))
def test_loss_at_init_is_ln_vocab(name):
    model = make(name, vocab_size=None).eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (4, 32), generator=g)
    # targets independent of the inputs: a tied head at init favours the input token itself (the residual
    # stream still holds its embedding), so labels=ids would read below ln(V)
    labels = torch.randint(0, V, (4, 32), generator=g)
    with torch.no_grad():
        out = model(ids, labels=labels)
    assert abs(out.loss.item() - math.log(V)) < 0.3, (out.loss.item(), math.log(V))
    assert out.num_targets.item() == ids.numel()
    # a BERT with labels decodes only the labelled rows, (N, V); here every position is labelled
    assert out.logits.shape == ((4 * 32, V) if model.config.family == "bert" else (4, 32, V))


def test_ignored_labels_and_nsp_loss():
    model = make("post-nsp").eval()
    ids, types, mask = bert_batch()
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    nsl = torch.tensor([0, 1, 0])
    out = model(ids, token_type_ids=types, attention_mask=mask, labels=labels, next_sentence_label=nsl)
    assert out.num_targets.item() == 3
    # only the 3 masked rows are decoded, and they are the full decode's rows at those positions
    full = model(ids, token_type_ids=types, attention_mask=mask).logits  # (B, T, V)
    assert out.logits.shape == (3, full.size(-1))
    torch.testing.assert_close(out.logits, full[:, 3], rtol=0, atol=1e-5)
    expect_mlm = F.cross_entropy(full[:, 3].float(), ids[:, 3])
    torch.testing.assert_close(out.mlm_loss, expect_mlm)
    torch.testing.assert_close(out.nsp_loss, F.cross_entropy(out.nsp_logits, nsl))
    torch.testing.assert_close(out.loss, out.mlm_loss + out.nsp_loss)
    none = model(ids, labels=torch.full_like(ids, -100))
    assert none.loss.item() == 0.0 and none.num_targets.item() == 0  # finite, not NaN
    with pytest.raises(ValueError, match="nsp_head"):
        make("post")(ids, next_sentence_label=nsl)


@pytest.mark.parametrize("name", ["gpt2", "gqa", "post"])
def test_tiny_model_overfits_one_batch(name):
    model = make(name, dropout=0.0)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(7, V, (4, 24), generator=g)
    kw = {}
    if model.config.family == "bert":
        labels = ids.clone()
        kw = dict(attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
        inputs = ids.clone()
        inputs[:, ::3] = 6  # mask every third token; predict it from context
        labels[:, 1::3] = -100
    else:
        inputs, labels = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(300):  # noqa: B007 - reported in the assertion message
        loss = model(inputs, labels=labels, **kw).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.1, f"{name}: loss {loss.item():.3f} after {step + 1} steps"


def test_lstm_trains():
    model = make("lstm")
    ids = torch.randint(0, V, (4, 33), generator=torch.Generator().manual_seed(9))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    first = None
    for _ in range(200):
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0 and loss.item() < 0.5, (first, loss.item())


# --------------------------------------------------------------------------- counting


@pytest.mark.parametrize("name", list(ALL))
def test_num_params_is_closed_form(name):
    model = make(name)
    cfg = model.config
    assert model.num_params() == sum(p.numel() for p in model.parameters()) == param_count(cfg)
    assert model.num_params(exclude_embeddings=True) == param_count(cfg) - embedding_count(cfg)
    tied = cfg.tie_embeddings
    names = set(model.state_dict())
    assert ("lm_head.weight" in names or "mlm_head.decoder.weight" in names) != tied


# Published counts: transformers' GPT2LMHeadModel (gpt2 / -medium / -large / -xl), BertForMaskedLM
# (bert-base/large-uncased, vocab 30522), LlamaForCausalLM of TinyLlama-1.1B (vocab 32000).
PUBLISHED = {
    "gpt2-124m": 124_439_808, "gpt2-350m": 354_823_168, "gpt2-774m": 774_030_080, "gpt2-1.5b": 1_557_611_200,
    "llama-1b": 1_100_048_384, "bert-base": 109_514_298, "bert-large": 335_174_458,
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_counts(preset):
    cfg = from_dict(ModelConfig, {"preset": preset})
    assert cfg.family == PRESETS[preset]["family"]
    with torch.device("meta"):  # no memory, no init cost: the 1.5B model builds in milliseconds
        model = build_model(cfg, vocab_size=REFERENCE_VOCAB[preset])
    assert model.num_params() == param_count(model.config)
    if preset in PUBLISHED:
        assert model.num_params() == PUBLISHED[preset]


def test_flops_per_token_formula():
    for name in ("gpt2", "gqa", "post-nsp", "lstm"):
        model = make(name)
        cfg, T = model.config, 48
        linear = sum(m.weight.numel() for n, m in model.named_modules()
                     if isinstance(m, nn.Linear) and not n.startswith("nsp_head"))
        head = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
        if cfg.family == "lstm":
            linear += sum(p.numel() for n, p in model.lstm.named_parameters() if n.startswith("weight"))
        nsp = (sum(m.weight.numel() for m in model.nsp_head.modules() if isinstance(m, nn.Linear)) / T
               if cfg.nsp_head else 0)
        attn = 0 if cfg.family == "lstm" else 12 * cfg.n_layers * cfg.d_model * T
        assert model.flops_per_token(T) == pytest.approx(6 * (linear + head + nsp) + attn, rel=1e-12), name
    # gpt2-124m at T=1024: 6 * (85.0M matmul + 38.6M head) + 12*12*768*1024 (the familiar ~0.85 GFLOP/token)
    with torch.device("meta"):
        m = build_model(from_dict(ModelConfig, {"preset": "gpt2-124m"}), vocab_size=50257)
    assert m.flops_per_token(1024) == 6 * (12 * 12 * 768 * 768 + 50257 * 768) + 12 * 12 * 768 * 1024


def test_vocab_resolution_errors():
    with pytest.raises(ConfigError, match="vocab_size is unknown"):
        build_model(cfg_of())
    with pytest.raises(ConfigError, match="smaller than the dataset"):
        build_model(cfg_of(vocab_size=50), vocab_size=100)
    assert build_model(cfg_of(vocab_size=128), vocab_size=100).config.vocab_size == 128  # padded vocab is kept
    with pytest.raises(ConfigError, match="unknown"):
        from_dict(ModelConfig, {"preset": "gpt9"})


def test_sequence_longer_than_max_seq_len_is_an_error():
    model = make("gpt2")
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


# --------------------------------------------------------------------------- parallel views


def _inputs_for(model, ids, types, mask):
    return (ids, types, mask) if model.config.family == "bert" else (ids,)


@pytest.mark.parametrize("name", list(ALL))
def test_pipeline_layers_reproduce_forward(name):
    model = make(name).eval()
    ids, types, mask = bert_batch()
    if model.config.family != "bert":
        mask = None
    layers = model.pipeline_layers()
    kw = dict(token_type_ids=types, attention_mask=mask) if model.config.family == "bert" else {}
    with torch.no_grad():
        ref = model(ids, **kw)
        got = run_layers(layers, _inputs_for(model, ids, types, mask))
    if model.config.nsp_head:
        assert torch.equal(got[0], ref.logits) and torch.equal(got[1], ref.nsp_logits)
    else:
        assert torch.equal(got, ref.logits)
    # every parameter appears in exactly one layer (tied: in one module shared by the tied layers),
    # under its full-model name
    state = model.state_dict()
    seen: dict[int, str] = {}
    by_key: dict[str, nn.Module] = {}
    for layer in layers:
        if layer.tie_key is not None:
            assert by_key.setdefault(layer.tie_key, layer.module) is layer.module
        for local, full in full_names(layer).items():
            p = dict(layer.module.named_parameters())[local]
            assert state[full].data_ptr() == p.data_ptr(), (layer.name, local, full)
            assert seen.setdefault(id(p), full) == full
    assert len(seen) == len(list(model.parameters()))
    if model.config.tie_embeddings:
        assert [ly.name for ly in layers if ly.tie_key == "embed"][0] == "tok_embed"
        assert sum(ly.tie_key == "embed" for ly in layers) == 2


def test_pipeline_layers_train_like_forward():
    model = make("gqa")
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = run_layers(model.pipeline_layers(), (ids[:, :-1],))
    F.cross_entropy(logits.float().reshape(-1, V), ids[:, 1:].reshape(-1)).backward()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, ref[n]), n


@pytest.mark.parametrize("name", ["gpt2", "gqa", "post-nsp"])
def test_activation_checkpointing_gives_identical_gradients(name):
    ids, types, mask = bert_batch()
    grads = []
    for ckpt in (False, True):
        model = make(name, seed=4, dropout=0.1, activation_checkpointing=ckpt).train()
        torch.manual_seed(11)  # same dropout masks; checkpoint replays the RNG state in its recompute
        if model.config.family == "bert":
            out = model(ids, token_type_ids=types, attention_mask=mask, labels=ids,
                        next_sentence_label=torch.tensor([0, 1, 1]))
        else:
            out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0, msg=n)


def test_tp_plan_names_the_projections():
    model = make("gqa")
    import re

    hits = {n: k for n, m in model.named_modules() for rx, k in TP_PLAN.items() if re.fullmatch(rx, n)}
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in hits)
    assert len(hits) == model.config.n_layers * 7  # q, k, v, o, gate, up, down
    assert model.tp_plan() == TP_PLAN and make("post").tp_plan() == TP_PLAN and make("lstm").tp_plan() == {}


@pytest.mark.parametrize("name", ["gpt2", "gqa", "post"])
def test_column_row_split_reproduces_a_block(name):
    """Split q/k/v/gate/up by output rows and o/down by input columns over 2 simulated ranks: each shard
    infers its own head count from the projection width, and the summed row-parallel outputs equal the
    full block's attention and MLP outputs."""
    model = make(name).eval()
    block = model.blocks[0]
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(2))
    key_mask = torch.ones(2, 10, dtype=torch.bool) if model.config.family == "bert" else None
    if key_mask is not None:
        key_mask[1, 7:] = False
    tp = 2
    for sub, cols, rows in ((block.attn, ["q_proj", "k_proj", "v_proj"], ["o_proj"]),
                            (block.mlp, ["gate_proj", "up_proj"], ["down_proj"])):
        with torch.no_grad():
            full = sub(x, key_mask=key_mask) if sub is block.attn else sub(x)
            total = 0
            for r in range(tp):
                shard = copy.deepcopy(sub)
                for name_ in cols:
                    lin = getattr(shard, name_, None)
                    if lin is None:
                        continue
                    n = lin.out_features // tp
                    new = nn.Linear(lin.in_features, n, bias=lin.bias is not None)
                    new.weight.copy_(lin.weight[r * n:(r + 1) * n])
                    if lin.bias is not None:
                        new.bias.copy_(lin.bias[r * n:(r + 1) * n])
                    setattr(shard, name_, new)
                for name_ in rows:
                    lin = getattr(shard, name_)
                    n = lin.in_features // tp
                    new = nn.Linear(n, lin.out_features, bias=lin.bias is not None)
                    new.weight.copy_(lin.weight[:, r * n:(r + 1) * n])
                    if lin.bias is not None:
                        new.bias.copy_(lin.bias if r == 0 else torch.zeros_like(lin.bias))
                    setattr(shard, name_, new)
                total = total + (shard(x, key_mask=key_mask) if sub is block.attn else shard(x))
        torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "gqa", "post-nsp"])
def test_bf16_autocast_is_safe(name):
    model = make(name)
    ids, types, mask = bert_batch()
    kw = dict(labels=ids)
    if model.config.family == "bert":
        kw.update(token_type_ids=types, attention_mask=mask, next_sentence_label=torch.tensor([1, 0, 1]))
    with torch.no_grad():
        ref = model(ids, **kw).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, **kw)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    out.loss.backward()
    assert torch.isfinite(out.loss) and abs(out.loss.item() - ref.item()) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_models_never_import_deepspeed():
    import subprocess
    import sys

    code = ("import sys, llmscale.models, llmscale.models.gpt, llmscale.models.bert, llmscale.models.lstm, "
            "llmscale.models.generate; sys.exit(int('deepspeed' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_bench_model_reports_throughput(tmp_path):
    from llmscale.bench import model as bench

    res = bench.run(presets=["gpt-tiny", "bert-tiny-cpu"], seq_len=32, batch=2, steps=2, warmup=1, device="cpu")
    assert [r["preset"] for r in res["results"]] == ["gpt-tiny", "bert-tiny-cpu"]
    for r in res["results"]:
        assert r["tokens_per_s"] > 0 and r["tokens_per_step"] == 64 and r["mfu"] is None
        assert r["achieved_tflops"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / 1e12, rel=1e-2,
                                                     abs=1e-4)
        assert math.isfinite(r["loss"])
        # the same-run limit: the achieved rate over the measured square-matmul rate (a ratio, not a timing
        # threshold: on a shared machine either side may be disturbed)
        achieved = r["flops_per_token"] * r["tokens_per_s"] / 1e12  # unrounded
        assert r["of_measured_matmul"] == pytest.approx(achieved / res["measured_matmul"]["tflops"], rel=2e-2, abs=1e-4)
        assert r["of_measured_matmul"] > 0
    mm = res["measured_matmul"]
    assert mm["dtype"] == "float32" and mm["n"] == 2048
    assert mm["tflops"] == pytest.approx(2 * mm["n"] ** 3 / mm["time_s_median"] / 1e12, rel=1e-2)
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and bench.peak_tflops("NVIDIA H200") == 989.4
    with pytest.raises(ConfigError, match="unknown preset"):
        bench.run(presets=["nope"], device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpt2", "gqa"])
def test_cuda_bf16_flash_matches_cpu_fp32(name):
    """On a GPU the bf16 flash-attention path (GQA included) gives the fp32 CPU logits within bf16 accuracy."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = make(name, d_model=128, n_heads=4).eval()  # head_dim 32: a shape flash attention takes
    ids = torch.randint(0, V, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        gpu = model.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            out = gpu(ids.cuda()).logits.float().cpu()
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_resolving_a_preset_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from llmscale.config import ModelConfig, from_dict; "
            "from_dict(ModelConfig, {'preset': 'llama-1b'}); sys.exit(int('torch' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
