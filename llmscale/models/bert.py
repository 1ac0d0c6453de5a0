"""BERT: bidirectional encoder with a masked-LM head (tied to the word embeddings) and an optional
next-sentence-prediction head.

    word + position + token-type embeddings -> [LayerNorm, post-norm] -> dropout -> N blocks
    -> [final norm, pre-norm] -> MLM head: dense -> GELU -> LayerNorm -> decoder (tied) + bias
    NSP head (optional): pooler dense -> tanh on [CLS] (position 0) -> classifier (2 classes)

Post-norm with exact (erf) GELU is the original BERT and maps onto transformers' BertForMaskedLM /
BertForPreTraining. State-dict names:

    tok_embed.weight                          (V, C) — also the MLM decoder weight when tied
    embed.pos_embed.weight, embed.type_embed.weight, embed.norm.{weight,bias} (post-norm only)
    blocks.{i}.attn.{q,k,v,o}_proj.{weight,bias}, blocks.{i}.attn_norm.*, blocks.{i}.mlp.{up,down}_proj.*,
    blocks.{i}.mlp_norm.*
    final_norm.{weight,bias}                  (pre-norm only)
    mlm_head.transform.dense.{weight,bias}, mlm_head.transform.norm.{weight,bias}
    mlm_head.decoder.bias (V), mlm_head.decoder.weight (untied only)
    nsp_head.pooler.{weight,bias}, nsp_head.classifier.{weight,bias}     (nsp_head only)

:class:`BertBackbone` is the encoder alone (embeddings + blocks + norms, no heads; hidden states out) under the
same names: the backbone of :class:`llmscale.models.classify.SequenceClassifier`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmscale.models.layers import (
    TP_PLAN,
    Block,
    LanguageModel,
    ModelOutput,
    init_weights,
    lm_loss,
    make_norm,
    run_block,
)
from llmscale.models.pipeline import LayerDef


def _key_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """bool (B, T) padding mask, or None when every token is real (lets SDPA take its unmasked path)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()


def _add_bias(z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Decoder bias in the matmul's dtype: under bf16 autocast the (B, T, V) logits stay bf16."""
    return z + bias.to(z.dtype)


class _Embeddings(nn.Module):
    """Positions and token types added to the word embeddings, then (post-norm) LayerNorm and dropout."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.d_model
        self.pos_embed = nn.Embedding(cfg.max_seq_len, C)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, C)
        self.norm = make_norm(cfg) if cfg.norm_position == "post" else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, words: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        T = words.size(1)
        x = words + self.pos_embed(torch.arange(T, device=words.device)) + self.type_embed(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)


class _MLMTransform(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.norm = make_norm(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(x)))


class _Decoder(nn.Module):
    """The MLM output bias (and the decoder weight when untied)."""

    def __init__(self, cfg, tied: bool):
        super().__init__()
        self.weight = None if tied else nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        if self.weight is not None:
            nn.init.normal_(self.weight, 0.0, cfg.init_std)


class _MLMHead(nn.Module):
    def __init__(self, cfg, tied: bool):
        super().__init__()
        self.transform = _MLMTransform(cfg)
        self.decoder = _Decoder(cfg, tied)


class _NSPHead(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.classifier = nn.Linear(cfg.d_model, 2, bias=cfg.bias)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(cls_hidden)))  # (B, 2)


class _EncoderTrunk:
    """tok_embed -> embed -> blocks -> [final_norm]: the part BERT and BertBackbone share, under the same
    attribute (hence state-dict) names. A mixin of nn.Module subclasses."""

    _TRUNK = ("tok_embed", "embed", "blocks", "final_norm")

    def _build_trunk(self, cfg) -> None:
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed = _Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg, causal=False, gelu_approximate="none") for _ in range(cfg.n_layers))
        self.final_norm = make_norm(cfg) if cfg.norm_position == "pre" else None

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                      token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encoder output (B, T, C). attention_mask (B, T) 1 = real, 0 = padding; token_type_ids (B, T)
        segment ids (default 0)."""
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.config.max_seq_len}: use a "
                             f"shorter data.seq_len or a model with a larger max_seq_len.")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        key_mask = _key_mask(attention_mask)
        x = self.embed(self.tok_embed(input_ids), token_type_ids)  # (B, T, C)
        ckpt = self.config.activation_checkpointing and self.training
        for block in self.blocks:
            x = run_block(block, x, key_mask, ckpt)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x


class BERT(_EncoderTrunk, LanguageModel):
    """Masked LM (+ NSP). ``cfg`` must be resolved (see :func:`llmscale.models.build_model`)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self._build_trunk(cfg)
        self.mlm_head = _MLMHead(cfg, tied=cfg.tie_embeddings)
        self.nsp_head = _NSPHead(cfg) if cfg.nsp_head else None
        init_weights(self, std=cfg.init_std, n_layers=cfg.n_layers)

    def _decoder_weight(self) -> torch.Tensor:
        w = self.mlm_head.decoder.weight
        return self.tok_embed.weight if w is None else w

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """MLM logits (..., V) of hidden states (..., C): transform, then the (tied) decoder and its bias."""
        return _add_bias(F.linear(self.mlm_head.transform(x), self._decoder_weight()), self.mlm_head.decoder.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        next_sentence_label: Optional[torch.Tensor] = None,
    ) -> ModelOutput:
        """input_ids (B, T); attention_mask (B, T) 1 = real, 0 = padding; token_type_ids (B, T) segment ids
        (default 0); labels (B, T) the original id at masked positions, -100 elsewhere; next_sentence_label
        (B,) 0 = B follows A, 1 = random (needs the NSP head). Without labels, logits are (B, T, V); with labels,
        (N, V) for the N masked positions only."""
        x = self.hidden_states(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        nsp_logits = self.nsp_head(x[:, 0]) if self.nsp_head is not None else None
        if labels is None:
            out = ModelOutput(logits=self._decode(x), nsp_logits=nsp_logits)  # (B, T, V)
        else:
            # With labels only the masked rows are decoded (about 15 % of them): the (B, T, V) decoder and its
            # softmax were ~70 % of a BERT-Tiny step. out.logits is then (N, V), the rows labels != -100 picks
            # in row-major order; the loss is the same mean cross-entropy over them.
            keep = labels != -100
            logits = self._decode(x[keep])  # (N, V)
            out = ModelOutput(logits=logits, nsp_logits=nsp_logits)
            out.mlm_loss, out.num_targets = lm_loss(logits, labels[keep])
            out.loss = out.mlm_loss
        if next_sentence_label is not None:
            if nsp_logits is None:
                raise ValueError("next_sentence_label given but the model has no NSP head: set model.nsp_head=true.")
            out.nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label)
            out.loss = out.nsp_loss if out.loss is None else out.loss + out.nsp_loss
        return out

    def tp_plan(self) -> dict[str, str]:
        return TP_PLAN

    def pipeline_layers(self) -> list[LayerDef]:
        """tok_embed (tied) -> embed -> blocks.i -> [final_norm] -> mlm_transform -> [nsp_head] -> mlm_decoder
        (tied) -> mlm_bias. The input is ``(input_ids, token_type_ids, attention_mask)``; the attention mask
        travels with the hidden states as ``(h, attention_mask)``; the output is logits, or
        ``(logits, nsp_logits)`` with the NSP head."""
        tied = self.mlm_head.decoder.weight is None
        nsp = self.nsp_head is not None

        def tok_fn(mod: nn.Module, inputs: Any):
            if not isinstance(inputs, (tuple, list)):
                inputs = (inputs,)
            ids = inputs[0]
            types = inputs[1] if len(inputs) > 1 else torch.zeros_like(ids)
            mask = inputs[2] if len(inputs) > 2 else torch.ones_like(ids)
            return mod(ids), types, mask

        def embed_fn(mod: nn.Module, x):
            words, types, mask = x
            return mod(words, types), mask

        def block_fn(mod: nn.Module, x):
            h, mask = x
            return mod(h, _key_mask(mask)), mask

        def final_norm_fn(mod: nn.Module, x):
            h, mask = x
            return mod(h), mask

        def transform_fn(mod: nn.Module, x):
            h, _mask = x
            t = mod(h)
            return (t, h[:, 0].contiguous()) if nsp else t

        def nsp_fn(mod: nn.Module, x):
            t, cls_hidden = x
            return t, mod(cls_hidden)

        def on_first(fn):
            return lambda mod, x: (fn(mod, x[0]), *x[1:]) if isinstance(x, tuple) else fn(mod, x)

        layers = [
            LayerDef("tok_embed", self.tok_embed, "tok_embed.", "embed" if tied else None, tok_fn),
            LayerDef("embed", self.embed, "embed.", None, embed_fn),
        ]
        layers += [LayerDef(f"blocks.{i}", b, f"blocks.{i}.", None, block_fn) for i, b in enumerate(self.blocks)]
        if self.final_norm is not None:
            layers.append(LayerDef("final_norm", self.final_norm, "final_norm.", None, final_norm_fn))
        layers.append(LayerDef("mlm_transform", self.mlm_head.transform, "mlm_head.transform.", None, transform_fn))
        if nsp:
            layers.append(LayerDef("nsp_head", self.nsp_head, "nsp_head.", None, nsp_fn))
        if tied:
            layers.append(LayerDef("mlm_decoder", self.tok_embed, "tok_embed.", "embed",
                                   on_first(lambda mod, t: F.linear(t, mod.weight))))
            layers.append(LayerDef("mlm_bias", self.mlm_head.decoder, "mlm_head.decoder.", None,
                                   on_first(lambda mod, z: _add_bias(z, mod.bias))))
        else:
            layers.append(LayerDef("mlm_decoder", self.mlm_head.decoder, "mlm_head.decoder.", None,
                                   on_first(lambda mod, t: _add_bias(F.linear(t, mod.weight), mod.bias))))
        return layers


class BertBackbone(_EncoderTrunk, nn.Module):
    """BERT's encoder without heads: ``forward(input_ids, attention_mask, token_type_ids)`` -> hidden states
    (B, T, C). Names as BERT's (tok_embed, embed.*, blocks.{i}.*, final_norm); :meth:`of` shares a BERT's
    modules."""

    def __init__(self, cfg, *, init: bool = True):
        super().__init__()
        self.config = cfg
        self._build_trunk(cfg)
        if init:
            init_weights(self, std=cfg.init_std, n_layers=cfg.n_layers)

    @classmethod
    def of(cls, lm: BERT) -> BertBackbone:
        """A backbone holding ``lm``'s own modules (parameters shared, not copied; MLM and NSP heads left out)."""
        with torch.device("meta"):
            bb = cls(lm.config, init=False)
        for name in cls._TRUNK:
            setattr(bb, name, getattr(lm, name))
        return bb

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.hidden_states(input_ids, attention_mask, token_type_ids)

    def tp_plan(self) -> dict[str, str]:
        return TP_PLAN
