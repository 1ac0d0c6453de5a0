"""AdamW parameter groups and the learning-rate schedule (llmscale.optim)."""
import math

import pytest
import torch
import torch.nn as nn

from llmscale.config import OptimConfig
from llmscale.optim import lr_at, no_decay_names, param_groups


class _RMSNorm(nn.Module):  # a model-defined norm, recognised by its class name
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class _Tiny(nn.Module):
    def __init__(self, vocab=50, d=16):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(8, d)
        self.ln = nn.LayerNorm(d)
        self.rms = _RMSNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied: an embedding, never decayed
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)


def test_no_decay_on_norms_biases_embeddings():
    m = _Tiny()
    nd = no_decay_names(m)
    assert {"wte.weight", "wpe.weight", "ln.weight", "ln.bias", "rms.weight", "fc.bias", "head.weight"} <= nd
    assert "fc.weight" not in nd and "proj.weight" not in nd
    # optim.decay_embeddings: the embeddings (and the head tied to one) are decayed too, norms and biases never
    nd_all = no_decay_names(m, decay_embeddings=True)
    assert {"ln.weight", "ln.bias", "rms.weight", "fc.bias"} <= nd_all
    assert not {"wte.weight", "wpe.weight", "head.weight", "fc.weight"} & nd_all

    cfg = OptimConfig(weight_decay=0.1)
    groups = param_groups(m.named_parameters(remove_duplicate=False), cfg, no_decay=nd)
    by_name = {g["name"]: g for g in groups}
    assert by_name["decay"]["weight_decay"] == 0.1 and by_name["no_decay"]["weight_decay"] == 0.0
    decay_ids = {id(p) for p in by_name["decay"]["params"]}
    plain_ids = {id(p) for p in by_name["no_decay"]["params"]}
    assert decay_ids == {id(m.fc.weight), id(m.proj.weight)}
    assert id(m.wte.weight) in plain_ids and id(m.ln.weight) in plain_ids and id(m.fc.bias) in plain_ids
    # the tied weight appears once; frozen parameters are left out
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))
    assert id(m.frozen.weight) not in set(all_ids)
    # a real AdamW step leaves no-decay parameters untouched when their gradient is zero
    opt = torch.optim.AdamW(groups, lr=1.0)
    for p in m.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    before_ln, before_fc = m.ln.weight.detach().clone(), m.fc.weight.detach().clone()
    opt.step()
    assert torch.equal(m.ln.weight, before_ln)
    assert not torch.equal(m.fc.weight, before_fc)  # decayed


def _cfg(**kw):
    base = dict(lr=1e-3, min_lr=1e-4, warmup_steps=100, schedule="cosine")
    base.update(kw)
    return OptimConfig(**base)


def test_warmup_is_linear_from_zero():
    cfg = _cfg()
    assert lr_at(0, cfg, 2000) == pytest.approx(1e-3 / 100)
    assert lr_at(49, cfg, 2000) == pytest.approx(1e-3 * 50 / 100)
    assert lr_at(99, cfg, 2000) == pytest.approx(1e-3)
    assert all(lr_at(s, cfg, 2000) < lr_at(s + 1, cfg, 2000) for s in range(99))


def test_cosine_decay_key_points():
    cfg = _cfg()
    assert lr_at(100, cfg, 2000) == pytest.approx(1e-3)
    mid = 100 + (2000 - 100) // 2
    assert lr_at(mid, cfg, 2000) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-3)
    assert lr_at(2000, cfg, 2000) == pytest.approx(1e-4)
    assert lr_at(5000, cfg, 2000) == pytest.approx(1e-4)  # held at min_lr after the decay
    quarter = 100 + 1900 // 4
    expect = 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (quarter - 100) / 1900))
    assert lr_at(quarter, cfg, 2000) == pytest.approx(expect)
    lrs = [lr_at(s, cfg, 2000) for s in range(100, 2001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_linear_and_constant_and_decay_steps():
    lin = _cfg(schedule="linear")
    assert lr_at(100, lin, 2000) == pytest.approx(1e-3)
    assert lr_at(1050, lin, 2000) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr_at(2000, lin, 2000) == pytest.approx(1e-4)
    const = _cfg(schedule="constant")
    assert lr_at(100, const, 2000) == lr_at(1999, const, 2000) == pytest.approx(1e-3)
    assert lr_at(9, const, 2000) == pytest.approx(1e-3 * 10 / 100)  # warm-up applies to constant too
    early = _cfg(decay_steps=1000)
    assert lr_at(1000, early, 2000) == pytest.approx(1e-4)
    assert lr_at(1500, early, 2000) == pytest.approx(1e-4)
    nowarm = _cfg(warmup_steps=0)
    assert lr_at(0, nowarm, 2000) == pytest.approx(1e-3)
