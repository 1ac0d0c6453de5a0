"""Single-device model code (never imports DeepSpeed): GPT/Llama causal LMs, BERT, an LSTM baseline.

    model = build_model(cfg.model, vocab_size=tokenizer.vocab_size)
    out = model(input_ids, labels=labels)          # ModelOutput(logits, loss, num_targets, ...)

Every model has ``config`` (the resolved ModelConfig), ``num_params()``, ``flops_per_token(seq_len)``,
``tp_plan()`` and ``pipeline_layers()``; GPT and LSTM also ``new_cache()`` / ``forward_cached()`` for
:func:`llmscale.models.generate.generate`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from llmscale.models.presets import PRESETS, resolve_config

if TYPE_CHECKING:
    import torch.nn as nn

    from llmscale.models.layers import ModelOutput
    from llmscale.models.pipeline import LayerDef

__all__ = ["build_model", "ModelOutput", "LayerDef", "PRESETS", "resolve_config"]


def __getattr__(name: str) -> Any:
    # torch is imported on first use only: the config loader imports llmscale.models.presets, and
    # `llmscale config show` should not pay for importing torch.
    if name == "ModelOutput":
        from llmscale.models.layers import ModelOutput

        return ModelOutput
    if name == "LayerDef":
        from llmscale.models.pipeline import LayerDef

        return LayerDef
    raise AttributeError(f"module 'llmscale.models' has no attribute {name!r}")


def build_model(cfg, *, vocab_size: Optional[int] = None) -> nn.Module:
    """The model ``cfg`` (a ModelConfig) describes, initialised from torch's current RNG on the current
    default device (``with torch.device("meta"):`` builds it without memory). ``vocab_size`` is the dataset
    tokenizer's; see :func:`resolve_config` for how it combines with ``cfg.vocab_size``."""
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
    from llmscale.errors import ConfigError

    raise ConfigError(f"model.family={rcfg.family!r} is unknown; choose gpt, bert or lstm.")
