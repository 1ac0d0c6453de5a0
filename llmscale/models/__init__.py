"""Single-device model code (never imports DeepSpeed): GPT/Llama causal LMs, BERT, an LSTM baseline, and
sequence classifiers on top of them (plus a BiLSTM one trained from scratch).

    model = build_model(cfg.model, vocab_size=tokenizer.vocab_size)
    out = model(input_ids, labels=labels)          # ModelOutput(logits, loss, num_targets, ...)

    clf = SequenceClassifier.from_pretrained_lm(model, ClassifierConfig(num_labels=2, pooling="cls_pooler",
                                                                        labels=["neg", "pos"]))
    out = clf(input_ids, attention_mask=mask, labels=y)   # logits (B, num_labels); see llmscale.models.classify

Every model has ``config`` (the resolved ModelConfig), ``num_params()``, ``flops_per_token(seq_len)``,
``tp_plan()`` and ``pipeline_layers()``; GPT and LSTM also ``new_cache()`` / ``forward_cached()`` for
:func:`llmscale.models.generate.generate`. Classifiers have all but ``pipeline_layers()`` (fine-tuning runs
data parallel) and add ``clf_config`` (the ClassifierConfig).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from llmscale.models.presets import PRESETS, resolve_config

if TYPE_CHECKING:
    import torch.nn as nn

    from llmscale.models.classify import ClassifierConfig, SequenceClassifier
    from llmscale.models.layers import ModelOutput
    from llmscale.models.pipeline import LayerDef

__all__ = ["build_model", "ModelOutput", "LayerDef", "PRESETS", "resolve_config", "SequenceClassifier",
           "ClassifierConfig"]


def __getattr__(name: str) -> Any:
    # torch is imported on first use only: the config loader imports llmscale.models.presets, and
    # `llmscale config show` should not pay for importing torch.
    if name == "ModelOutput":
        from llmscale.models.layers import ModelOutput

        return ModelOutput
    if name == "LayerDef":
        from llmscale.models.pipeline import LayerDef

        return LayerDef
    if name in ("SequenceClassifier", "ClassifierConfig"):
        from llmscale.models.classify import ClassifierConfig, SequenceClassifier

        return {"SequenceClassifier": SequenceClassifier, "ClassifierConfig": ClassifierConfig}[name]
    raise AttributeError(f"module 'llmscale.models' has no attribute {name!r}")


def build_model(cfg, *, vocab_size: Optional[int] = None) -> nn.Module:
    """The model ``cfg`` (a ModelConfig) describes, initialised from torch's current RNG on the current
    default device (``with torch.device("meta"):`` builds it without memory). ``vocab_size`` is the dataset
    tokenizer's; see :func:`resolve_config` for how it combines with ``cfg.vocab_size``."""
    from llmscale.errors import ConfigError

    if cfg.family == "bilstm":
        raise ConfigError(
            "model.family=bilstm is a sequence classifier, not a language model, so there is nothing to pretrain: "
            "fine-tune it from scratch (`llmscale finetune` with model.family=bilstm), or build it with "
            "SequenceClassifier.from_config(model_cfg, ClassifierConfig(..., pooling='attention')) "
            "from llmscale.models.classify.")
    rcfg = resolve_config(cfg, vocab_size)
    if rcfg.family == "gpt":
        from llmscale.models.gpt import GPT

        return GPT(rcfg)
    if rcfg.family == "bert":
        from llmscale.models.bert import BERT

        return BERT(rcfg)
    if rcfg.family == "lstm":
        from llmscale.models.lstm import LSTMLM

        return LSTMLM(rcfg)
    raise ConfigError(f"model.family={rcfg.family!r} is unknown; choose gpt, bert or lstm (or bilstm for a "
                      f"classifier).")
