"""How a run is laid out over processes, and how a single-device model is split to fit that layout.

Three pieces, all used by :mod:`llmscale.engine` (the only module that talks to DeepSpeed):

* **Layout and batch arithmetic** — :func:`solve_batch` and :func:`check_layout` refuse every layout
  DeepSpeed cannot run *before* any model is built or process group used, with the reason and a
  layout that would work (:class:`LayoutError`).
* **Tensor parallelism** — Megatron-style :class:`ColumnParallelLinear` / :class:`RowParallelLinear`
  substituted into the single-device model from outside, driven by the model's ``tp_plan()``.
  Slices are cut from the full, seeded weights, so every layout starts from identical numbers.
  Embeddings and the (tied) output head stay replicated on every tensor-parallel rank.
* **Pipeline parallelism** — DeepSpeed ``PipelineModule`` stages built from the model's
  ``pipeline_layers()`` (``LayerDef`` list); tied embedding/head become ``TiedLayerSpec`` so
  DeepSpeed all-reduces their gradients between first and last stage.

Rank order is DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model; model fastest):
``rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank``.
"""
from __future__ import annotations

from llmscale.errors import LayoutError

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from llmscale.config import ConfigError, ParallelConfig
from llmscale.log import get_logger

log = get_logger(__name__)




# --------------------------------------------------------------------------- batch arithmetic


@dataclass(frozen=True)
class BatchPlan:
    """The solved batch triad: global_batch_size = micro_batch_size * grad_accum_steps * dp_size."""

    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    dp_size: int
    tp_size: int = 1
    pp_size: int = 1

    @property
    def world_size(self) -> int:
        return self.dp_size * self.tp_size * self.pp_size


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _dp_of(parallel: ParallelConfig, world_size: int) -> int:
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    if world_size < 1:
        raise LayoutError(f"world size must be >= 1, got {world_size}.")
    if world_size % (tp * pp):
        good = [(t, p) for t in _divisors(world_size) for p in _divisors(world_size // t)]
        good = [f"tensor_parallel={t} pipeline_parallel={p}" for t, p in good if t <= tp and p <= pp] or ["tensor_parallel=1 pipeline_parallel=1"]
        raise LayoutError(
            f"world size {world_size} is not divisible by tensor_parallel*pipeline_parallel = {tp}*{pp} = {tp * pp}: "
            f"data parallelism needs whole model replicas. Use e.g. parallel.{good[-1].replace(' ', ' parallel.')}, "
            f"or launch a multiple of {tp * pp} processes."
        )
    return world_size // (tp * pp)


def solve_batch(parallel: ParallelConfig, *, world_size: int, seq_len: int) -> BatchPlan:
    """Solve global batch = micro-batch x accumulation x data-parallel size from any two of them.

    ``global_batch_tokens`` stands for ``global_batch_size = global_batch_tokens / seq_len``. With only one
    of the three given, ``grad_accum_steps`` defaults to 1; with none, ``micro_batch_size`` defaults to 8.
    Raises :class:`LayoutError` (naming sizes that would work) when the numbers do not divide."""
    dp = _dp_of(parallel, world_size)
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    mbs, gas, gbs = parallel.micro_batch_size, parallel.grad_accum_steps, parallel.global_batch_size
    if parallel.global_batch_tokens is not None:
        if seq_len < 1:
            raise ConfigError(f"data.seq_len must be >= 1, got {seq_len}.")
        if parallel.global_batch_tokens % seq_len:
            lo = parallel.global_batch_tokens // seq_len * seq_len
            raise LayoutError(
                f"parallel.global_batch_tokens={parallel.global_batch_tokens} is not a multiple of data.seq_len={seq_len}; "
                f"use parallel.global_batch_tokens={max(lo, seq_len)} or {lo + seq_len}."
            )
        gbs = parallel.global_batch_tokens // seq_len
    given = sum(v is not None for v in (mbs, gas, gbs))
    if given == 0:
        mbs, gas = 8, 1
    elif given == 1 and gbs is None:
        gas = gas or 1
        mbs = mbs or 1
    elif given == 1:
        gas = 1
    if mbs is not None and gas is not None:
        solved = mbs * gas * dp
        if gbs is not None and gbs != solved:
            raise LayoutError(
                f"parallel.global_batch_size={gbs} but micro_batch_size*grad_accum_steps*data_parallel = "
                f"{mbs}*{gas}*{dp} = {solved} (world {world_size} / (tp {tp} * pp {pp}) = dp {dp}). "
                f"Give only two of the three, e.g. drop parallel.grad_accum_steps, or set parallel.global_batch_size={solved}."
            )
        gbs = solved
    elif mbs is not None:  # gbs given: solve accumulation
        if gbs % (mbs * dp):
            ok = [m for m in _divisors(gbs // dp) if m <= mbs] if gbs % dp == 0 else []
            alt = (f"parallel.micro_batch_size={ok[-1]}" if ok else
                   f"parallel.global_batch_size={max(gbs // (mbs * dp), 1) * mbs * dp}")
            raise LayoutError(
                f"parallel.global_batch_size={gbs} is not divisible by micro_batch_size*data_parallel = {mbs}*{dp} = "
                f"{mbs * dp}, so no whole number of accumulation steps fits. Use {alt}."
            )
        gas = gbs // (mbs * dp)
    else:  # gbs and gas given: solve the micro-batch
        if gbs % (gas * dp):
            ok = [g for g in _divisors(gbs // dp) if g <= gas] if gbs % dp == 0 else []
            alt = (f"parallel.grad_accum_steps={ok[-1]}" if ok else
                   f"parallel.global_batch_size={max(gbs // (gas * dp), 1) * gas * dp}")
            raise LayoutError(
                f"parallel.global_batch_size={gbs} is not divisible by grad_accum_steps*data_parallel = {gas}*{dp} = "
                f"{gas * dp}, so no whole micro-batch size fits. Use {alt}."
            )
        mbs = gbs // (gas * dp)
    assert mbs is not None and gas is not None and gbs is not None
    return BatchPlan(micro_batch_size=mbs, grad_accum_steps=gas, global_batch_size=gbs, dp_size=dp, tp_size=tp, pp_size=pp)


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Parallel degrees, and (from :meth:`for_rank`) one rank's coordinates in them."""

    dp: int
    tp: int
    pp: int
    zero_stage: int = 0
    rank: int = 0
    dp_rank: int = 0
    tp_rank: int = 0
    pp_rank: int = 0

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def for_rank(self, rank: int) -> "Layout":
        pp_rank, rest = divmod(rank, self.dp * self.tp)
        dp_rank, tp_rank = divmod(rest, self.tp)
        return dataclasses.replace(self, rank=rank, dp_rank=dp_rank, tp_rank=tp_rank, pp_rank=pp_rank)

    def rank_of(self, *, dp_rank: int, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.dp * self.tp + dp_rank * self.tp + tp_rank

    def describe(self) -> str:
        return f"dp={self.dp} tp={self.tp} pp={self.pp} zero={self.zero_stage}"


def check_layout(cfg: Any, world_size: int) -> Layout:
    """Refuse, before anything is built, every layout DeepSpeed cannot run. ``cfg`` is a RunConfig."""
    par, model = cfg.parallel, cfg.model
    tp, pp = par.tensor_parallel, par.pipeline_parallel
    dp = _dp_of(par, world_size)
    if pp > 1 and par.zero_stage >= 2:
        raise LayoutError(
            f"parallel.zero_stage={par.zero_stage} cannot be combined with pipeline_parallel={pp}: DeepSpeed's pipeline "
            f"engine supports ZeRO stage 0 or 1 only (stage 2/3 partition gradients inside the 1F1B schedule). "
            f"Use parallel.zero_stage=1, or parallel.pipeline_parallel=1 to keep ZeRO-{par.zero_stage}."
        )
    if model.family == "lstm" and (tp > 1 or pp > 1):
        raise LayoutError(
            "model.family=lstm has no tensor- or pipeline-parallel split; use parallel.tensor_parallel=1 "
            "parallel.pipeline_parallel=1 (data parallel with any ZeRO stage works)."
        )
    if tp > 1:
        kv = model.n_kv_heads or model.n_heads
        bad = [f"model.n_heads={model.n_heads}"] if model.n_heads % tp else []
        if kv % tp:
            bad.append(f"model.n_kv_heads={kv}")
        d_ff = model.d_ff
        if d_ff is not None and d_ff % tp:
            bad.append(f"model.d_ff={d_ff}")
        if bad:
            fits = [t for t in _divisors(world_size) if model.n_heads % t == 0 and kv % t == 0
                    and (d_ff is None or d_ff % t == 0) and (world_size // t) % pp == 0]
            raise LayoutError(
                f"parallel.tensor_parallel={tp} does not divide {' and '.join(bad)}: each tensor-parallel rank needs "
                f"whole attention heads (and an equal share of the MLP). Use parallel.tensor_parallel={max(fits)}"
                f"{'' if max(fits) > 1 else ' (no tensor parallelism)'} or change the model's head count."
            )
        if par.zero_stage == 3:
            raise LayoutError(
                "parallel.zero_stage=3 with tensor_parallel>1 is not supported by llmscale's tensor-parallel layers "
                "(ZeRO-3 would partition the already-split shards without the tensor-parallel metadata). "
                "Use parallel.zero_stage=2 or 1 with tensor parallelism, or parallel.tensor_parallel=1 for ZeRO-3."
            )
    if pp > 1:
        if pp > model.n_layers:
            raise LayoutError(
                f"parallel.pipeline_parallel={pp} exceeds model.n_layers={model.n_layers}: every stage needs at least one "
                f"transformer block. Use parallel.pipeline_parallel<={model.n_layers}."
            )
    plan = solve_batch(par, world_size=world_size, seq_len=cfg.data.seq_len)
    if pp > 1 and plan.grad_accum_steps < 1:
        raise LayoutError("pipeline parallelism needs at least one micro-batch per step (parallel.grad_accum_steps>=1).")
    if pp > 1 and plan.grad_accum_steps < pp:
        log.warning(
            "pipeline_parallel=%d with only %d micro-batches per step: the 1F1B schedule idles most stages; "
            "raise parallel.grad_accum_steps to >= %d for throughput.", pp, plan.grad_accum_steps, 2 * pp)
    return Layout(dp=dp, tp=tp, pp=pp, zero_stage=par.zero_stage)


# --------------------------------------------------------------------------- process groups


class Topology:
    """DeepSpeed's ``PipelineParallelGrid`` over ``PipeModelDataParallelTopology`` for this layout.

    The grid is DeepSpeed's "mpu": its data-parallel group carries gradient reduction and ZeRO
    sharding, its slice (model) group carries the tensor-parallel collectives of our layers. Using the
    same object for TP-only and TP x PP is what makes the two compose (DeepSpeed's AutoTP builds its own
    groups, which do not line up with a PipelineModule's grid)."""

    def __init__(self, layout: Layout):
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology, PipelineParallelGrid

        self.layout = layout
        self.topo = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
        self.grid = PipelineParallelGrid(topology=self.topo)
        me = self.topo.get_coord(dist.get_rank())
        mine = layout.for_rank(dist.get_rank())
        assert (me.pipe, me.data, getattr(me, "model", 0)) == (mine.pp_rank, mine.dp_rank, mine.tp_rank), (me, mine)

    @property
    def tp_group(self):
        return self.grid.get_slice_parallel_group()

    @property
    def dp_group(self):
        return self.grid.get_data_parallel_group()

    @property
    def pp_group(self):
        return self.grid.get_pipe_parallel_group()

    @property
    def model_group(self):
        """All ranks holding one model replica (pipe x tensor) — for the gradient norm."""
        return self.grid.get_model_parallel_group()


# --------------------------------------------------------------------------- tensor parallel layers


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
            raise LayoutError(f"a column-parallel linear has {out} output features, not divisible by tensor_parallel={size}.")
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
            raise LayoutError(f"a row-parallel linear has {inp} input features, not divisible by tensor_parallel={size}.")
        n = inp // size
        self.in_features, self.out_features = n, full.out_features
        self.group, self.tp_size = group, size
        self.weight = nn.Parameter(full.weight.detach()[:, rank * n:(rank + 1) * n].clone(), full.weight.requires_grad)
        _mark(self.weight, 1)
        if full.bias is not None:
            self.bias = nn.Parameter(full.bias.detach().clone(), full.bias.requires_grad)  # replicated: added once, after the reduction
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
    if size > 1:
        targets = []
        for name, mod in model.named_modules():
            hits = {v for rx, v in compiled if rx.fullmatch(name)}
            if not hits:
                continue
            if len(hits) > 1 or not isinstance(mod, nn.Linear):
                raise LayoutError(f"tp_plan() of {type(model).__name__} matches {name!r} ambiguously or not an nn.Linear.")
            targets.append((name, hits.pop()))
        if not targets:
            raise LayoutError(f"tp_plan() of {type(model).__name__} matched no nn.Linear module.")
        for name, kind in targets:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            full = getattr(parent, attr)
            cls = ColumnParallelLinear if kind == "column" else RowParallelLinear
            if kind not in ("column", "row"):
                raise LayoutError(f"tp_plan() of {type(model).__name__}: {name!r} -> {kind!r}; expected 'column' or 'row'.")
            setattr(parent, attr, cls(full, rank=rank, size=size, group=group))
            kinds[f"{name}.weight"] = kind
            if full.bias is not None:
                kinds[f"{name}.bias"] = "column" if kind == "column" else "replicated"
    for name, _ in model.named_parameters():
        kinds.setdefault(name, "replicated")
    return kinds


# --------------------------------------------------------------------------- pipeline


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
                f"pipeline_layers(): LayerDefs with tie_key={d.tie_key!r} must share one module (got two different ones).")
        layers.append(_tied_spec(d.tie_key, wrappers[d.tie_key], _on_inner(d.forward_fn or _call), tied_attrs[d.tie_key]))
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
