"""Sequence classification on llmscale backbones: BERT, GPT-2 / Llama style decoders, and the BiLSTM.

    clf_cfg = ClassifierConfig(num_labels=2, pooling="cls_pooler", labels=["neg", "pos"])
    clf = SequenceClassifier.from_pretrained_lm(bert, clf_cfg)   # the LM's own backbone parameters, head dropped
    clf = SequenceClassifier.from_config(model_cfg, clf_cfg, vocab_size=tok.vocab_size)   # random weights
    out = clf(input_ids, attention_mask=mask, labels=y)         # ModelOutput(logits (B, K), loss, num_targets)

Pooling (``ClassifierConfig.pooling``) by family, h = the backbone's last hidden states (B, T, C):

  bert    cls_pooler  tanh(pooler.dense(h[:, 0])) -> dropout -> classifier; exactly transformers'
                      BertForSequenceClassification. The pooler is BERT's next-sentence-prediction input: a
                      pretraining with NSP (model.nsp_head=true) trains it and from_pretrained_lm hands it over;
                      an MLM-only pretraining leaves it untrained, so it starts from random (init_std) weights,
                      as in transformers when a BertForSequenceClassification loads a masked-LM checkpoint.
          cls         h[:, 0] -> dropout -> classifier (no pooler)
          mean        mean of h over the attention_mask == 1 positions -> dropout -> classifier
  gpt     last        h at each row's last real token -> dropout -> score (no bias); exactly transformers'
                      GPT2ForSequenceClassification / LlamaForSequenceClassification. The last real token is the
                      rightmost position with attention_mask == 1, or without a mask the rightmost one with
                      input_ids != pad_id (transformers' rule, with pad_token_id = pad_id).
  bilstm  attention   additive self-attention over the BiLSTM states (llmscale.models.bilstm) -> pooler.dense +
                      tanh -> dropout -> classifier

A row without any real token pools its position 0. ``token_type_ids`` are BERT-only.

Loss. With labels (B,) of class ids (-100 = ignore the example) and w = class_weights (or all ones):

    loss = sum_{i: y_i != -100} w[y_i] * CE(logits_i, y_i) / N,     N = #{i: y_i != -100} = num_targets

This divides by the *number of examples*, not by sum_i w[y_i] as torch's weighted cross-entropy mean does:
loss * N is then additive over micro-batches, so an engine accumulating micro-batches (and data-parallel ranks)
gets the exact per-example mean of the whole optimizer step as sum_k(loss_k * N_k) / sum_k N_k. N = 0 gives
loss 0 (not NaN). The loss is computed in fp32.

State-dict names (the checkpoint format; the transformers mapping in :mod:`llmscale.models.hf_classify` is a
rename of these):

    backbone.*                      the LM's own names: GPT tok_embed, pos_embed, blocks.{i}.*, final_norm
                                    (gpt.py); BERT tok_embed, embed.*, blocks.{i}.*, final_norm (bert.py);
                                    BiLSTM tok_embed, lstm.* (bilstm.py). No LM head.
    pooler.dense.{weight,bias}      (C, C)  cls_pooler and attention (bias per model.bias for BERT)
    attention.proj.{weight,bias}    (C, C), attention.score.weight (1, C)     attention only
    classifier.{weight,bias}        (K, C)  bert and bilstm
    score.weight                    (K, C)  gpt (no bias)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmscale.config import doc
from llmscale.errors import ConfigError
from llmscale.log import get_logger
from llmscale.models.layers import ModelOutput, count_params, init_weights

log = get_logger(__name__)

# The poolings each family offers (the first is the default a job may pick).
POOLINGS: dict[str, tuple[str, ...]] = {"bert": ("cls_pooler", "cls", "mean"), "gpt": ("last",),
                                        "bilstm": ("attention",)}


@dataclass
class ClassifierConfig:
    """A classification head: its classes (names, index = class id), pooling, class weights and dropout."""

    num_labels: int = doc(text="Number of classes (>= 2); must equal len(labels).")
    pooling: Literal["cls_pooler", "cls", "mean", "last", "attention"] = doc(
        text="bert: cls_pooler | cls | mean; gpt: last; bilstm: attention (see llmscale.models.classify).")
    labels: list[str] = doc(text="Class names; labels[i] is class id i (exported as id2label).")
    class_weights: Optional[list[float]] = doc(
        None, "Per-class loss weights w[y] (default all 1); loss = sum w[y]*CE / number of examples.")
    dropout: float = doc(0.1, "Dropout on the pooled vector, before the classifier.")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.num_labels < 2:
            raise ConfigError(f"classifier num_labels={self.num_labels}: a classifier needs at least 2 classes.")
        if len(self.labels) != self.num_labels:
            raise ConfigError(
                f"classifier num_labels={self.num_labels} but labels has {len(self.labels)} names "
                f"({self.labels[:8]}): give one name per class (labels[i] names class id i), or set "
                f"num_labels={len(self.labels)}.")
        if any(not isinstance(n, str) or not n for n in self.labels):
            raise ConfigError(f"classifier labels must be non-empty strings, got {self.labels}.")
        dup = sorted({n for n in self.labels if self.labels.count(n) > 1})
        if dup:
            raise ConfigError(f"classifier labels repeat {dup}: each class needs its own name (label2id needs them "
                              f"unique).")
        if self.pooling not in {p for ps in POOLINGS.values() for p in ps}:
            raise ConfigError(f"classifier pooling={self.pooling!r} is unknown; choose per family: {POOLINGS}.")
        w = self.class_weights
        if w is not None:
            if len(w) != self.num_labels:
                raise ConfigError(f"classifier class_weights has {len(w)} values for num_labels={self.num_labels}: "
                                  f"give one weight per class, in labels order, or none.")
            if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
                raise ConfigError(f"classifier class_weights must be finite, >= 0 and not all 0, got {w}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"classifier dropout must be in [0, 1), got {self.dropout}.")

    def check_family(self, family: str) -> None:
        """ConfigError unless ``pooling`` exists for model.family ``family``."""
        if family not in POOLINGS:
            raise ConfigError(
                f"model.family={family!r} has no classifier: classify with a bert or gpt backbone "
                f"(fine-tuned from a pretrained LM or from scratch) or family=bilstm (from scratch).")
        if self.pooling not in POOLINGS[family]:
            raise ConfigError(f"classifier pooling={self.pooling!r} is not available for model.family={family}; "
                              f"choose {' | '.join(POOLINGS[family])}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> ClassifierConfig:
        """Strict: unknown keys and wrong types raise ConfigError (llmscale.config's rules)."""
        from llmscale.config import from_dict

        return from_dict(cls, raw)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor,
                        class_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over labels != -100 of w[y] * CE / their number, their number), in fp32: the module docstring's
    definition. ValueError for a label outside [0, K) other than -100 (one host sync, instead of a device-side
    assert deep inside cross_entropy)."""
    B, K = logits.shape
    if labels.shape != (B,):
        raise ValueError(f"labels must have shape (batch,) = ({B},) with one class id per example, "
                         f"got {tuple(labels.shape)}.")
    valid = labels != -100
    bad = valid & ((labels < 0) | (labels >= K))
    if bool(bad.any()):
        raise ValueError(f"labels must be class ids in [0, {K}) or -100 (ignored), got {labels[bad][:5].tolist()}.")
    n = valid.sum()
    ce = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")  # (B,), 0 where ignored
    if class_weights is not None:
        ce = ce * class_weights.float()[labels.clamp(min=0)]
    return ce.sum() / n.clamp(min=1), n


def pool_mask(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], pad_id: Optional[int]) -> torch.Tensor:
    """bool (B, T): the real positions (attention_mask == 1; without a mask, input_ids != pad_id, or every
    position when pad_id is None), with position 0 counted real in rows that have none."""
    if attention_mask is not None:
        mask = attention_mask.bool()
    elif pad_id is not None:
        mask = input_ids != pad_id
    else:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
    empty = ~mask.any(-1)
    return torch.cat([mask[:, :1] | empty[:, None], mask[:, 1:]], dim=1)


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) the rightmost True position of each row of ``mask`` (0 for a row without any)."""
    pos = torch.arange(mask.size(1), device=mask.device)
    return (pos[None, :] * mask.long()).argmax(-1)


class _Pooler(nn.Module):
    """tanh(dense(x)): BERT's pooler (also the BiLSTM's dense layer after the attention)."""

    def __init__(self, dim: int, *, bias: bool = True, dense: Optional[nn.Linear] = None):
        super().__init__()
        self.dense = dense if dense is not None else nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))


def _new_backbone(cfg) -> nn.Module:
    if cfg.family == "gpt":
        from llmscale.models.gpt import GPTBackbone

        return GPTBackbone(cfg)
    if cfg.family == "bert":
        from llmscale.models.bert import BertBackbone

        return BertBackbone(cfg)
    if cfg.family == "bilstm":
        from llmscale.models.bilstm import BiLSTMBackbone

        return BiLSTMBackbone(cfg)
    raise ConfigError(f"model.family={cfg.family!r} has no classifier backbone: use bert, gpt or bilstm.")


class SequenceClassifier(nn.Module):
    """One label per sequence on a GPT, BERT or BiLSTM backbone (see the module docstring).

    ``cfg`` is a resolved ModelConfig (``model.config`` of an LM, or :meth:`from_config` resolves one);
    ``pad_id`` is the tokenizer's pad id, used by GPT pooling when no attention_mask is given. ``backbone``
    and ``pooler_dense`` hand over existing modules (:meth:`from_pretrained_lm`); otherwise everything is
    initialised from torch's current RNG (head: normal(0, init_std), zero biases)."""

    def __init__(self, cfg, clf_cfg: ClassifierConfig, *, pad_id: int = 0, backbone: Optional[nn.Module] = None,
                 pooler_dense: Optional[nn.Linear] = None):
        super().__init__()
        clf_cfg.validate()
        clf_cfg.check_family(cfg.family)
        if cfg.vocab_size is None:
            raise ConfigError("the classifier's ModelConfig has no vocab_size: pass a resolved config "
                              "(SequenceClassifier.from_config resolves one).")
        self.config = cfg
        self.clf_config = clf_cfg
        self.pad_id = pad_id
        self.backbone = backbone if backbone is not None else _new_backbone(cfg)
        C, K, pooling = cfg.d_model, clf_cfg.num_labels, clf_cfg.pooling
        new: list[nn.Module] = []
        self.attention = None
        if pooling == "attention":
            from llmscale.models.bilstm import AdditiveAttention

            self.attention = AdditiveAttention(C)
            new.append(self.attention)
        self.pooler = None
        if pooling in ("cls_pooler", "attention"):
            self.pooler = _Pooler(C, bias=cfg.bias if cfg.family == "bert" else True, dense=pooler_dense)
            if pooler_dense is None:
                new.append(self.pooler)
        self.drop = nn.Dropout(clf_cfg.dropout)
        if cfg.family == "gpt":
            self.score = nn.Linear(C, K, bias=False)
            new.append(self.score)
        else:
            self.classifier = nn.Linear(C, K)
            new.append(self.classifier)
        for mod in new:
            init_weights(mod, std=cfg.init_std, n_layers=1)
        w = clf_cfg.class_weights
        self.register_buffer("class_weights", None if w is None else torch.tensor(w, dtype=torch.float32),
                             persistent=False)  # not in the state dict: clf_config carries it

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, model_cfg, clf_cfg: ClassifierConfig, *, vocab_size: Optional[int] = None,
                    pad_id: int = 0) -> SequenceClassifier:
        """Same architecture as the LM ``model_cfg`` describes (or the BiLSTM), random weights; ``vocab_size``
        as in :func:`llmscale.models.build_model`."""
        from llmscale.models.presets import resolve_config

        return cls(resolve_config(model_cfg, vocab_size), clf_cfg, pad_id=pad_id)

    @classmethod
    def from_pretrained_lm(cls, lm: nn.Module, clf_cfg: ClassifierConfig, *, pad_id: int = 0) -> SequenceClassifier:
        """A classifier whose backbone *is* ``lm``'s (its modules, so its parameters, shared, not copied; the
        LM head dropped). BERT with pooling cls_pooler takes the NSP head's pooler when ``lm`` has one, else
        a freshly initialised pooler (see the module docstring); the classifier itself is always new."""
        from llmscale.models.bert import BERT, BertBackbone
        from llmscale.models.gpt import GPT, GPTBackbone

        if isinstance(lm, GPT):
            return cls(lm.config, clf_cfg, pad_id=pad_id, backbone=GPTBackbone.of(lm))
        if isinstance(lm, BERT):
            dense = None
            if clf_cfg.pooling == "cls_pooler":
                if lm.nsp_head is not None:
                    dense = lm.nsp_head.pooler
                else:
                    log.info("the BERT LM has no NSP head (MLM-only pretraining): the classifier's pooler starts "
                             "from random weights")
            return cls(lm.config, clf_cfg, pad_id=pad_id, backbone=BertBackbone.of(lm), pooler_dense=dense)
        family = getattr(getattr(lm, "config", None), "family", None)
        raise ConfigError(
            f"from_pretrained_lm takes an llmscale GPT or BERT language model, got {type(lm).__name__}"
            f"{f' (model.family={family})' if family else ''}: the LSTM LM has no classifier (it reads one way); "
            f"a family=bilstm classifier trains from scratch (SequenceClassifier.from_config).")

    # ----------------------------------------------------------------- the contract

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> ModelOutput:
        """input_ids (B, T); attention_mask (B, T) 1 = real, 0 = padding; token_type_ids (B, T) (BERT only);
        labels (B,) class ids, -100 = ignored. Returns logits (B, num_labels) and, with labels, loss and
        num_targets as defined in the module docstring."""
        family = self.config.family
        if family == "bert":
            h = self.backbone(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        else:
            if token_type_ids is not None:
                raise ValueError(f"token_type_ids are BERT inputs; a {family} classifier takes none.")
            h = self.backbone(input_ids, attention_mask)  # (B, T, C)
        logits = self._head(self._pool(h, input_ids, attention_mask))  # (B, K)
        out = ModelOutput(logits=logits)
        if labels is not None:
            out.loss, out.num_targets = classification_loss(logits, labels, self.class_weights)
        return out

    def _pool(self, h: torch.Tensor, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        pooling = self.clf_config.pooling
        if pooling in ("cls_pooler", "cls"):
            x = h[:, 0]  # (B, C)
        elif pooling == "last":
            idx = last_real_index(pool_mask(input_ids, attention_mask, self.pad_id))
            x = h[torch.arange(h.size(0), device=h.device), idx]  # (B, C)
        else:
            mask = pool_mask(input_ids, attention_mask, None)  # (B, T)
            if pooling == "mean":
                m = mask.to(torch.float32)[:, :, None]
                x = ((h.float() * m).sum(1) / m.sum(1)).to(h.dtype)  # (B, C)
            else:
                x, _ = self.attention(h, mask)
        if self.pooler is not None:
            x = self.pooler(x)
        return self.drop(x)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x) if self.config.family == "gpt" else self.classifier(x)

    # ----------------------------------------------------------------- what every llmscale model has

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Exact parameter count; ``exclude_embeddings`` drops the nn.Embedding tables."""
        return count_params(self, exclude_embeddings=exclude_embeddings)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at ``seq_len`` (:func:`llmscale.models.flops.classifier_flops_per_token`)."""
        from llmscale.models import flops

        return flops.classifier_flops_per_token(self.config, seq_len, num_labels=self.clf_config.num_labels,
                                                pooling=self.clf_config.pooling)

    def tp_plan(self) -> dict[str, str]:
        """The backbone's tensor-parallel plan under the ``backbone.`` prefix (the head stays replicated)."""
        return {r"backbone\." + k: v for k, v in self.backbone.tp_plan().items()}
