"""The pipeline-parallel view of a model: an ordered list of layers that reproduces ``forward()``.

``model.pipeline_layers()`` returns :class:`LayerDef` s. Running them in order — the first on the batch
tensors tuple ``(input_ids,)`` (GPT, LSTM) or ``(input_ids, token_type_ids, attention_mask)`` (BERT), each
next one on its predecessor's output — gives exactly the logits of ``model(input_ids, ...)`` (or
``(logits, nsp_logits)`` for BERT with its NSP head). Between layers only tensors or tuples of tensors travel,
so an engine can cut the list into stages anywhere.

Tied weights: the token-embedding layer and the output-head layer share one module (the ``nn.Embedding``)
and the same ``tie_key`` ("embed"); the head's ``forward_fn`` multiplies by that module's weight. Everything
else a head needs (final norm, decoder bias) lives in layers of its own, so a tied module holds exactly the
shared parameter.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch.nn as nn


@dataclass
class LayerDef:
    """One pipeline layer.

    name: readable name ("tok_embed", "blocks.3", "final_norm", "lm_head").
    module: the module holding this layer's parameters — the model's own module (parameters are shared).
    param_prefix: prefix of the module's parameter names in the full model's ``state_dict``:
        ``param_prefix + local_name`` is the single-device name (e.g. "blocks.3." + "attn.q_proj.weight").
    tie_key: layers with the same key share ``module`` (tied embedding / output head); None otherwise.
    forward_fn: ``forward_fn(module, x) -> y``; None means ``module(x)``.
    """

    name: str
    module: nn.Module
    param_prefix: str
    tie_key: Optional[str] = None
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None

    def __call__(self, x: Any) -> Any:
        return self.forward_fn(self.module, x) if self.forward_fn is not None else self.module(x)


def run_layers(layers: list[LayerDef], inputs: Any) -> Any:
    """Run a layer list on one batch (what a single-stage pipeline does)."""
    x = inputs
    for layer in layers:
        x = layer(x)
    return x


def full_names(layer: LayerDef) -> dict[str, str]:
    """``{local parameter name: full-model state_dict name}`` for one layer."""
    return {n: layer.param_prefix + n for n, _ in layer.module.named_parameters()}
