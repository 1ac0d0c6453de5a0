"""How a run is laid out over processes, decided once before anything is built: torch-free arithmetic.

:func:`plan_run` checks the layout and solves the batch triad in one call and returns a :class:`RunPlan`
(:class:`Layout` + :class:`BatchPlan`) that the job hands on to the engine and the loader; nothing
recomputes it. Every layout DeepSpeed cannot run is refused here, before any model is built or process
group used, with the reason and a layout that would work (:class:`llmscale.errors.LayoutError`).

Rank order is DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model; model fastest):
``rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank``.

What does not live here: process groups (:mod:`.topology`), splitting a model (:mod:`.tensor`,
:mod:`.pipeline`), the DeepSpeed config (:mod:`llmscale.engine`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from llmscale.config import ParallelConfig
from llmscale.errors import ConfigError, LayoutError
from llmscale.log import get_logger

log = get_logger(__name__)


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
        good = ([f"tensor_parallel={t} pipeline_parallel={p}" for t, p in good if t <= tp and p <= pp]
                or ["tensor_parallel=1 pipeline_parallel=1"])
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
                f"parallel.global_batch_tokens={parallel.global_batch_tokens} is not a multiple of "
                f"data.seq_len={seq_len}; "
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
                f"Give only two of the three, e.g. drop parallel.grad_accum_steps, or set "
                f"parallel.global_batch_size={solved}."
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
    return BatchPlan(micro_batch_size=mbs, grad_accum_steps=gas, global_batch_size=gbs, dp_size=dp, tp_size=tp,
                     pp_size=pp)


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

    def for_rank(self, rank: int) -> Layout:
        pp_rank, rest = divmod(rank, self.dp * self.tp)
        dp_rank, tp_rank = divmod(rest, self.tp)
        return dataclasses.replace(self, rank=rank, dp_rank=dp_rank, tp_rank=tp_rank, pp_rank=pp_rank)

    def rank_of(self, *, dp_rank: int, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.dp * self.tp + dp_rank * self.tp + tp_rank

    def describe(self) -> str:
        return f"dp={self.dp} tp={self.tp} pp={self.pp} zero={self.zero_stage}"


def check_layout(cfg: Any, world_size: int, *, batch: Optional[BatchPlan] = None) -> Layout:
    """Refuse, before anything is built, every layout DeepSpeed cannot run. ``cfg`` is a RunConfig."""
    par, model = cfg.parallel, cfg.model
    tp, pp = par.tensor_parallel, par.pipeline_parallel
    dp = _dp_of(par, world_size)
    if pp > 1 and par.zero_stage >= 2:
        raise LayoutError(
            f"parallel.zero_stage={par.zero_stage} cannot be combined with pipeline_parallel={pp}: "
            f"DeepSpeed's pipeline "
            f"engine supports ZeRO stage 0 or 1 only (stage 2/3 partition gradients inside the 1F1B schedule). "
            f"Use parallel.zero_stage=1, or parallel.pipeline_parallel=1 to keep ZeRO-{par.zero_stage}."
        )
    if model.family in ("lstm", "bilstm") and (tp > 1 or pp > 1):
        raise LayoutError(
            f"model.family={model.family} has no tensor- or pipeline-parallel split; use parallel.tensor_parallel=1 "
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
                f"parallel.pipeline_parallel={pp} exceeds model.n_layers={model.n_layers}: "
                f"every stage needs at least one transformer block. Use parallel.pipeline_parallel<={model.n_layers}."
            )
    plan = batch if batch is not None else solve_batch(par, world_size=world_size, seq_len=cfg.data.seq_len)
    if pp > 1 and plan.grad_accum_steps < 1:
        raise LayoutError("pipeline parallelism needs at least one micro-batch per step "
                          "(parallel.grad_accum_steps>=1).")
    if pp > 1 and plan.grad_accum_steps < pp:
        log.warning(
            "pipeline_parallel=%d with only %d micro-batches per step: the 1F1B schedule idles most stages; "
            "raise parallel.grad_accum_steps to >= %d for throughput.", pp, plan.grad_accum_steps, 2 * pp)
    return Layout(dp=dp, tp=tp, pp=pp, zero_stage=par.zero_stage)


@dataclass(frozen=True)
class RunPlan:
    """The layout and the batch plan of one run, computed once by :func:`plan_run`."""

    layout: Layout
    batch: BatchPlan


def plan_run(cfg: Any, world_size: int) -> RunPlan:
    """Check ``cfg``'s layout on ``world_size`` processes and solve its batch: the one place both happen."""
    batch = solve_batch(cfg.parallel, world_size=world_size, seq_len=cfg.data.seq_len)
    return RunPlan(layout=check_layout(cfg, world_size, batch=batch), batch=batch)
