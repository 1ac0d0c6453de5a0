"""Decoder-only causal language model: GPT-2 and Llama style from one configurable class.

    token embedding (+ learned positions) -> dropout -> N pre-norm blocks -> final norm -> LM head

GPT-2: LayerNorm, learned positions, tanh-GELU, biases, tied head. Llama: RMSNorm, RoPE, SwiGLU, GQA, no
biases, untied head. Any mix is allowed by ModelConfig. State-dict names:

    tok_embed.weight                      (V, C)
    pos_embed.weight                      (max_seq_len, C)      learned positions only
    blocks.{i}.attn_norm.{weight,bias}
    blocks.{i}.attn.{q,k,v,o}_proj.{weight,bias}
    blocks.{i}.mlp_norm.{weight,bias}
    blocks.{i}.mlp.{gate,up,down}_proj.{weight,bias}             gate only for SwiGLU
    final_norm.{weight,bias}
    lm_head.weight                        (V, C)                untied only; tied: tok_embed.weight
(biases absent when ``bias=false``; RMSNorm has no bias.)

Packed sequences (SFT with ``packing=True``, :mod:`llmscale.data.sft_data`). A packed row holds several whole
examples back to back (then right padding); each must be computed exactly as if it were alone in its row.
``forward`` takes, besides ``input_ids`` (B, T):

    position_ids (B, T) int   the position of each token within its own example: 0, 1, .. restarting at every
                              example (0 on pads); in [0, max_seq_len). Replaces arange(T): indexes pos_embed
                              (learned) or sets the RoPE rotation.
    doc_ids      (B, T) int   the example each token belongs to (0, 1, .. within the row; -1 on pads). Query i
                              attends key j iff j <= i and doc_ids[i] == doc_ids[j] (pads attend only to pads),
                              through scaled_dot_product_attention with a boolean (B, 1, T, T) mask.

A packed batch passes both; either alone is allowed (doc_ids alone keeps arange positions). Without them the
model runs unchanged: arange positions and ``is_causal=True`` attention (flash attention on GPUs). Labels stay
per example (``sft_data`` never makes the last token of one example predict the first of the next), so a
packed batch has the loss and gradients of its examples unpacked. Packing is for :meth:`GPT.forward` (and
:meth:`hidden_states`) only: the KV-cache path (``forward_cached``) and the pipeline view
(``pipeline_layers()``) do not take it and raise if handed packed inputs.

:class:`GPTBackbone` is the same model without its LM head (final hidden states out), under the same names:
the backbone of :class:`llmscale.models.classify.SequenceClassifier`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmscale.models.layers import (
    TP_PLAN,
    Block,
    KVCache,
    LanguageModel,
    ModelOutput,
    document_mask,
    init_weights,
    lm_loss,
    make_norm,
    new_kv_cache,
    run_block,
)
from llmscale.models.pipeline import LayerDef


def _first(inputs: Any) -> torch.Tensor:
    return inputs[0] if isinstance(inputs, (tuple, list)) else inputs


def _check_same_shape(name: str, t: torch.Tensor, input_ids: torch.Tensor) -> None:
    if t.shape != input_ids.shape or t.dtype.is_floating_point:
        raise ValueError(f"{name} must be an integer tensor of input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{t.dtype} {tuple(t.shape)}: give one entry per token (see llmscale.models.gpt).")


class _DecoderTrunk:
    """tok_embed (+ pos_embed) -> drop -> blocks -> final_norm: the part GPT and GPTBackbone share, under the
    same attribute (hence state-dict) names. A mixin of nn.Module subclasses."""

    def _build_trunk(self, cfg) -> None:
        C = cfg.d_model
        self.tok_embed = nn.Embedding(cfg.vocab_size, C)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, C) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, causal=True, gelu_approximate="tanh") for _ in range(cfg.n_layers))
        self.final_norm = make_norm(cfg)

    def _check_len(self, T: int, start: int = 0) -> None:
        if start + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds model.max_seq_len={self.config.max_seq_len}: use a "
                f"shorter data.seq_len / prompt, or a model with a larger max_seq_len.")

    def _embed(self, input_ids: torch.Tensor, start: int = 0,
               position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.tok_embed(input_ids)  # (B, T, C)
        return _add_positions(self.pos_embed, x, start, self.drop.p, self.training, position_ids)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        position_ids: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, C). attention_mask (B, T): 1 = real token, 0 = padding (keys only;
        positions are not shifted, so right padding leaves the real positions exactly as without it).
        position_ids / doc_ids (B, T): packed rows (see the module docstring)."""
        B, T = input_ids.shape
        self._check_len(T)
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_mask = attention_mask.bool()
        attn_mask = None
        if doc_ids is not None:
            _check_same_shape("doc_ids", doc_ids, input_ids)
            attn_mask, key_mask = document_mask(doc_ids, key_mask), None  # (B, 1, T, T), padding folded in
        if position_ids is not None:
            _check_same_shape("position_ids", position_ids, input_ids)
            if T and bool(((position_ids < 0) | (position_ids >= self.config.max_seq_len)).any()):
                raise ValueError(f"position_ids must lie in [0, model.max_seq_len={self.config.max_seq_len}), got "
                                 f"{int(position_ids.min())}..{int(position_ids.max())}: they count tokens within "
                                 f"each packed example, from 0.")
        x = self._embed(input_ids, position_ids=position_ids)
        ckpt = self.config.activation_checkpointing and self.training
        for block in self.blocks:
            x = run_block(block, x, key_mask, ckpt, attn_mask=attn_mask, position_ids=position_ids)
        return self.final_norm(x)


class GPT(_DecoderTrunk, LanguageModel):
    """Causal LM. ``cfg`` must be resolved (see :func:`llmscale.models.build_model`)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self._build_trunk(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, std=cfg.init_std, n_layers=cfg.n_layers)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(x, self.tok_embed.weight)  # (B, T, V)
        return self.lm_head(x)

    # ----------------------------------------------------------------- the contract

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        next_sentence_label: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> ModelOutput:
        """input_ids (B, T); labels (B, T) aligned (labels[:, t] is the target at position t, -100 ignored);
        attention_mask (B, T) 1 = real token, 0 = padding (keys only; positions are not shifted);
        position_ids (B, T) positions within each packed example, doc_ids (B, T) example index (-1 on pads):
        packed rows, each example attending only to itself (see the module docstring)."""
        if token_type_ids is not None or next_sentence_label is not None:
            raise ValueError("token_type_ids / next_sentence_label are BERT inputs; a GPT model takes neither.")
        h = self.hidden_states(input_ids, attention_mask, position_ids=position_ids, doc_ids=doc_ids)
        logits = self._logits(h)
        if labels is None:
            return ModelOutput(logits=logits)
        loss, n = lm_loss(logits, labels)
        return ModelOutput(logits=logits, loss=loss, num_targets=n)

    def tp_plan(self) -> dict[str, str]:
        return TP_PLAN

    def pipeline_layers(self) -> list[LayerDef]:
        """tok_embed (tied "embed") -> [pos_embed | embed_dropout] -> blocks.i -> final_norm -> lm_head.
        The first layer reads ``(input_ids,)`` or ``(input_ids, token_type_ids, attention_mask)`` (the latter
        two unused: right padding needs no mask in a causal model); packed rows are not supported here."""
        tie = "embed" if self.lm_head is None else None
        p, max_len = self.drop.p, self.config.max_seq_len

        def embed_fn(mod: nn.Module, inputs: Any) -> torch.Tensor:
            if isinstance(inputs, (tuple, list)) and len(inputs) > 3:
                raise ValueError(f"the GPT pipeline takes (input_ids,) or (input_ids, token_type_ids, attention_mask), "
                                 f"got {len(inputs)} tensors: packed sequences (position_ids / doc_ids) are not "
                                 f"supported with a pipeline; use parallel.pipeline_parallel=1 or packing=false.")
            ids = _first(inputs)
            if ids.size(1) > max_len:
                raise ValueError(f"sequence of {ids.size(1)} tokens exceeds model.max_seq_len={max_len}.")
            return mod(ids)

        layers = [LayerDef("tok_embed", self.tok_embed, "tok_embed.", tie, embed_fn)]
        if self.pos_embed is not None:
            layers.append(LayerDef("pos_embed", self.pos_embed, "pos_embed.", None,
                                   lambda mod, x: _add_positions(mod, x, 0, p, mod.training)))
        else:
            layers.append(LayerDef("embed_dropout", self.drop, "drop.", None,
                                   lambda mod, x: _add_positions(None, x, 0, p, mod.training)))
        layers += [LayerDef(f"blocks.{i}", b, f"blocks.{i}.", None, None) for i, b in enumerate(self.blocks)]
        layers.append(LayerDef("final_norm", self.final_norm, "final_norm.", None, None))
        if self.lm_head is None:
            layers.append(LayerDef("lm_head", self.tok_embed, "tok_embed.", "embed",
                                   lambda mod, x: F.linear(x, mod.weight)))
        else:
            layers.append(LayerDef("lm_head", self.lm_head, "lm_head.", None, None))
        return layers

    # ----------------------------------------------------------------- generation

    def new_cache(self, batch_size: int, max_len: Optional[int] = None, *, device=None, dtype=None) -> KVCache:
        """Key/value buffers for :meth:`forward_cached` (max_len defaults to model.max_seq_len)."""
        return new_kv_cache(self, batch_size, max_len or self.config.max_seq_len, device=device, dtype=dtype)

    @torch.no_grad()
    def forward_cached(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, T, V) of ``input_ids`` continuing the ``cache.pos`` tokens already in ``cache``;
        appends their keys/values and advances ``cache.pos``."""
        B, T = input_ids.shape
        start = cache.pos
        self._check_len(T, start)
        if start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {start + T} needed.")
        x = self._embed(input_ids, start)
        for i, block in enumerate(self.blocks):
            x = block(x, None, (cache.k[i], cache.v[i]), start)
        cache.pos = start + T
        return self._logits(self.final_norm(x))


class GPTBackbone(_DecoderTrunk, nn.Module):
    """GPT without its LM head: ``forward(input_ids, attention_mask)`` -> final hidden states (B, T, C). Names
    as GPT's (tok_embed, pos_embed, blocks.{i}.*, final_norm); :meth:`of` shares an existing GPT's modules."""

    def __init__(self, cfg, *, init: bool = True):
        super().__init__()
        self.config = cfg
        self._build_trunk(cfg)
        if init:
            init_weights(self, std=cfg.init_std, n_layers=cfg.n_layers)

    @classmethod
    def of(cls, lm: GPT) -> GPTBackbone:
        """A backbone holding ``lm``'s own modules (parameters shared, not copied; lm_head left out)."""
        with torch.device("meta"):
            bb = cls(lm.config, init=False)
        for name in ("tok_embed", "pos_embed", "drop", "blocks", "final_norm"):
            setattr(bb, name, getattr(lm, name))
        return bb

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.hidden_states(input_ids, attention_mask)

    def tp_plan(self) -> dict[str, str]:
        return TP_PLAN


def _add_positions(pos_embed: Optional[nn.Embedding], x: torch.Tensor, start: int, p: float,
                   training: bool, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x + learned positions (if any) start..start+T-1, or ``position_ids`` (B, T); then embedding dropout."""
    if pos_embed is not None:
        if position_ids is None:
            pos = torch.arange(start, start + x.size(1), device=x.device)
            x = x + pos_embed(pos)  # (B, T, C) + (T, C)
        else:
            x = x + pos_embed(position_ids)  # (B, T, C) + (B, T, C)
    return F.dropout(x, p, training) if p > 0 else x
