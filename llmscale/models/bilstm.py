"""BiLSTM + additive self-attention: the from-scratch text-classification baseline (model.family=bilstm).

    tok_embed (V, C) -> dropout -> bidirectional LSTM, n_layers, C/2 units per direction (C wide out)
    -> additive self-attention a_t = softmax_t(v . tanh(W h_t + b)) over the real positions
    -> context sum_t a_t h_t (B, C) -> pooler.dense + tanh -> dropout -> classifier (C -> num_labels)

It is a :class:`llmscale.models.classify.SequenceClassifier` backbone (:class:`BiLSTMBackbone`, with pooling
"attention" = :class:`AdditiveAttention` here), not a class of its own: the forward/loss contract, num_targets,
building from scratch, the model folder and ``load_classifier_folder`` are then one implementation for every
classifier, and only what differs (the encoder and its pooling) lives in this module. It is never a language
model: ``build_model`` refuses family=bilstm.

Widths: ``d_model`` is both the embedding width and the BiLSTM's output width; each direction has d_model/2
units (ModelConfig requires an even d_model), so the attention, pooler and classifier are d_model wide whatever
the direction count. Preset ``bilstm-imdb``: 300-wide embeddings, 1 layer, 150 units each way.

Padding: the LSTM reads packed sequences (``pack_padded_sequence``), so pad positions never enter the
recurrence: the backward direction starts at each row's last real token, and a row's outputs do not depend
on the padding after it (its length or its ids). Batches must be right-padded (attention_mask 1..1 0..0); any
other mask is refused. Pad positions' outputs are 0 and their attention weight is exactly 0. A row without
any real token is read as its first token. ``max_seq_len`` is not enforced (a recurrence has no position table).

State-dict names (inside a SequenceClassifier; the checkpoint format):

    backbone.tok_embed.weight                                        (V, C)
    backbone.lstm.{weight_ih,weight_hh,bias_ih,bias_hh}_l{k}[_reverse]   PyTorch's nn.LSTM names (biases only
                                                                     with bias=true), hidden C/2
    attention.proj.{weight,bias}                                     (C, C)  W, b
    attention.score.weight                                           (1, C)  v
    pooler.dense.{weight,bias}, classifier.{weight,bias}             the head (llmscale.models.classify)

Initialisation: embedding normal(0, init_std); LSTM PyTorch's uniform(-1/sqrt(H), 1/sqrt(H)), as in lstm.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def right_padded_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Row lengths (B,) of a right-padded mask (1..1 0..0); ValueError naming the first offending row
    otherwise. (One host sync: the lengths must be known to pack the batch.)"""
    mask = attention_mask.bool()
    n = mask.sum(-1)
    expected = torch.arange(mask.size(1), device=mask.device)[None, :] < n[:, None]
    bad = (expected != mask).any(-1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"the BiLSTM classifier needs right-padded batches (attention_mask 1..1 0..0), but row {row} is "
            f"{mask[row].int().tolist()[:32]}: pad on the right (the data collator's padding_side='right').")
    return n


class BiLSTMBackbone(nn.Module):
    """tok_embed -> dropout -> bidirectional nn.LSTM; ``forward(input_ids, attention_mask)`` -> (B, T, C)."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        C = cfg.d_model
        if C % 2:
            raise ValueError(f"model.d_model={C} must be even for family=bilstm (d_model/2 units per direction).")
        self.tok_embed = nn.Embedding(cfg.vocab_size, C)
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(C, C // 2, num_layers=cfg.n_layers, bias=cfg.bias, batch_first=True, bidirectional=True,
                            dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)
        nn.init.normal_(self.tok_embed.weight, 0.0, cfg.init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T = input_ids.shape
        x = self.drop(self.tok_embed(input_ids))  # (B, T, C)
        if attention_mask is None or bool(attention_mask.all()):
            h, _ = self.lstm(x)
            return h  # (B, T, C)
        lengths = right_padded_lengths(attention_mask).clamp(min=1).cpu()
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        h, _ = pad_packed_sequence(out, batch_first=True, total_length=T)  # (B, T, C), 0 at pads
        return h

    def tp_plan(self) -> dict[str, str]:
        return {}  # nn.LSTM is not split; use parallel.tensor_parallel=1


class AdditiveAttention(nn.Module):
    """Bahdanau-style attention pooling: weights softmax_t(v . tanh(W h_t + b)) over ``mask`` == True."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, T, C); mask bool (B, T) with at least one True per row -> (pooled (B, C), weights (B, T)),
        weights exactly 0 where mask is False and summing to 1 per row."""
        e = self.score(torch.tanh(self.proj(h))).squeeze(-1).float()  # (B, T)
        a = torch.softmax(e.masked_fill(~mask, float("-inf")), dim=-1)  # (B, T)
        pooled = torch.bmm(a.to(h.dtype)[:, None, :], h).squeeze(1)  # (B, C)
        return pooled, a
