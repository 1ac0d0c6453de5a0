"""Generation: the KV cache gives the tokens of full recomputation; sampling is seeded and respects its
filters; context overflow slides or raises; eos stops."""
from __future__ import annotations

import pytest
import torch

from llmscale.config import ModelConfig, from_dict
from llmscale.models import build_model
from llmscale.models.generate import filter_logits, generate, sample_next

torch.set_num_threads(1)
V = 61


def model_of(preset: str, *, max_seq_len: int = 24, seed: int = 0, sharpen: float = 20.0, **kw):
    torch.manual_seed(seed)
    model = build_model(from_dict(ModelConfig, {"preset": preset, "max_seq_len": max_seq_len, **kw}), vocab_size=V)
    with torch.no_grad():  # sharpen the random model's distributions (greedy ties become unlikely)
        model.tok_embed.weight.mul_(sharpen)
    return model


def prompts(B=3, T=5, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset,extra", [
    ("gpt-tiny", {}),
    ("llama-tiny", {}),  # RoPE + GQA + SwiGLU + untied
    ("gpt-tiny", {"position": "rope", "n_kv_heads": 1}),
    ("lstm-tiny", {}),
])
def test_kv_cache_greedy_equals_full_recompute(preset, extra):
    model = model_of(preset, **extra)
    p = prompts()
    # 40 new tokens with max_seq_len 24: the context window fills and slides (recomputed) for the last steps
    cached = generate(model, p, max_new_tokens=40, temperature=0)
    full = generate(model, p, max_new_tokens=40, temperature=0, use_cache=False)
    assert cached.shape == (3, 45)
    assert torch.equal(cached, full)
    assert torch.equal(cached[:, :5], p)
    # and greedy really is argmax of a plain forward over the (windowed) context
    for t in (5, 20, 44):
        ctx = cached[:, max(0, t - 24):t]
        assert torch.equal(model(ctx).logits[:, -1].argmax(-1), cached[:, t])


def test_forward_cached_matches_forward_logits():
    model = model_of("llama-tiny").eval()
    ids = prompts(B=2, T=12)
    cache = model.new_cache(2)
    a = model.forward_cached(ids[:, :7], cache)
    b = model.forward_cached(ids[:, 7:10], cache)  # several tokens at once on a non-empty cache
    c = model.forward_cached(ids[:, 10:], cache)
    ref = model(ids).logits
    torch.testing.assert_close(torch.cat([a, b, c], dim=1), ref, rtol=0, atol=1e-5)
    assert cache.pos == 12


@pytest.mark.parametrize("preset", ["gpt-tiny", "lstm-tiny"])
def test_sampling_is_seeded(preset):
    model = model_of(preset, sharpen=1.0)  # near-uniform: different seeds must give different draws
    p = prompts()
    kw = dict(max_new_tokens=15, temperature=1.3, top_k=20, top_p=0.95)
    a = generate(model, p, seed=5, **kw)
    b = generate(model, p, seed=5, **kw)
    c = generate(model, p, seed=6, **kw)
    d = generate(model, p, seed=5, use_cache=False, **kw)
    assert torch.equal(a, b) and torch.equal(a, d)
    assert not torch.equal(a, c)


def test_top_k_is_respected_and_top_k_1_is_greedy():
    model = model_of("gpt-tiny", sharpen=4.0).eval()
    p = prompts(B=4)
    out = generate(model, p, max_new_tokens=12, temperature=2.0, top_k=3, seed=0)
    with torch.no_grad():
        logits = model(out[:, :-1]).logits
    allowed = torch.topk(logits, 3, dim=-1).indices  # (B, T-1, 3)
    new = out[:, 5:]
    assert (allowed[:, 4:] == new[..., None]).any(-1).all()
    assert not (allowed[:, 4:, 0] == new).all()  # temperature 2 does leave the argmax sometimes
    assert torch.equal(generate(model, p, max_new_tokens=12, top_k=1, seed=3),
                       generate(model, p, max_new_tokens=12, temperature=0))
    assert torch.equal(generate(model, p, max_new_tokens=12, temperature=1e-5, seed=3),
                       generate(model, p, max_new_tokens=12, temperature=0))


def test_filter_logits_top_p_and_top_k():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda lg: torch.isfinite(lg)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_p=0.7)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_p=0.5)) == [False, True, False, False]  # 0.5 alone reaches 0.5
    assert kept(filter_logits(logits, top_p=0.81)) == [False, True, True, True]
    assert kept(filter_logits(logits, top_p=0.01)) == [False, True, False, False]  # the best always stays
    assert kept(filter_logits(logits, top_k=2)) == [False, True, False, True]
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits.expand(200, 4), top_p=0.7, generator=g)[i].item() for i in range(200)}
    assert draws == {1, 3}


def test_overflow_error_and_prompt_cut():
    model = model_of("gpt-tiny", max_seq_len=16)
    p = prompts(B=1, T=10)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        generate(model, p, max_new_tokens=7, overflow="error")
    assert generate(model, p, max_new_tokens=6, overflow="error", temperature=0).shape == (1, 16)
    long = prompts(B=1, T=30)
    out = generate(model, long, max_new_tokens=3, temperature=0)
    assert torch.equal(out[:, :16], long[:, -16:]) and out.shape == (1, 19)


def test_eos_stops_and_list_prompt():
    model = model_of("gpt-tiny")
    p = prompts(B=1)
    first = generate(model, p, max_new_tokens=1, temperature=0)[0, -1].item()
    out = generate(model, p[0].tolist(), max_new_tokens=10, temperature=0, eos_id=first)
    assert out.tolist() == [p[0].tolist() + [first]]
    seen = []
    generate(model, p, max_new_tokens=4, temperature=0, on_token=lambda t: seen.append(t.tolist()))
    assert len(seen) == 4


def test_bert_cannot_generate_and_training_mode_is_restored():
    bert = model_of("bert-tiny-cpu")
    with pytest.raises(ValueError, match="masked LM"):
        generate(bert, prompts(), max_new_tokens=2)
    gpt = model_of("gpt-tiny").train()
    generate(gpt, prompts(), max_new_tokens=2)
    assert gpt.training
