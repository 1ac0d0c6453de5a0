"""AdamW parameter groups and the learning-rate schedule.

Weight decay is decoupled (AdamW) and never applied to norms and biases (decaying a LayerNorm gain pulls it
towards 0 rather than 1), nor by default to embeddings (rows that are rarely seen would shrink between their
updates; ``optim.decay_embeddings: true`` decays them as nanoGPT does). The decision is made by module type
on the single-device model, so it is the same in every parallel layout (see :func:`no_decay_names`).

Also here: step control — :class:`SkippableAdamW`, torch's AdamW that can skip an update on every rank
at once (non-finite loss or gradients) and, for ZeRO-0 in fp32, computes the global gradient norm and
clips; the engine (:mod:`llmscale.engine`) builds it and shares a :class:`StepControl` with it.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _is_norm(m: nn.Module) -> bool:
    # Model code may define its own RMSNorm; recognise it by name as well as by type.
    return isinstance(m, _NORMS) or "norm" in type(m).__name__.lower()


def no_decay_names(model: nn.Module, *, decay_embeddings: bool = False) -> set[str]:
    """Names (as in ``model.named_parameters(remove_duplicate=False)``) that get no weight decay: every
    parameter of an embedding or normalisation module, every bias, and any parameter with fewer than 2
    dimensions. A weight tied to an embedding (the output head) is an embedding. ``decay_embeddings``
    (``optim.decay_embeddings``) decays embeddings too, as nanoGPT and GPT-2's code decay every matrix."""
    out: set[str] = set()
    embedding_ids: set[int] = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            embed = isinstance(mod, nn.Embedding) and not decay_embeddings
            if embed or _is_norm(mod) or p_name == "bias" or p.ndim < 2:
                out.add(full)
            if embed:
                embedding_ids.add(id(p))
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in embedding_ids:
            out.add(name)
    return out


def param_groups(named: Iterable[tuple[str, nn.Parameter]], optim_cfg: Any, *, no_decay: set[str]) -> list[dict]:
    """Two AdamW groups, ``decay`` (``optim.weight_decay``) and ``no_decay`` (0), of the trainable parameters
    in ``named``; empty groups are dropped. Each group carries a ``name`` for logging."""
    decay, plain, seen = [], [], set()
    for name, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (plain if name in no_decay else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": optim_cfg.weight_decay, "name": "decay"},
        {"params": plain, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def lr_at(step: int, optim_cfg: Any, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up from 0 to ``lr`` over
    ``warmup_steps``, then cosine / linear decay to ``min_lr`` at ``decay_steps`` (default ``total_steps``),
    or constant. Held at ``min_lr`` afterwards."""
    lr, min_lr, warm = optim_cfg.lr, optim_cfg.min_lr, optim_cfg.warmup_steps
    if warm > 0 and step < warm:
        return lr * (step + 1) / warm
    if optim_cfg.schedule == "constant":
        return lr
    end = optim_cfg.decay_steps if optim_cfg.decay_steps is not None else total_steps
    span = max(end - warm, 1)
    frac = min(max((step - warm) / span, 0.0), 1.0)
    if optim_cfg.schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return lr + (min_lr - lr) * frac


# --------------------------------------------------------------------------- step control


class StepControl:
    """Per-step state shared between the engine and its optimizer (ZeRO-0 fp32 only does work here)."""

    def __init__(self) -> None:
        self.force_skip = False  # set by the engine when the loss is non-finite on some rank
        self.manage = False  # ZeRO-0 fp32: this optimizer computes norm, clips and detects non-finite grads
        self.grad_norm: Optional[float] = None
        self.skipped = False
        self.clip = 0.0
        self.params: list[nn.Parameter] = []
        self.tp_rank = 0
        self.model_group = None
        self.flag_group = None

    def reset(self) -> None:
        self.force_skip = False
        self.grad_norm = None
        self.skipped = False


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW that can skip its update on every rank at once.

    For ZeRO-0 fp32 it also computes the global gradient norm (each parameter counted once over the
    tensor- and pipeline-parallel ranks of a replica) and clips to ``optim.grad_clip``, then skips when
    the norm is non-finite on any rank. Under ZeRO-1/2/3 and bf16/fp16 DeepSpeed's wrapper does norm,
    clip and overflow skip itself and only calls this step for finite gradients. Setting ``overflow``
    makes DeepSpeed count a skipped step (``skipped_steps``) and keep its counters consistent."""

    def __init__(self, params, *, ctl: StepControl, **kw):
        super().__init__(params, **kw)
        self.llmscale_ctl = ctl
        self.overflow = False

    def step(self, closure=None):
        ctl = self.llmscale_ctl
        skip = ctl.force_skip
        if ctl.manage:
            sq = torch.zeros((), dtype=torch.float32, device=ctl.params[0].device if ctl.params else "cpu")
            for p in ctl.params:
                if p.grad is None or getattr(p, "ds_pipe_replicated", False):
                    continue
                if ctl.tp_rank > 0 and not getattr(p, "tensor_model_parallel", False):
                    continue  # replicated over TP: counted on TP rank 0 only
                sq += p.grad.detach().float().pow(2).sum()
            if ctl.model_group is not None:
                dist.all_reduce(sq, group=ctl.model_group)
            norm = sq.sqrt()
            bad = (~torch.isfinite(norm)).float() + float(skip)
            if dist.get_world_size(ctl.flag_group) > 1:
                dist.all_reduce(bad, group=ctl.flag_group)
            ctl.grad_norm = float(norm)
            skip = bool(bad.item() > 0)
            if not skip and ctl.clip > 0:
                coef = ctl.clip / (float(norm) + 1e-6)
                if coef < 1.0:
                    for p in ctl.params:
                        if p.grad is not None:
                            p.grad.detach().mul_(coef)
        self.overflow = skip
        if skip:
            ctl.skipped = True
            return None
        return super().step(closure)
