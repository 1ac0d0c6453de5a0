"""Baseline: a multi-layer LSTM language model (embedding -> LSTM -> dropout -> output head tied to the
embedding), with the same forward contract as GPT. Names: tok_embed.weight, lstm.{weight,bias}_{ih,hh}_l{k},
lm_head.weight (untied only)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmscale.models.layers import LanguageModel, ModelOutput, lm_loss
from llmscale.models.pipeline import LayerDef


@dataclass
class LSTMState:
    """The recurrent state is the LSTM's "KV cache": (h, c), each (layers, B, C), and tokens consumed."""

    h: Optional[torch.Tensor] = None
    c: Optional[torch.Tensor] = None
    pos: int = 0
    max_len: int = 1 << 62


class LSTMLM(LanguageModel):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        C = cfg.d_model
        self.tok_embed = nn.Embedding(cfg.vocab_size, C)
        self.lstm = nn.LSTM(C, C, num_layers=cfg.n_layers, bias=cfg.bias, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(C, cfg.vocab_size, bias=False)
        # Embedding and head normal(0, init_std) as in the transformers; LSTM weights keep PyTorch's
        # uniform(-1/sqrt(C), 1/sqrt(C)), the usual LSTM initialisation.
        nn.init.normal_(self.tok_embed.weight, 0.0, cfg.init_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, 0.0, cfg.init_std)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.drop(h)
        return F.linear(h, self.tok_embed.weight) if self.lm_head is None else self.lm_head(h)

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
        """Same contract as GPT. An LSTM reads left to right, so attention_mask is only accepted when it is
        all ones (right padding is harmless: its outputs are simply ignored through labels=-100). Packed rows
        (position_ids / doc_ids) are refused: the recurrent state would carry one example into the next."""
        if token_type_ids is not None or next_sentence_label is not None:
            raise ValueError("token_type_ids / next_sentence_label are BERT inputs; the LSTM LM takes neither.")
        if position_ids is not None or doc_ids is not None:
            raise ValueError("the LSTM LM cannot keep packed examples apart (its state runs through the whole row): "
                             "fine-tune it with packing=false, or pack for a GPT model.")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("the LSTM LM reads every position: pass right-padded batches without attention_mask "
                             "and ignore padded targets with labels=-100.")
        x = self.drop(self.tok_embed(input_ids))  # (B, T, C)
        h, _ = self.lstm(x)  # (B, T, C)
        logits = self._logits(h)
        if labels is None:
            return ModelOutput(logits=logits)
        loss, n = lm_loss(logits, labels)
        return ModelOutput(logits=logits, loss=loss, num_targets=n)

    def tp_plan(self) -> dict[str, str]:
        return {}  # nn.LSTM is not split; use parallel.tensor_parallel=1

    def pipeline_layers(self) -> list[LayerDef]:
        """tok_embed (tied) -> lstm -> lm_head."""
        tie = "embed" if self.lm_head is None else None
        p = self.drop.p

        def embed_fn(mod: nn.Module, inputs: Any) -> torch.Tensor:
            ids = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
            return F.dropout(mod(ids), p, mod.training)

        def head_fn(mod: nn.Module, h: torch.Tensor) -> torch.Tensor:
            h = F.dropout(h, p, mod.training)
            return F.linear(h, mod.weight)

        return [
            LayerDef("tok_embed", self.tok_embed, "tok_embed.", tie, embed_fn),
            LayerDef("lstm", self.lstm, "lstm.", None, lambda mod, x: mod(x)[0]),
            LayerDef("lm_head", self.tok_embed if tie else self.lm_head, "tok_embed." if tie else "lm_head.", tie,
                     head_fn),
        ]

    # generation: the recurrent state plays the KV cache's part
    def new_cache(self, batch_size: int, max_len: Optional[int] = None, *, device=None, dtype=None) -> LSTMState:
        return LSTMState()

    @torch.no_grad()
    def forward_cached(self, input_ids: torch.Tensor, cache: LSTMState) -> torch.Tensor:
        x = self.drop(self.tok_embed(input_ids))
        state = None if cache.h is None else (cache.h, cache.c)
        h, (cache.h, cache.c) = self.lstm(x, state)
        cache.pos += input_ids.size(1)
        return self._logits(h)
