"""Pipeline parallelism: DeepSpeed ``PipelineModule`` layers built from a model's ``pipeline_layers()``.

The model describes itself as :class:`llmscale.models.pipeline.LayerDef` s; here they become layers of
a ``PipelineModule`` (tied embedding/head as ``TiedLayerSpec``, so DeepSpeed all-reduces their gradients
between first and last stage), and :func:`pipeline_param_names` maps the pipeline's parameter names back
to single-device names for checkpoints.

What does not live here: the pipeline loss and batches (:mod:`llmscale.engine`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from llmscale.errors import LayoutError


class _FnLayer(nn.Module):
    """A pipeline layer whose forward is ``fn(module, x)`` (LayerDef.forward_fn)."""

    def __init__(self, module: nn.Module, fn: Callable):
        super().__init__()
        self.inner = module
        self.fn = fn

    def forward(self, x):
        return self.fn(self.inner, x)


def _tied_spec(key: str, module: nn.Module, forward_fn: Optional[Callable], attrs: list[str]):
    from deepspeed.pipe import TiedLayerSpec

    class _PrebuiltTied(TiedLayerSpec):
        """TiedLayerSpec whose build() hands back the already-initialised module (same seeded weights everywhere)."""

        def build(self, log=False):
            return module

    return _PrebuiltTied(key, type(module), forward_fn=forward_fn, tied_weight_attr=attrs)


@dataclass
class PipelinePieces:
    layers: list  # nn.Module or TiedLayerSpec, in order
    defs: list  # the LayerDefs
    tied_attrs: dict[str, list[str]]


def pipeline_pieces(model: nn.Module) -> PipelinePieces:
    """Turn ``model.pipeline_layers()`` into PipelineModule layers.

    A tied group (same ``tie_key``) shares one module. It is wrapped once as ``_FnLayer(module, fn of the
    first member)`` and that wrapper is the tied module: the first member runs it directly (so DeepSpeed's
    per-layer checkpoint files contain it — a tied layer given as ``forward_fn`` is a ``partial`` without a
    state_dict and would silently be left out), later members call their own function on ``wrapper.inner``.
    All of the wrapped module's parameters are tied (DeepSpeed all-reduces their gradients between stages)."""
    if not hasattr(model, "pipeline_layers"):
        raise LayoutError(f"{type(model).__name__} has no pipeline_layers(); use parallel.pipeline_parallel=1.")
    defs = list(model.pipeline_layers())
    wrappers: dict[str, _FnLayer] = {}
    layers: list = []
    tied_attrs: dict[str, list[str]] = {}
    for d in defs:
        if d.tie_key is None:
            layers.append(_FnLayer(d.module, d.forward_fn) if d.forward_fn is not None else d.module)
            continue
        if d.tie_key not in wrappers:
            wrappers[d.tie_key] = _FnLayer(d.module, d.forward_fn or _call)
            tied_attrs[d.tie_key] = [f"inner.{n}" for n, _ in d.module.named_parameters()]
            layers.append(_tied_spec(d.tie_key, wrappers[d.tie_key], None, tied_attrs[d.tie_key]))
            continue
        if wrappers[d.tie_key].inner is not d.module:
            raise LayoutError(
                f"pipeline_layers(): LayerDefs with tie_key={d.tie_key!r} must share one module "
                f"(got two different ones).")
        layers.append(_tied_spec(d.tie_key, wrappers[d.tie_key], _on_inner(d.forward_fn or _call),
                                 tied_attrs[d.tie_key]))
    return PipelinePieces(layers=layers, defs=defs, tied_attrs=tied_attrs)


def _call(module: nn.Module, x):
    return module(x)


def _on_inner(fn: Callable) -> Callable:
    def run(wrapper: _FnLayer, x):
        return fn(wrapper.inner, x)

    return run


def pipeline_param_names(pieces: PipelinePieces, model: nn.Module) -> dict[str, str]:
    """``{PipelineModule parameter name: single-device name}`` for every stage (identity of the shared params)."""
    full = {}
    for name, p in model.named_parameters():
        full.setdefault(id(p), name)
    out: dict[str, str] = {}
    for idx, (d, layer) in enumerate(zip(pieces.defs, pieces.layers)):
        if d.tie_key is not None:
            base, mod = f"tied_modules.{d.tie_key}.inner", d.module
        else:
            base, mod = str(idx), layer
        for n, p in mod.named_parameters():
            out.setdefault(f"{base}.{n}", full[id(p)])
    return out
