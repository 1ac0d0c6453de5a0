"""Building blocks shared by the GPT and BERT models: norms, rotary embeddings, attention with an optional
KV cache, MLPs, the transformer block, initialisation and the model output.

Shapes follow nanoGPT's notation: B batch, T sequence, C = d_model, nh query heads, nkv key/value heads,
hd head width. Parameter names (``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``up_proj``/``gate_proj``/
``down_proj``, ``attn_norm``/``mlp_norm``) are part of the checkpoint format and of the transformers mapping
in :mod:`llmscale.models.hf` — renaming one breaks saved checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# How the transformer blocks split under tensor parallelism (module-name regex -> "column" | "row"), read by
# llmscale.parallel.tensor through each model's tp_plan(): q/k/v and the MLP's up/gate projections split their
# outputs, o_proj and down_proj their inputs (Megatron's pairing: one all-reduce per attention and per MLP).
TP_PLAN: dict[str, str] = {
    r"blocks\.\d+\.attn\.(q|k|v)_proj": "column",
    r"blocks\.\d+\.attn\.o_proj": "row",
    r"blocks\.\d+\.mlp\.(gate|up)_proj": "column",
    r"blocks\.\d+\.mlp\.down_proj": "row",
}


@dataclass
class ModelOutput:
    """What every model's forward returns.

    logits: (B, T, V) token logits. loss: mean cross-entropy over targets != -100 (+ the NSP loss when
    ``next_sentence_label`` is given); None without labels. num_targets: how many targets the mean is over.
    Sequence classifiers (llmscale.models.classify): logits (B, num_labels), loss the class-weighted sum over
    examples with label != -100 divided by num_targets, their number.
    """

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    mlm_loss: Optional[torch.Tensor] = None
    nsp_loss: Optional[torch.Tensor] = None
    nsp_logits: Optional[torch.Tensor] = None
    num_targets: Optional[torch.Tensor] = None


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over labels != -100, number of such labels), computed in fp32. A batch without
    any target gives loss 0 (not NaN), so gradient accumulation over such a micro-batch stays finite."""
    n = (labels != -100).sum()
    total = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                            ignore_index=-100, reduction="sum")
    return total / n.clamp(min=1), n


# --------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 and cast back before the gain, as Llama does."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def make_norm(cfg, dim: Optional[int] = None) -> nn.Module:
    dim = dim or cfg.d_model
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    # nn.LayerNorm runs in fp32 under autocast (layer_norm is on autocast's fp32 list).
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def norm_params(cfg, dim: Optional[int] = None) -> int:
    dim = dim or cfg.d_model
    return dim * (2 if cfg.norm == "layernorm" and cfg.bias else 1)


# --------------------------------------------------------------------------- rotary embeddings


def rope_cos_sin(start: int, length: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (length, head_dim) for positions start..start+length-1, in fp32 whatever the autocast
    state (elementwise products only), in the rotate-half layout [f0..f_{d/2-1}, f0..f_{d/2-1}]."""
    return _rope_tables(torch.arange(start, start + length, device=device, dtype=torch.int64), head_dim, theta)


def rope_cos_sin_at(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, 1, T, head_dim) for explicit positions ``position_ids`` (B, T) (packed rows, whose
    positions restart at every example), broadcasting over the heads of (B, h, T, hd). Same values as
    :func:`rope_cos_sin` at the same positions."""
    cos, sin = _rope_tables(position_ids, head_dim, theta)  # (B, T, hd)
    return cos[:, None], sin[:, None]


def _rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (*positions.shape, head_dim) of integer positions, computed in fp32."""
    device = positions.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    freqs = positions.to(torch.int64).float()[..., None] * inv_freq  # (..., T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, hd)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, h, T, hd); cos/sin: (T, hd) or (B, 1, T, hd) in fp32, cast to x's dtype as transformers' Llama
    does."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


# --------------------------------------------------------------------------- attention


def document_mask(doc_ids: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention inside each example of packed rows: bool (B, 1, T, T), True where query i may attend
    key j, i.e. j <= i and doc_ids[:, i] == doc_ids[:, j]. ``doc_ids`` (B, T): the example index of each
    position (-1 on padding, so pads attend only to pads and no row is empty). ``key_mask`` (B, T), True = real
    token, is folded in (a masked query still sees itself)."""
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal  # (B, T, T)
    if key_mask is not None:
        own = torch.eye(T, dtype=torch.bool, device=doc_ids.device)
        mask = mask & (key_mask.bool()[:, None, :] | own)
    return mask[:, None]  # (B, 1, T, T)



class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads, through scaled_dot_product_attention.

    The number of heads is inferred from the projections' output width (``view(B, T, -1, hd)``), so a
    tensor-parallel engine that column-splits q/k/v and row-splits o_proj needs nothing else."""

    def __init__(self, cfg, *, causal: bool):
        super().__init__()
        d, nh = cfg.d_model, cfg.n_heads
        nkv = cfg.n_kv_heads or nh
        self.head_dim = d // nh
        self.causal = causal
        self.dropout = cfg.dropout
        self.rope_theta = cfg.rope_theta if cfg.position == "rope" else None
        self.q_proj = nn.Linear(d, nh * self.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(d, nkv * self.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(d, nkv * self.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(nh * self.head_dim, d, bias=cfg.bias)

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_mask: Optional[torch.Tensor] = None,
        kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        start_pos: int = 0,
        attn_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x: (B, T, C). key_mask: bool (B, Tk) True = may be attended to (padding mask), or None.
        kv: preallocated cache buffers (B, nkv, max_len, hd) written at [start_pos, start_pos+T).
        attn_mask: bool (B, 1, T, T) True = query may attend key (:func:`document_mask`), replacing the causal
        and key masks; position_ids (B, T): RoPE positions instead of start_pos + arange(T). Neither with kv."""
        B, T, _ = x.shape
        hd = self.head_dim
        if kv is not None and (attn_mask is not None or position_ids is not None):
            raise ValueError("attn_mask / position_ids (packed sequences) are not supported with a KV cache: "
                             "generate one sequence per row.")
        if attn_mask is not None and key_mask is not None:
            raise ValueError("give key_mask or attn_mask, not both: fold the padding into attn_mask "
                             "(document_mask(doc_ids, key_mask)).")
        q = self.q_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, nkv, T, hd)
        if self.rope_theta is not None:
            if position_ids is None:
                cos, sin = rope_cos_sin(start_pos, T, hd, self.rope_theta, x.device)  # (T, hd)
            else:
                cos, sin = rope_cos_sin_at(position_ids, hd, self.rope_theta)  # (B, 1, T, hd)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            kbuf, vbuf = kv
            kbuf[:, :, start_pos:start_pos + T] = k.to(kbuf.dtype)
            vbuf[:, :, start_pos:start_pos + T] = v.to(vbuf.dtype)
            k, v = kbuf[:, :, :start_pos + T].to(q.dtype), vbuf[:, :, :start_pos + T].to(q.dtype)
        Tk = k.size(2)
        mask, is_causal = attn_mask, False
        if attn_mask is None and self.causal and T > 1:
            if Tk == T and key_mask is None:
                is_causal = True  # the fast path (flash attention on GPUs)
            else:
                # query i sits at absolute position Tk - T + i and sees keys 0..Tk - T + i
                qpos = torch.arange(Tk - T, Tk, device=x.device)[:, None]
                mask = torch.arange(Tk, device=x.device)[None, :] <= qpos  # (T, Tk)
        if key_mask is not None:
            km = key_mask[:, None, None, :Tk].bool()  # (B, 1, 1, Tk)
            if self.causal:
                # a (left-)padding query still sees itself, so no row is fully masked (which gives NaN)
                own = torch.arange(Tk, device=x.device)[None, :] == torch.arange(Tk - T, Tk, device=x.device)[:, None]
                km = km | own
            mask = km if mask is None else (mask & km)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=q.size(1) != k.size(1),
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y)


# --------------------------------------------------------------------------- MLP and block


class MLP(nn.Module):
    """GELU MLP (up -> gelu -> down) or SwiGLU (down(silu(gate) * up)). ``gelu_approximate`` is "tanh" for
    GPT-2 (its "gelu_new") and "none" (exact erf) for BERT."""

    def __init__(self, cfg, *, gelu_approximate: str = "tanh"):
        super().__init__()
        d, ff = cfg.d_model, cfg.d_ff
        self.swiglu = cfg.activation == "swiglu"
        self.gelu_approximate = gelu_approximate
        if self.swiglu:
            self.gate_proj = nn.Linear(d, ff, bias=cfg.bias)
        self.up_proj = nn.Linear(d, ff, bias=cfg.bias)
        self.down_proj = nn.Linear(ff, d, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.gelu_approximate))


class Block(nn.Module):
    """Transformer block, pre-norm (x + f(norm(x))) or post-norm (norm(x + f(x)), original BERT)."""

    def __init__(self, cfg, *, causal: bool, gelu_approximate: str = "tanh"):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, causal=causal)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg, gelu_approximate=gelu_approximate)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: Optional[torch.Tensor] = None,
        kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        start_pos: int = 0,
        *,
        attn_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """See :meth:`Attention.forward` for the masks, cache and positions."""
        kw = dict(key_mask=key_mask, kv=kv, start_pos=start_pos, attn_mask=attn_mask, position_ids=position_ids)
        if self.pre_norm:
            x = x + self.drop(self.attn(self.attn_norm(x), **kw))
            return x + self.drop(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.drop(self.attn(x, **kw)))
        return self.mlp_norm(x + self.drop(self.mlp(x)))


def run_block(block: Block, x: torch.Tensor, key_mask: Optional[torch.Tensor], checkpoint: bool, *,
              attn_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One block, recomputed in backward (activation checkpointing) when asked and gradients are on."""
    kw = dict(attn_mask=attn_mask, position_ids=position_ids)
    if checkpoint and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint as ckpt

        return ckpt(block, x, key_mask, use_reentrant=False, **kw)
    return block(x, key_mask, **kw)


# --------------------------------------------------------------------------- initialisation and counting

RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


def init_weights(model: nn.Module, *, std: float, n_layers: int) -> None:
    """GPT-2 / Megatron initialisation: normal(0, std) for linear and embedding weights, zero biases, unit
    norm gains; the projections that write into the residual stream (o_proj, down_proj) get
    std / sqrt(2 * n_layers) so the residual's variance does not grow with depth."""
    resid_std = std / math.sqrt(2 * n_layers)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, 0.0, resid_std if name.rsplit(".", 1)[-1] in RESIDUAL_OUTPUTS else std)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Embedding):
            nn.init.normal_(mod.weight, 0.0, std)
        elif isinstance(mod, (nn.LayerNorm, RMSNorm)):
            if getattr(mod, "weight", None) is not None:
                nn.init.ones_(mod.weight)
            if getattr(mod, "bias", None) is not None:
                nn.init.zeros_(mod.bias)


def count_params(model: nn.Module, *, exclude_embeddings: bool = False) -> int:
    """Parameters counted once each (a tied weight once); optionally without the nn.Embedding tables
    (token, position, token-type), the "non-embedding" count of scaling-law papers."""
    skip = set()
    if exclude_embeddings:
        skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def new_kv_cache(model: nn.Module, batch_size: int, max_len: int, *, device=None, dtype=None) -> KVCache:
    blocks = model.blocks
    attn = blocks[0].attn
    nkv = attn.k_proj.out_features // attn.head_dim
    device = device or attn.k_proj.weight.device
    dtype = dtype or attn.k_proj.weight.dtype
    shape = (batch_size, nkv, max_len, attn.head_dim)
    return KVCache(
        k=[torch.zeros(shape, device=device, dtype=dtype) for _ in blocks],
        v=[torch.zeros(shape, device=device, dtype=dtype) for _ in blocks],
        max_len=max_len,
    )


@dataclass
class KVCache:
    """Per-layer key/value buffers (B, nkv, max_len, hd) and how many positions are filled."""

    k: list
    v: list
    max_len: int
    pos: int = 0


class LanguageModel(nn.Module):
    """What every llmscale model computes the same way from its resolved ``config``."""

    config: object

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Exact parameter count, tied weights once; ``exclude_embeddings`` drops the embedding tables."""
        return count_params(self, exclude_embeddings=exclude_embeddings)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at ``seq_len`` (see :mod:`llmscale.models.flops`)."""
        from llmscale.models import flops

        return flops.flops_per_token(self.config, seq_len)
