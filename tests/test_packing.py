"""Packed SFT rows in the GPT model: a packed batch (several examples per row, ``position_ids`` restarting per
example, ``doc_ids`` keeping attention inside each) has exactly the loss, logits and gradients of the same
examples one per row; without packing inputs the model computes exactly what it did before."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmscale.config import ModelConfig, from_dict
from llmscale.data.finetune import FinetuneLoader, SFTExample, encode_sft
from llmscale.data.tokenizer import Tokenizer
from llmscale.models import build_model
from llmscale.models import layers as layers_mod
from llmscale.models.layers import document_mask
from llmscale.models.pipeline import run_layers

torch.set_num_threads(1)

# what the engine hands the model from an SFT micro-batch (its _MODEL_KWARGS plus the packing keys)
MODEL_KWARGS = ("labels", "attention_mask", "position_ids", "doc_ids")

VARIANTS = {
    "gpt2": dict(),  # learned positions, LayerNorm, GELU, biases, tied head
    "llama-gqa": dict(position="rope", activation="swiglu", norm="rmsnorm", bias=False, n_kv_heads=2,
                      tie_embeddings=False),
}

# prompt/response pairs of assorted lengths, so that best-fit packing puts two or three into a row of 64
PAIRS = [
    ("Q: who art thou?\nA: ", "I am the king of all this land."),
    ("Q: what say you, my lord?\nA: ", "Nothing."),
    ("Speak: ", "Good morrow to you, fair sir, and to your house and all your men."),
    ("Q: where is he?\nA: ", "Gone to the tower, my liege."),
    ("", "O Romeo, Romeo, wherefore art thou Romeo?"),
    ("Q: and then?\nA: ", "Then we shall see."),
    ("First Citizen: before we proceed any further, hear me speak.\nAll: ", "Speak, speak."),
    ("Q: is it done?\nA: ", "It is."),
]


def model_of(name: str, seed: int = 0, *, vocab_size: int, **extra):
    # init_std 0.1 rather than 0.02: logits far enough from uniform that context (and a leak) shows in the loss
    cfg = from_dict(ModelConfig, {"family": "gpt", "n_layers": 2, "d_model": 32, "n_heads": 4, "max_seq_len": 64,
                                  "init_std": 0.1, **VARIANTS[name], **extra})
    torch.manual_seed(seed)
    return build_model(cfg, vocab_size=vocab_size)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def batches(tok):
    """(packed features, packed micro-batch, unpacked micro-batch): every row of each in one micro-batch,
    served by the real loader in feature order."""
    exs = [SFTExample(p, r, f"pairs:{i}") for i, (p, r) in enumerate(PAIRS)]
    out = []
    for packing in (True, False):
        feats = encode_sft(exs, tok, max_len=64, packing=packing)
        loader = FinetuneLoader(feats, dp_rank=0, dp_size=1, global_batch_size=len(feats),
                                micro_batch_size=len(feats), seed=0, shuffle=False, pad_id=tok.pad_id)
        (mb,) = loader.next_step()
        out.append((feats, mb))
    (pf, packed), (uf, unpacked) = out
    assert pf.packed and not uf.packed and len(uf) == len(PAIRS)
    assert len(pf) < len(uf) and max(len(r) for r in pf.row_examples) >= 2, "nothing was packed"
    assert (packed["doc_ids"] == -1).any(), "no padding in the packed batch: the pad rule is not exercised"
    return pf, packed, unpacked


def run(model, mb: dict, drop: tuple[str, ...] = ()):
    kw = {k: mb[k] for k in MODEL_KWARGS if k in mb and k not in drop}
    return model(mb["input_ids"], **kw)


def example_spans(feats, mb: dict):
    """(packed row, start, length, unpacked row) of every example in the packed batch."""
    spans = []
    for r, row in enumerate(feats.row_examples):
        doc = mb["doc_ids"][r]
        for d, i in enumerate(row):
            where = (doc == d).nonzero().flatten()
            start, n = int(where[0]), len(where)
            assert int(where[-1]) == start + n - 1  # contiguous
            spans.append((r, start, n, i))
    return spans


# --------------------------------------------------------------------------- packed == unpacked


@pytest.mark.parametrize("name", list(VARIANTS))
def test_packed_loss_equals_unpacked(name, tok, batches):
    _, packed, unpacked = batches
    model = model_of(name, vocab_size=tok.vocab_size).eval()
    with torch.no_grad():
        p, u = run(model, packed), run(model, unpacked)
        naive = run(model, packed, drop=("position_ids", "doc_ids"))
    assert int(p.num_targets) == int(u.num_targets) == int((unpacked["labels"] != -100).sum()) > 0
    torch.testing.assert_close(p.loss * p.num_targets, u.loss * u.num_targets, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.loss, u.loss, rtol=0, atol=1e-5)
    # the check can fail: the same packed rows read as plain sequences give another loss
    assert abs(float(naive.loss) - float(u.loss)) > 1e-3


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_packed_example_has_its_unpacked_logits(name, tok, batches):
    feats, packed, unpacked = batches
    model = model_of(name, seed=1, vocab_size=tok.vocab_size).eval()
    with torch.no_grad():
        p, u = run(model, packed).logits, run(model, unpacked).logits
        no_docs = run(model, packed, drop=("doc_ids",)).logits
        no_pos = run(model, packed, drop=("position_ids",)).logits
    spans = example_spans(feats, packed)
    assert sorted(i for *_, i in spans) == list(range(len(PAIRS)))
    later = 0
    for r, start, n, i in spans:
        assert torch.equal(packed["input_ids"][r, start:start + n], unpacked["input_ids"][i, :n])
        assert int(unpacked["attention_mask"][i].sum()) == n
        torch.testing.assert_close(p[r, start:start + n], u[i, :n], rtol=0, atol=1e-5)
        if start > 0:  # not first in its row: without the packing inputs, earlier examples leak in
            later += 1
            assert (no_docs[r, start:start + n] - u[i, :n]).abs().max() > 1e-4
            if model.pos_embed is not None:  # RoPE is relative: an isolated example does not see the shift
                assert (no_pos[r, start:start + n] - u[i, :n]).abs().max() > 1e-4
    assert later > 0
    assert torch.isfinite(p).all()  # padding (doc -1) attends to padding: no NaN rows


@pytest.mark.parametrize(("name", "ckpt"), [("gpt2", False), ("llama-gqa", False), ("llama-gqa", True)])
def test_packed_gradients_equal_unpacked(name, ckpt, tok, batches):
    _, packed, unpacked = batches
    model = model_of(name, seed=2, vocab_size=tok.vocab_size, activation_checkpointing=ckpt).train()
    grads = []
    for mb in (packed, unpacked):
        model.zero_grad(set_to_none=True)
        out = run(model, mb)
        (out.loss * out.num_targets).backward()  # the token-summed loss
        grads.append({n: q.grad.clone() for n, q in model.named_parameters()})
    gp, gu = grads
    assert gp.keys() == gu.keys() and all(g.abs().sum() > 0 for g in gp.values())
    for n in gp:
        torch.testing.assert_close(gp[n], gu[n], rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


# --------------------------------------------------------------------------- no packing: unchanged


def _old_rotate_half(t: torch.Tensor) -> torch.Tensor:
    half = t.size(-1) // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


def _old_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The GPT forward as it was before packing (pre-norm, no dropout, no mask): arange positions and
    is_causal scaled_dot_product_attention, RoPE written out."""
    T = ids.size(1)
    x = model.tok_embed(ids)
    if model.pos_embed is not None:
        x = x + model.pos_embed(torch.arange(T))
    for block in model.blocks:
        a, h = block.attn, block.attn_norm(x)
        B, hd = h.size(0), a.head_dim
        q, k, v = (proj(h).view(B, T, -1, hd).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        if a.rope_theta is not None:
            inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
            freqs = torch.arange(0, T, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
            q, k = q * cos + _old_rotate_half(q) * sin, k * cos + _old_rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.size(1) != k.size(1))
        x = x + a.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + block.mlp(block.mlp_norm(x))
    x = model.final_norm(x)
    return F.linear(x, model.tok_embed.weight) if model.lm_head is None else model.lm_head(x)


class _SDPASpy:
    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, *args, **kw):
        self.calls.append((kw.get("attn_mask"), kw.get("is_causal")))
        return self.real(*args, **kw)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_without_packing_inputs_the_forward_is_bitwise_unchanged(name, monkeypatch):
    model = model_of(name, seed=3, vocab_size=97).eval()
    ids = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(0))
    spy = _SDPASpy(F.scaled_dot_product_attention)
    monkeypatch.setattr(layers_mod.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        got = model(ids).logits
        ones = model(ids, attention_mask=torch.ones_like(ids)).logits  # all-real mask: the same fast path
    assert spy.calls and all(m is None and c is True for m, c in spy.calls), "the is_causal fast path was left"
    monkeypatch.undo()
    with torch.no_grad():
        ref = _old_logits(model, ids)
    assert torch.equal(got, ref) and torch.equal(ones, ref)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_packed_rows_use_a_boolean_document_mask(name, tok, batches, monkeypatch):
    _, packed, _ = batches
    model = model_of(name, vocab_size=tok.vocab_size).eval()
    spy = _SDPASpy(F.scaled_dot_product_attention)
    monkeypatch.setattr(layers_mod.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        run(model, packed)
    B, T = packed["input_ids"].shape
    assert len(spy.calls) == model.config.n_layers
    for mask, causal in spy.calls:
        assert causal is False and mask.dtype == torch.bool and mask.shape == (B, 1, T, T)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_arange_positions_and_one_document_match_the_plain_forward(name):
    model = model_of(name, seed=4, vocab_size=97).eval()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(24).expand(2, 24)
    with torch.no_grad():
        ref = model(ids).logits
        same_pos = model(ids, position_ids=pos).logits
        one_doc = model(ids, position_ids=pos, doc_ids=torch.zeros_like(ids)).logits
    assert torch.equal(same_pos, ref)  # explicit positions are the same numbers
    torch.testing.assert_close(one_doc, ref, rtol=0, atol=1e-5)  # the masked kernel, not is_causal


@pytest.mark.parametrize("name", list(VARIANTS))
def test_position_ids_set_the_positions(name):
    """Packed-vs-unpacked equality cannot see RoPE's positions (a shift of a whole isolated example is invisible
    to relative rotations), so check directly that other positions give other logits and the right tables."""
    model = model_of(name, seed=5, vocab_size=97).eval()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    doubled = (2 * torch.arange(24)).expand(2, 24)  # not a shift: relative distances change
    with torch.no_grad():
        assert (model(ids, position_ids=doubled).logits - model(ids).logits).abs().max() > 1e-3
    cos, sin = layers_mod.rope_cos_sin_at(doubled, 8, 10000.0)  # (B, 1, T, hd)
    ref_cos, ref_sin = layers_mod.rope_cos_sin(0, 64, 8, 10000.0, "cpu")  # (64, hd)
    assert cos.shape == (2, 1, 24, 8)
    assert torch.equal(cos[:, 0], ref_cos[doubled]) and torch.equal(sin[:, 0], ref_sin[doubled])


def test_document_mask_rule():
    doc = torch.tensor([[0, 0, 1, 1, 1, -1, -1]])
    m = document_mask(doc)[0, 0].int()
    expect = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1, 1],
    ])
    assert torch.equal(m, expect)
    # a padding mask is folded in; a masked query still sees itself
    km = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    m2 = document_mask(doc, km)[0, 0].int()
    assert torch.equal(m2[:5], expect[:5]) and torch.equal(m2[5:], torch.eye(7, dtype=torch.int)[5:])


# --------------------------------------------------------------------------- paths that cannot honour packing


def test_bad_packing_inputs_are_errors(tok, batches):
    _, packed, _ = batches
    model = model_of("gpt2", vocab_size=tok.vocab_size).eval()
    ids = packed["input_ids"]
    with pytest.raises(ValueError, match="position_ids must lie in"):
        model(ids, position_ids=torch.full_like(ids, 64))
    with pytest.raises(ValueError, match="doc_ids must be an integer tensor"):
        model(ids, doc_ids=packed["doc_ids"][:, :-1])
    with pytest.raises(ValueError, match="position_ids must be an integer tensor"):
        model(ids, position_ids=packed["position_ids"].float())


def test_pipeline_view_and_kv_cache_refuse_packing(tok, batches):
    _, packed, _ = batches
    model = model_of("llama-gqa", vocab_size=tok.vocab_size).eval()
    ids = packed["input_ids"]
    layers = model.pipeline_layers()
    with torch.no_grad():
        # what the engine's pipeline batch holds for SFT rows still works (the mask is unused, right padding)
        plain = run_layers(layers, (ids, torch.zeros_like(ids), packed["attention_mask"]))
        assert torch.equal(plain, model(ids).logits)
        with pytest.raises(ValueError, match="not supported with a pipeline"):
            run_layers(layers, (ids, torch.zeros_like(ids), packed["attention_mask"], packed["position_ids"],
                                packed["doc_ids"]))
        cache = model.new_cache(ids.size(0), 64)
        attn = model.blocks[0].attn
        x = torch.zeros(ids.size(0), ids.size(1), model.config.d_model)
        with pytest.raises(ValueError, match="not supported with a KV cache"):
            attn(x, kv=(cache.k[0], cache.v[0]), position_ids=packed["position_ids"])


def test_lstm_refuses_packed_rows(tok, batches):
    _, packed, _ = batches
    cfg = from_dict(ModelConfig, {"family": "lstm", "n_layers": 1, "d_model": 16, "n_heads": 1, "max_seq_len": 64})
    lstm = build_model(cfg, vocab_size=tok.vocab_size)
    ids = packed["input_ids"]
    with pytest.raises(ValueError, match="packing=false"):
        lstm(ids, labels=packed["labels"], position_ids=packed["position_ids"], doc_ids=packed["doc_ids"])
    with torch.no_grad():
        assert np.isfinite(float(lstm(ids, labels=packed["labels"]).loss))
