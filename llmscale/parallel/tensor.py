"""Tensor parallelism applied to a single-device model from outside.

Megatron-style :class:`ColumnParallelLinear` / :class:`RowParallelLinear` are substituted into the model
by :func:`apply_tensor_parallel`, driven by the model's ``tp_plan()`` (regex over module names ->
"column" | "row"; the transformer families declare theirs as :data:`llmscale.models.layers.TP_PLAN`).
Slices are cut from the full, seeded weights, so every layout starts from identical numbers. Embeddings
and the (tied) output head stay replicated on every tensor-parallel rank.

What does not live here: the process groups (:mod:`.topology`), pipeline stages (:mod:`.pipeline`).
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from llmscale.errors import LayoutError


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the input gradient in backward (each rank saw a slice of the output)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward (sum of partial products); identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _mark(p: nn.Parameter, dim: int) -> None:
    # Attributes DeepSpeed reads: count this shard in the gradient norm on every TP rank, and its split dim.
    p.tensor_model_parallel = True
    p.partition_dim = dim
    p.partition_stride = 1


class ColumnParallelLinear(nn.Module):
    """y[:, shard] = x W[shard]^T + b[shard]: the output features are split over the tensor-parallel group."""

    def __init__(self, full: nn.Linear, *, rank: int, size: int, group: Any):
        super().__init__()
        out = full.out_features
        if out % size:
            raise LayoutError(f"a column-parallel linear has {out} output features, "
                              f"not divisible by tensor_parallel={size}.")
        n = out // size
        self.in_features, self.out_features = full.in_features, n
        self.group, self.tp_size = group, size
        self.weight = nn.Parameter(full.weight.detach()[rank * n:(rank + 1) * n].clone(), full.weight.requires_grad)
        _mark(self.weight, 0)
        if full.bias is not None:
            self.bias = nn.Parameter(full.bias.detach()[rank * n:(rank + 1) * n].clone(), full.bias.requires_grad)
            _mark(self.bias, 0)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            x = _CopyToTP.apply(x, self.group)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum_ranks x[:, shard] W[:, shard]^T + b: the input features are split; the bias is replicated."""

    def __init__(self, full: nn.Linear, *, rank: int, size: int, group: Any):
        super().__init__()
        inp = full.in_features
        if inp % size:
            raise LayoutError(f"a row-parallel linear has {inp} input features, "
                              f"not divisible by tensor_parallel={size}.")
        n = inp // size
        self.in_features, self.out_features = n, full.out_features
        self.group, self.tp_size = group, size
        self.weight = nn.Parameter(full.weight.detach()[:, rank * n:(rank + 1) * n].clone(), full.weight.requires_grad)
        _mark(self.weight, 1)
        if full.bias is not None:
            # replicated: added once, after the reduction
            self.bias = nn.Parameter(full.bias.detach().clone(), full.bias.requires_grad)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.tp_size > 1:
            y = _ReduceFromTP.apply(y, self.group)
        return y + self.bias if self.bias is not None else y


def apply_tensor_parallel(model: nn.Module, *, rank: int, size: int, group: Any) -> dict[str, str]:
    """Replace the nn.Linear modules named by ``model.tp_plan()`` (regex -> "column"|"row") in place.

    Returns ``{single-device parameter name: "column" | "row" | "replicated"}`` for every parameter;
    names are unchanged (the new modules keep ``weight``/``bias``), only the shapes shrink."""
    plan = model.tp_plan() if hasattr(model, "tp_plan") else {}
    if size > 1 and not plan:
        raise LayoutError(f"{type(model).__name__} has no tp_plan(); use parallel.tensor_parallel=1.")
    compiled = [(re.compile(k), v) for k, v in plan.items()]
    kinds: dict[str, str] = {}
    # the split each parameter WOULD have is recorded on every degree, tp=1 included: a checkpoint's
    # universal conversion cuts row-parallel weights along dim 1 only if it knows them (a tp=1 checkpoint
    # grown to tp=2 was sliced along dim 0 when everything was recorded as replicated)
    targets = []
    for name, mod in model.named_modules():
        hits = {v for rx, v in compiled if rx.fullmatch(name)}
        if not hits:
            continue
        if len(hits) > 1 or not isinstance(mod, nn.Linear):
            raise LayoutError(f"tp_plan() of {type(model).__name__} matches {name!r} ambiguously "
                              f"or not an nn.Linear.")
        kind = hits.pop()
        if kind not in ("column", "row"):
            raise LayoutError(f"tp_plan() of {type(model).__name__}: {name!r} -> {kind!r}; "
                              f"expected 'column' or 'row'.")
        targets.append((name, kind))
    if plan and not targets:
        raise LayoutError(f"tp_plan() of {type(model).__name__} matched no nn.Linear module.")
    for name, kind in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        full = getattr(parent, attr)
        if size > 1:
            cls = ColumnParallelLinear if kind == "column" else RowParallelLinear
            setattr(parent, attr, cls(full, rank=rank, size=size, group=group))
        kinds[f"{name}.weight"] = kind
        if full.bias is not None:
            kinds[f"{name}.bias"] = "column" if kind == "column" else "replicated"
    for name, _ in model.named_parameters():
        kinds.setdefault(name, "replicated")
    return kinds
