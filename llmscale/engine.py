"""The one place that talks to DeepSpeed: config generation, model wrapping, the optimizer step.

    plan = plan_run(cfg, world.world_size)            # layout + batch triad, once per run
    engine = build_engine(cfg, build_model(cfg.model), world=world, plan=plan)
    result = engine.train_step(loader.next_step())      # StepResult(loss, grad_norm, lr, skipped, timings)

Layouts (all on DeepSpeed, CPU included with ``DS_ACCELERATOR=cpu`` + gloo):

* data parallel with ZeRO 0/1/2/3 (optimizer offload optional) — ``deepspeed.initialize`` on the model;
* tensor parallel — llmscale's Column/RowParallelLinear (see :mod:`llmscale.parallel.tensor`) on the tensor
  group of DeepSpeed's ``PipeModelDataParallelTopology``, which is handed to DeepSpeed as its ``mpu`` so
  gradient reduction and ZeRO sharding use the matching data-parallel group. DeepSpeed's own AutoTP
  (``tensor_parallel.autotp_size``) is deliberately *not* used: it builds process groups of its own that
  do not line up with a PipelineModule's grid (TP2xPP2 failed with a collective size mismatch), while
  these layers compose with pipelines unchanged;
* pipeline parallel — DeepSpeed ``PipelineModule`` (1F1B ``train_batch``) built from the model's
  ``pipeline_layers()``, tied embedding/head gradients synchronised by ``TiedLayerSpec``;
* and every product of the three (DPxTP, DPxPP, TPxPP, DPxTPxPP; ZeRO 0/1 with a pipeline, 0/1/2 with TP).

Proven equal to a single rank (losses, gradient norms, weights, eval loss; tests/test_engine_equivalence.py):
DP2 with ZeRO 0/1/2/3 and ZeRO-2 offload, TP2, PP2, TP2xPP2, DP2xTP2xPP2, BERT on DP2 ZeRO-1 and PP2.
Embeddings and the output head are replicated over tensor-parallel ranks (no vocabulary-parallel split).

Non-finite steps: if the loss or the gradient norm is non-finite on any rank, every rank skips the update
(``train.nan_policy=skip``; DeepSpeed's counters stay consistent because the skip happens inside its own
step: its ZeRO optimizers' overflow path, or :class:`llmscale.optim.SkippableAdamW` for ZeRO-0 fp32) or raises
:class:`NonFiniteError` (``raise``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from llmscale import dist as ldist
from llmscale.checkpoint.safe_load import restrict_checkpoint_engine, restricted_torch_in
from llmscale.errors import LayoutError, NonFiniteError
from llmscale.log import get_logger
from llmscale.optim import SkippableAdamW, StepControl, no_decay_names, param_groups
from llmscale.parallel.pipeline import pipeline_param_names, pipeline_pieces
from llmscale.parallel.plan import BatchPlan, Layout, RunPlan
from llmscale.parallel.tensor import apply_tensor_parallel
from llmscale.parallel.topology import Topology

log = get_logger(__name__)

__all__ = ["Engine", "StepResult", "NonFiniteError", "build_engine", "build_deepspeed_config", "resolve_precision"]

_MODEL_KWARGS = ("labels", "attention_mask", "token_type_ids", "next_sentence_label", "position_ids", "doc_ids")




@dataclass
class StepResult:
    """One optimizer step. ``loss`` is the mean over the whole global batch (all data-parallel ranks) and
    is the same on every rank. ``timings`` in seconds: see :meth:`Engine.train_step`."""

    loss: float
    grad_norm: Optional[float]
    lr: float
    skipped: bool
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- DeepSpeed config


def _on_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def resolve_precision(precision: str) -> str:
    """``auto`` -> bf16 on GPUs that support it, fp32 elsewhere (CPU, older GPUs)."""
    if precision != "auto":
        return precision
    if _on_cuda() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


# Warnings every launch printed that say nothing to an llmscale user (issue: "silence what is known noise"). Each is
# matched on its exact text, so a new or different warning from the same place still shows.
_KNOWN_NOISE = (
    # llmscale hands DeepSpeed its own torch AdamW on purpose (zero_allow_untested_optimizer); the engine
    # equivalence tests check it under every ZeRO stage.
    ("DeepSpeed", "You are using ZeRO with an untested optimizer"),
    # torch.utils.cpp_extension at import on a machine with a CUDA toolkit but no GPU: DeepSpeed imports it even
    # on its CPU accelerator, where no CUDA op is built.
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
)


class _DropKnownNoise:
    """A logging filter that drops the records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self.prefixes = prefixes

    def filter(self, record) -> bool:
        msg = str(record.msg).lstrip("* ")
        return not any(msg.startswith(p) for p in self.prefixes)


def quiet_known_noise() -> None:
    """Install the filters (once: calling again adds nothing), before DeepSpeed is imported (its first warning
    comes at import)."""
    import logging
    import warnings

    by_logger: dict[str, list[str]] = {}
    for name, prefix in _KNOWN_NOISE:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise(tuple(prefixes)))
    # DeepSpeed's ZeRO calls torch.distributed.all_gather_into_tensor, which torch 2.10+ marks deprecated: a
    # FutureWarning on every rank at the first gather, about DeepSpeed's code, not the user's.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


def use_one_ninja() -> None:
    """Make every launch of this environment build DeepSpeed's ops with the same ``ninja``.

    DeepSpeed JIT-builds its CPU shared-memory op (``deepspeed_shm_comm``, at ``deepspeed.init_distributed``) into
    one cache folder with whichever ``ninja`` is first on PATH. The venv's ninja (PyPI, 1.13) and a system one
    (Debian, 1.11) log different command hashes there, so a launch that finds the other one than the last launch
    did rebuilds the op from scratch: measured here, every launch alternated between the two (the venv's bin on
    PATH or not) and recompiled, 25-60 s on 2 idle cores. Putting the interpreter's own bin folder first when it
    holds a ninja (as activating the venv would) makes the second and later launches reuse the build."""
    import shutil
    import sys

    here = os.path.dirname(sys.executable)
    own = os.path.join(here, "ninja")
    if not (os.path.isfile(own) and os.access(own, os.X_OK)):
        return
    found = shutil.which("ninja")
    if found is None or os.path.realpath(found) != os.path.realpath(own):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")


def build_deepspeed_config(cfg: Any, plan: BatchPlan) -> dict:
    """The DeepSpeed JSON for ``cfg`` (a RunConfig), generated — never hand-written.

    Every ``cfg.deepspeed`` key that is set maps to exactly one DeepSpeed key. ``gradient_clipping`` is
    ``optim.grad_clip`` except for ZeRO-0 in fp32, where llmscale's optimizer clips (DeepSpeed's fp32
    path counts replicated parameters only on model-parallel rank 0, which is wrong for pipeline stages
    > 0); the value then appears as ``0.0`` here and the clipping still happens. The optimizer is not in
    this dict: llmscale passes a ``torch.optim.AdamW`` with its own parameter groups."""
    par, ds_extra = cfg.parallel, cfg.deepspeed
    precision = resolve_precision(cfg.train.precision)
    zero: dict[str, Any] = {"stage": par.zero_stage}
    if par.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": _on_cuda()}
    for key in ("overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size",
                "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        value = getattr(ds_extra, key)
        if value is not None:
            if key.startswith("stage3_") and par.zero_stage != 3:
                raise LayoutError(f"deepspeed.{key} is set but parallel.zero_stage={par.zero_stage}; it only "
                                  f"applies to ZeRO-3. Remove deepspeed.{key} or set parallel.zero_stage=3.")
            zero[key] = value
    if ds_extra.wall_clock_breakdown and par.pipeline_parallel > 1:
        raise LayoutError(
            "deepspeed.wall_clock_breakdown=true fails with pipeline_parallel>1 on DeepSpeed 0.19.8 (its pipeline "
            "engine starts the backward timer twice). Set deepspeed.wall_clock_breakdown=false; the step time is "
            "still reported.")
    llmscale_clips = par.zero_stage == 0 and precision == "fp32"
    out: dict[str, Any] = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum_steps,
        "gradient_clipping": 0.0 if llmscale_clips else float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # The optimizer is llmscale's torch AdamW (param groups without decay on norms/biases/embeddings).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": ds_extra.steps_per_print,
        "wall_clock_breakdown": ds_extra.wall_clock_breakdown,
    }
    if ds_extra.communication_data_type is not None:
        out["communication_data_type"] = ds_extra.communication_data_type
    if par.pipeline_parallel > 1:
        # Activations cross stages whole on every TP rank: DeepSpeed 0.19.8's partitioned send/receive
        # ("pipe_partitioned") keeps the first batch's buffer shape, so an evaluation batch of another size
        # fails its all-gather. Costs tp x the stage-to-stage bytes, nothing else.
        out["pipeline"] = {"partition_method": par.pipeline_partition, "pipe_partitioned": False,
                           "grad_partitioned": False}
    return out


# --------------------------------------------------------------------------- pipeline loss


class _PipeLoss:
    """Loss of the last pipeline stage: mean token cross-entropy over non-ignored targets (+ NSP loss for
    BERT), the same definition as the models' ``forward(..., labels=...)``. In ``sum_mode`` (evaluation)
    it returns the token-summed loss so the caller can weight batches by their target count."""

    def __init__(self) -> None:
        self.sum_mode = False

    def __call__(self, outputs, labels):
        nsp_logits = nsp_labels = None
        if isinstance(outputs, (tuple, list)):
            logits = outputs[0]
            nsp_logits = outputs[1] if len(outputs) > 1 else None
        else:
            logits = outputs
        if isinstance(labels, (tuple, list)):
            lm_labels = labels[0]
            nsp_labels = labels[1] if len(labels) > 1 else None
        else:
            lm_labels = labels
        ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), lm_labels.reshape(-1),
                             ignore_index=-100, reduction="sum")
        n = (lm_labels != -100).sum()
        nsp = (F.cross_entropy(nsp_logits.float(), nsp_labels)
               if nsp_logits is not None and nsp_labels is not None else 0.0)
        if self.sum_mode:
            return ce + nsp * n
        return ce / n.clamp(min=1) + nsp


def _pipe_batch(mb: dict, device) -> tuple:
    """A loader micro-batch -> DeepSpeed pipeline batch ``(inputs_tuple, labels)``: the first stage reads
    the inputs, the last the labels."""
    if "position_ids" in mb or "doc_ids" in mb:
        raise LayoutError("packed sequences (position_ids / doc_ids) are not supported with pipeline_parallel>1: "
                          "use sft.packing=false or parallel.pipeline_parallel=1.")
    ids = mb["input_ids"].to(device)
    if "token_type_ids" in mb or "attention_mask" in mb:
        inputs = (ids, mb.get("token_type_ids", torch.zeros_like(mb["input_ids"])).to(device),
                  mb.get("attention_mask", torch.ones_like(mb["input_ids"])).to(device))
    else:
        inputs = (ids,)
    labels = mb["labels"].to(device)
    if "next_sentence_label" in mb:
        return inputs, (labels, mb["next_sentence_label"].to(device))
    return inputs, labels


# --------------------------------------------------------------------------- engine


class _Output(dict):
    """A model output as a dict with attribute access. DeepSpeed hooks its backward prologue (ZeRO's
    accumulation-boundary bookkeeping, its timers) only onto tensors it finds in tuples, lists and dicts;
    inside the models' ``ModelOutput`` dataclass it finds none, and then skips that prologue."""

    def __getattr__(self, key: str):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _present_output_as_dict(model: nn.Module) -> None:
    inner = model.forward

    def forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        if dataclasses.is_dataclass(out) and not isinstance(out, type):
            return _Output({f.name: getattr(out, f.name) for f in dataclasses.fields(out)})
        return out

    model.forward = forward



@contextlib.contextmanager
def _deepspeed_loads_universal(ds: Any, universal: bool):
    """THE ONE PLACE THAT SETS A DEEPSPEED PRIVATE: DeepSpeed 0.19.8 decides whether ``load_checkpoint`` reads
    a universal folder from ``engine._config.load_universal_checkpoint`` only (no argument), so it is set for
    the duration of one load and restored after."""
    before = ds._config.load_universal_checkpoint
    ds._config.load_universal_checkpoint = universal
    try:
        yield
    finally:
        ds._config.load_universal_checkpoint = before


class Engine:
    """A DeepSpeed engine for one layout. Build with :func:`build_engine`."""

    def __init__(self, *, cfg, ds, layout: Layout, plan: BatchPlan, topo: Optional[Topology], ctl: StepControl,
                 model: nn.Module, kinds: dict[str, str], name_map: dict[str, str], pipe_loss: Optional[_PipeLoss],
                 ds_config: dict, loss_over: str = "micro_batch"):
        self.cfg = cfg
        self.loss_over = loss_over
        self.ds = ds
        self.layout = layout
        self.plan = plan
        self.topo = topo
        self._ctl = ctl
        self._model = model  # the (tensor-split) single-device model; every rank holds it for names/buffers
        self.tp_kinds = kinds  # single-device parameter name -> column | row | replicated
        self._name_map = name_map  # DeepSpeed module parameter name -> single-device name
        self._pipe_loss = pipe_loss
        self.ds_config = ds_config
        self.pipeline = layout.pp > 1
        self.precision = resolve_precision(cfg.train.precision)
        self.group_hparams: list[dict] = []  # per optimizer group, what the config decides (set by build_engine)

    # ---- layout
    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def device(self) -> torch.device:
        return self.ds.device

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (skipped ones included), restored by :meth:`load`."""
        return int(self.ds.global_steps)

    @property
    def param_names(self) -> dict[str, str]:
        """``{DeepSpeed module parameter name: single-device name}`` for every parameter of the whole model
        (all pipeline stages), as checkpoints record it."""
        return dict(self._name_map)

    def _dp_group(self):
        return self.topo.dp_group if self.topo is not None else None

    # ---- training
    def _set_lr(self) -> float:
        from llmscale.optim import lr_at

        lr = float(lr_at(self.global_step, self.cfg.optim, self.cfg.train.steps))
        for g in self.ds.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def train_step(self, micro_batches: list[dict], *, poison: bool = False) -> StepResult:
        """One optimizer step over this rank's ``grad_accum_steps`` micro-batches.

        timings (seconds): ``forward`` / ``backward`` are the summed model passes (backward includes the
        gradient reduction DeepSpeed starts inside ``backward`` at the accumulation boundary), ``optimizer``
        the DeepSpeed step (ZeRO all-gather of updated parameters included), ``comm`` llmscale's own
        collectives (non-finite flag, loss average); with ``deepspeed.wall_clock_breakdown`` DeepSpeed's
        gradient all-reduce timer is moved from ``backward`` to ``comm``. With a pipeline the 1F1B schedule
        interleaves all of these and ``forward`` holds the whole ``train_batch`` time (DeepSpeed 0.19.8's
        pipeline timers crash, so they are not used). ``data`` is left at 0 for the caller to fill in.

        ``poison`` (tests only, :data:`llmscale.trainer.POISON_ENV`): multiply this step's loss by NaN before the
        backward, as a corrupt batch or an overflow would, to drive the real skip / rollback path."""
        if len(micro_batches) != self.plan.grad_accum_steps:
            raise ValueError(f"train_step got {len(micro_batches)} micro-batches, the plan has "
                             f"grad_accum_steps={self.plan.grad_accum_steps}.")
        self._ctl.reset()
        step = self.global_step
        lr = self._set_lr()
        skipped_before = int(self.ds.skipped_steps)
        t = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0, "comm": 0.0}
        if self.pipeline:
            if poison:
                raise ValueError("poison (a test hook) is not supported with a pipeline")
            loss = self._pipe_step(micro_batches, t)
        else:
            loss = self._plain_step(micro_batches, t, poison=poison)
        skipped = self._ctl.skipped or int(self.ds.skipped_steps) > skipped_before
        grad_norm = self._ctl.grad_norm if self._ctl.manage else self.ds.get_global_grad_norm()
        if grad_norm is not None:
            grad_norm = float(grad_norm)
        if skipped or not math.isfinite(loss):
            skipped = True
            msg = (f"step {step}: non-finite loss {loss} or gradient norm {grad_norm}; "
                   f"the update was skipped on every rank")
            if self.cfg.train.nan_policy == "raise":
                raise NonFiniteError(msg + " (train.nan_policy=raise). Lower optim.lr, check the data, or set "
                                     "train.nan_policy=skip.")
            log.warning(msg)
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, skipped=skipped, timings=t)

    def _inputs(self, mb: dict) -> tuple[torch.Tensor, dict]:
        dev = self.device
        kwargs = {k: mb[k].to(dev) for k in _MODEL_KWARGS if k in mb}
        return mb["input_ids"].to(dev), kwargs

    def _step_targets(self, micro_batches: list[dict]) -> torch.Tensor:
        """Targets (labels != -100) in this optimizer step over all micro-batches of all data-parallel ranks."""
        n = torch.zeros((), dtype=torch.float32, device=self.device)
        for mb in micro_batches:
            n += (mb["labels"] != -100).sum().to(self.device, torch.float32)
        if self.layout.dp > 1:
            dist.all_reduce(n, group=self._dp_group())
        return n

    def _plain_step(self, micro_batches: list[dict], t: dict, *, poison: bool = False) -> float:
        """Micro-batch losses averaged (``loss_over="micro_batch"``: each micro-batch's mean counts the same),
        or (``"step_targets"``) each micro-batch's summed loss divided by the targets of the whole step, so
        micro 4 x accumulation 1, micro 1 x accumulation 4 and DP 2 give the same gradients on variable-length
        data. DeepSpeed divides by the accumulation steps and averages over data-parallel ranks; the scale
        ``n_i * dp * gas / N`` undoes both."""
        ds = self.ds
        ds.train()
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        n = len(micro_batches)
        by_targets = self.loss_over == "step_targets"
        if by_targets:
            t3 = time.perf_counter()
            step_targets = self._step_targets(micro_batches).clamp(min=1.0)
            t["comm"] += time.perf_counter() - t3
        for i, mb in enumerate(micro_batches):
            ids, kwargs = self._inputs(mb)
            t0 = time.perf_counter()
            out = ds(ids, **kwargs)
            loss = out.loss if hasattr(out, "loss") else out
            if poison:
                loss = loss * float("nan")
            if by_targets:
                n_i = (mb["labels"] != -100).sum().to(self.device, torch.float32)
                summed = loss * n_i  # the models' mean is 0 (not NaN) for a micro-batch without targets
                loss = summed * (self.layout.dp * n / step_targets)
                total += summed.detach().float()
            else:
                total += loss.detach().float()
            t1 = time.perf_counter()
            ds.backward(loss)
            t2 = time.perf_counter()
            t["forward"] += t1 - t0
            t["backward"] += t2 - t1
            if i == n - 1:
                # One all-reduce over the world: loss average (TP ranks hold copies) and non-finite count.
                t3 = time.perf_counter()
                local = total / step_targets * self.layout.dp if by_targets else total / n
                packed = torch.stack([local, (~torch.isfinite(total)).float()])
                if dist.get_world_size() > 1:
                    dist.all_reduce(packed)
                mean_loss = float(packed[0]) / dist.get_world_size()
                self._ctl.force_skip = bool(packed[1] > 0)
                t["comm"] += time.perf_counter() - t3
            t4 = time.perf_counter()
            ds.step()
            t["optimizer"] += time.perf_counter() - t4
        if self.ds_config.get("wall_clock_breakdown"):
            reduce_s = self._timer("bwd_allreduce")
            t["backward"] -= min(reduce_s, t["backward"])
            t["comm"] += reduce_s
        return mean_loss

    def _timer(self, name: str) -> float:
        timers = getattr(self.ds.timers, "timers", {})
        return timers[name].elapsed(reset=True) / 1000.0 if name in timers else 0.0

    def _pipe_step(self, micro_batches: list[dict], t: dict) -> float:
        it = iter([_pipe_batch(mb, self.device) for mb in micro_batches])
        t0 = time.perf_counter()
        loss = self.ds.train_batch(data_iter=it)
        t["forward"] = time.perf_counter() - t0  # the whole 1F1B schedule (see train_step)
        return float(loss)

    # ---- evaluation
    @torch.no_grad()
    def eval_loss(self, batch: dict) -> tuple[float, int]:
        """``(loss_sum, num_targets)`` of one evaluation micro-batch per data-parallel rank, **summed over the
        data-parallel ranks** (the same two numbers on every rank): the caller adds these up over batches and
        divides. Every rank must call it with its own batch (all ranks of a pipeline with the same one)."""
        with ldist.deadline("evaluation: the other ranks' loss sums of one batch", self.wait_s):
            return self._eval_loss(batch)

    @property
    def wait_s(self) -> float:
        """train.wait_timeout_s: the bound on this engine's waits for the other ranks."""
        return float(getattr(getattr(self.cfg, "train", None), "wait_timeout_s", ldist.DEFAULT_WAIT_S))

    def _eval_loss(self, batch: dict) -> tuple[float, int]:
        labels = batch["labels"]
        n_local = torch.tensor(float((labels != -100).sum()), device=self.device)
        if self.pipeline:
            assert self._pipe_loss is not None
            self._pipe_loss.sum_mode = True
            try:
                out = self.ds.eval_batch(iter([_pipe_batch(batch, self.device)]), num_micro_batches=1,
                                         reduce_output="avg", bcast_loss=True)
            finally:
                self._pipe_loss.sum_mode = False
            loss_sum = float(out) * self.layout.dp  # eval_batch averages over data-parallel ranks
            if self.layout.dp > 1:
                dist.all_reduce(n_local, group=self._dp_group())
            self.ds.module.train()
            return loss_sum, int(n_local.item())
        self.ds.eval()
        try:
            ids, kwargs = self._inputs(batch)
            out = self.ds(ids, **kwargs)
        finally:
            self.ds.train()
        n = getattr(out, "num_targets", None)
        n = n_local if n is None else torch.as_tensor(n, dtype=torch.float32, device=self.device)
        # a micro-batch of only padding rows (the tail of the val split) has a 0/0 = NaN mean loss: it adds 0
        local_sum = torch.where(n > 0, out.loss.detach().float() * n.float(), torch.zeros((), device=self.device))
        packed = torch.stack([local_sum, n.float()])
        if self.layout.dp > 1:
            dist.all_reduce(packed, group=self._dp_group())
        return float(packed[0]), int(round(float(packed[1])))

    @torch.no_grad()
    def predict(self, batch: dict) -> Any:
        """The model output (logits, ...) of one evaluation micro-batch of this rank, in eval mode (no dropout).
        Not with a pipeline (its last stage alone holds the logits)."""
        if self.pipeline:
            raise LayoutError("Engine.predict needs pipeline_parallel=1 (a pipeline's last stage alone holds the "
                              "logits); score with eval_loss, or run on a layout without a pipeline.")
        self.ds.eval()
        try:
            ids, kwargs = self._inputs(batch)
            kwargs.pop("labels", None)
            return self.ds(ids, **kwargs)
        finally:
            self.ds.train()

    def all_reduce_dp(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the data-parallel ranks in place (a no-op on one); returns it."""
        if self.layout.dp > 1:
            with ldist.deadline("the other data-parallel ranks' sums (evaluation or fine-tuning counts)", self.wait_s):
                dist.all_reduce(t, group=self._dp_group())
        return t

    # ---- checkpoints
    def universal_checkpoint_info(self) -> dict:
        """Parameter patterns for ``deepspeed.checkpoint.ds_to_universal`` (names as DeepSpeed saves them):
        which parameters are replicated over tensor-parallel ranks, which are split along dim 1 (row
        parallel; column-parallel ones use the default dim 0), which are pipeline-replicated (tied
        embedding copies on the last stage). No vocabulary padding: embeddings are replicated."""
        import re

        from deepspeed.checkpoint import constants as C

        inv: dict[str, list[str]] = {}
        for ds_name, full in self._name_map.items():
            inv.setdefault(full, []).append(ds_name)

        def pats(kind: str) -> list[str]:
            return sorted(f"^{re.escape(d)}$" for full, k in self.tp_kinds.items() if k == kind
                          for d in inv.get(full, []))

        tied = [f"^{re.escape(d)}$" for d in self._name_map if d.startswith("tied_modules.")]
        return {
            C.UNIVERSAL_CHECKPOINT_VERSION_KEY: C.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            C.TP_REPLICATED_PARAMETER_PATTERNS: pats("replicated"),
            C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: pats("row"),
            C.VOCABULARY_PARAMETER_PATTERNS: [],
            C.PIPELINE_REPLICATED_PARAMETER_PATTERNS: tied,
            C.PARAMETER_TO_AVERAGE_PATTERNS: [],
            "llmscale_layout": {"dp": self.layout.dp, "tp": self.layout.tp, "pp": self.layout.pp,
                                "zero_stage": self.layout.zero_stage},
            "llmscale_param_names": dict(self._name_map),
            "llmscale_tp_kinds": dict(self.tp_kinds),
            "llmscale_tp_rank": self.layout.tp_rank,
            # ZeRO-0 keeps torch's optimizer state, indexed by position: the DeepSpeed names in that order let
            # llmscale convert such a checkpoint to the universal format (DeepSpeed's converter needs ZeRO shards)
            "llmscale_optimizer_params": self._optimizer_param_order() if self.layout.zero_stage == 0 else None,
        }

    def _optimizer_param_order(self) -> list[list[str]]:
        names = {id(p): n for n, p in self.ds.module.named_parameters()}
        return [[names[id(p)] for p in g["params"]] for g in self.ds.optimizer.param_groups]

    def save(self, tag_dir: str | os.PathLike, client_state: dict, *, write_file: Optional[Any] = None,
             before_file: Optional[Any] = None) -> None:
        """DeepSpeed ``save_checkpoint`` into ``tag_dir`` (its parent is the save dir, its name the tag).
        Every rank must call it. ``client_state`` gains ``universal_checkpoint_info``. ``write_file(state_dict,
        path)``, when given, receives each file DeepSpeed would ``torch.save`` instead (through its checkpoint
        engine, DeepSpeed's extension point for checkpoint IO; an asynchronous save snapshots them).
        ``before_file()`` runs before each file (the test hook of a rank failing inside DeepSpeed's save)."""
        tag_dir = Path(tag_dir)
        state = dict(client_state)
        state["universal_checkpoint_info"] = self.universal_checkpoint_info()
        ce = self.ds.checkpoint_engine
        hooked = write_file is not None or before_file is not None
        if hooked:
            inner = write_file or type(ce).save.__get__(ce)

            def save_file(state_dict: Any, path: str) -> Any:
                if before_file is not None:
                    before_file()
                return inner(state_dict, path)

            ce.save = save_file
        try:
            self.ds.save_checkpoint(str(tag_dir.parent), tag=tag_dir.name, client_state=state, save_latest=False)
        finally:
            if hooked:
                del ce.save  # back to the engine's own (class) method

    def load(self, tag_dir: str | os.PathLike, *, universal: bool = False, read_file: Optional[Any] = None) -> dict:
        """Restore model, optimizer and DeepSpeed counters from ``tag_dir``; returns the saved client state.
        ``universal``: ``tag_dir`` is a universal (layout-free) checkpoint folder, named as this engine names
        its parameters (see :func:`llmscale.checkpoint.universal.universal_view`). ``read_file(path,
        map_location)``, when given, reads each file DeepSpeed asks its checkpoint engine for (for this call
        only; :class:`llmscale.checkpoint.loading.VerifiedReader` hashes what it reads)."""
        tag_dir = Path(tag_dir)
        if not tag_dir.is_dir():
            raise FileNotFoundError(f"checkpoint folder {str(tag_dir)!r} does not exist.")
        if universal and self.layout.zero_stage == 0:
            return self._load_universal_zero0(tag_dir)
        # universal loads read with a bare torch.load inside DeepSpeed: restricted there for this call only
        scope = restricted_torch_in() if universal else contextlib.nullcontext()
        ce = self.ds.checkpoint_engine
        before = ce.load
        if read_file is not None:
            ce.load = lambda path, map_location=None: read_file(path, map_location)
        try:
            with _deepspeed_loads_universal(self.ds, universal), scope:
                path, client_state = self.ds.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                             load_optimizer_states=True,
                                                             load_lr_scheduler_states=False)
        finally:
            ce.load = before
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {str(tag_dir)!r} "
                                    f"(layout {self.layout.describe()}).")
        if universal:
            self._restore_group_hparams()
        return dict(client_state or {})

    def _restore_group_hparams(self) -> None:
        """Repairs after a universal load, for two DeepSpeed 0.19.8 ZeRO-3 slips
        (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3): it copies the FIRST saved group's
        hyperparameters onto every group (the no-decay group came back with weight decay), and it gives every
        group the SAME ``step`` tensor, which AdamW then increments once per group and step (the bias
        correction ran ahead: the loss left the uninterrupted run from the second step after a resume). The
        groups' hyperparameters are the config's (lr is set every step); each group gets its own step."""
        groups = self.ds.optimizer.param_groups
        if len(groups) != len(self.group_hparams):
            raise RuntimeError(f"optimizer has {len(groups)} groups after the load, {len(self.group_hparams)} built")
        for g, want in zip(groups, self.group_hparams):
            g.update(want)
        base = getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)
        for st in base.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()

    def _load_universal_zero0(self, folder: Path) -> dict:
        """A universal folder into a ZeRO-0 engine, which DeepSpeed 0.19.8 does not do (its universal load needs
        a ZeRO optimizer; with ZeRO-0 it restores neither the weights nor the moments): each parameter, its Adam
        moments and step from zero/NAME/*.pt, cut to this rank's tensor-parallel slice; the counters and the
        client state from the model-states file."""
        from llmscale.checkpoint.safe_load import restricted_load
        from llmscale.checkpoint.universal import read_universal_param

        if self.precision == "fp16":
            raise LayoutError("a ZeRO-0 fp16 run cannot load a checkpoint of another layout (DeepSpeed's fp16 "
                              "optimizer keeps its own master copy). Resume with parallel.zero_stage=1.")
        metas = [folder / "mp_rank_00_model_states.pt"] + sorted(folder.glob("*model_states.pt"))
        meta = restricted_load(next(f for f in metas if f.is_file()), map_location="cpu")
        opt = self.ds.optimizer
        # the Adam step: per parameter (zero/NAME/step.pt) from ZeRO 0-2, in zero/optimizer_state.pt from ZeRO-3
        saved_step = None
        if (folder / "zero" / "optimizer_state.pt").is_file():
            osd = restricted_load(folder / "zero" / "optimizer_state.pt", map_location="cpu")
            try:
                saved_step = float(osd["optimizer_state_dict"]["state"][0]["step"])
            except (KeyError, TypeError, IndexError):
                saved_step = None
        steps = set()
        with torch.no_grad():
            for name, p in self.ds.module.named_parameters():
                full = self._name_map.get(name, name)
                kind = self.tp_kinds.get(full, "replicated")
                states = read_universal_param(folder / "zero" / name, kind=kind, rank=self.layout.tp_rank,
                                              size=self.layout.tp, shape=tuple(p.shape))
                p.copy_(states.pop("fp32").to(p.dtype))
                if "step" in states:
                    steps.add(float(states.pop("step")))
                if p.requires_grad and states:
                    st = opt.state[p]
                    for k, v in states.items():
                        st[k] = v.to(device=p.device, dtype=torch.float32).clone()
                    step = max(steps) if steps else saved_step
                    if step is None:
                        raise LayoutError(f"universal checkpoint {folder} records no optimizer step for {full}.")
                    st["step"] = torch.tensor(step)
        if len(steps) > 1:
            raise RuntimeError(f"universal checkpoint {folder}: parameters disagree on the optimizer step {steps}")
        self.ds.global_steps = int(meta["global_steps"])
        self.ds.global_samples = int(meta.get("global_samples", self.ds.global_steps * self.ds.train_batch_size()))
        self.ds.skipped_steps = int(meta.get("skipped_steps", 0))
        self._restore_group_hparams()
        skip = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps",
                "global_steps", "global_samples", "dp_world_size", "mp_world_size", "checkpoint_parallel_dimensions",
                "ds_config", "ds_version"}
        return {k: v for k, v in meta.items() if k not in skip}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The consolidated single-device state dict (``model.state_dict()`` names of the unsplit model, CPU
        tensors) on global rank 0, ``{}`` elsewhere. Collective: every rank must call it. ZeRO-3 parameters
        are gathered, tensor-parallel shards concatenated, pipeline stages collected."""
        module = self.ds.module
        params = dict(module.named_parameters())
        local: dict[str, torch.Tensor] = {}
        if self.layout.zero_stage == 3:
            import deepspeed

            plist = list(params.values())
            with deepspeed.zero.GatheredParameters(plist, modifier_rank=None):
                for name, p in params.items():
                    local[self._name_map.get(name, name)] = p.detach().to("cpu", copy=True)
        else:
            for name, p in params.items():
                local.setdefault(self._name_map.get(name, name), p.detach().to("cpu", copy=True))
        # tensor parallel: concatenate shards over the TP group (every stage, every DP replica does it)
        if self.layout.tp > 1:
            for name in sorted(local):
                kind = self.tp_kinds.get(name, "replicated")
                if kind == "replicated":
                    continue
                dim = 0 if kind == "column" else 1
                if kind == "row" and local[name].dim() == 1:
                    continue
                parts = [torch.empty_like(local[name]) for _ in range(self.layout.tp)]
                dist.all_gather(parts, local[name].contiguous(), group=self.topo.tp_group)
                local[name] = torch.cat(parts, dim=dim)
        # pipeline: collect the stages on global rank 0 (one contribution per stage: dp 0, tp 0)
        contributes = self.layout.dp_rank == 0 and self.layout.tp_rank == 0
        if self.layout.pp > 1 or dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object(local if contributes else None, gathered, dst=0)
            if dist.get_rank() != 0:
                return {}
            merged: dict[str, torch.Tensor] = {}
            for part in gathered:
                for k, v in (part or {}).items():
                    merged.setdefault(k, v)
            local = merged
        # every single-device key, aliases of tied weights and persistent buffers included
        out: dict[str, torch.Tensor] = {}
        canonical = {}
        for name, p in self._model.named_parameters(remove_duplicate=False):
            canonical.setdefault(id(p), name)
        for key, value in self._model.state_dict(keep_vars=True).items():
            if isinstance(value, nn.Parameter):
                src = canonical[id(value)]
                if src not in local:
                    raise RuntimeError(f"full_state_dict: parameter {src!r} was not gathered from any stage.")
                out[key] = local[src]
            else:
                out[key] = value.detach().to("cpu", copy=True)
        return out


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_engine(cfg: Any, model: nn.Module, *, world: Any, plan: RunPlan,
                 loss_over: str = "micro_batch") -> Engine:
    """Wrap ``model`` (the full single-device model, built from the same seed on every rank) for the layout of
    ``cfg.parallel``. ``plan`` is :func:`llmscale.parallel.plan_run` of the same config and world size, computed
    once by the caller. The default process group must exist (``llmscale.dist.init_distributed``).

    ``loss_over``: ``"micro_batch"`` (pretraining: fixed-length windows, each micro-batch's mean weighs the
    same) or ``"step_targets"`` (fine-tuning: every target of the optimizer step weighs the same, whatever
    the micro-batch split; not with a pipeline)."""
    quiet_known_noise()
    use_one_ninja()
    import deepspeed

    if loss_over not in ("micro_batch", "step_targets"):
        raise ValueError(f"loss_over={loss_over!r}: expected 'micro_batch' or 'step_targets'.")
    if loss_over == "step_targets" and plan.layout.pp > 1:
        raise LayoutError("loss normalised over the targets of a whole step is not implemented for "
                          f"pipeline_parallel={plan.layout.pp}: use parallel.pipeline_parallel=1 (data parallel with "
                          "any ZeRO stage, or tensor parallel).")

    if plan.layout.world_size != world.world_size:
        raise LayoutError(f"the run plan is for {plan.layout.world_size} processes ({plan.layout.describe()}), the job "
                          f"has {world.world_size}: compute it with llmscale.parallel.plan_run(cfg, world.world_size).")
    layout, batch = plan.layout, plan.batch
    if not dist.is_initialized():
        raise RuntimeError("build_engine needs the default process group: "
                           "call llmscale.dist.init_distributed(world) first.")
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    rank = dist.get_rank()
    layout = layout.for_rank(rank)
    precision = resolve_precision(cfg.train.precision)
    on_cuda = _on_cuda()
    if on_cuda:
        model = model.to(torch.device("cuda", torch.cuda.current_device()))

    topo = Topology(layout) if (layout.tp > 1 or layout.pp > 1) else None
    kinds = apply_tensor_parallel(model, rank=layout.tp_rank, size=layout.tp,
                                  group=topo.tp_group if topo is not None else None)
    # no decay: norms, biases, embeddings unless optim.decay_embeddings (decided on the single-device model, by
    # single-device name)

    no_decay = no_decay_names(model, decay_embeddings=cfg.optim.decay_embeddings)
    pipe_loss = None
    if layout.pp > 1:
        from deepspeed.pipe import PipelineModule

        pieces = pipeline_pieces(model)
        pipe_loss = _PipeLoss()
        module = PipelineModule(layers=pieces.layers, topology=topo.topo, loss_fn=pipe_loss,
                                partition_method=cfg.parallel.pipeline_partition, dynamic_shape=True)
        # names of every stage (not only this one's): universal-checkpoint patterns must cover the whole model
        name_map = pipeline_param_names(pieces, model)
        local_named = [(name_map[n], p) for n, p in module.named_parameters()]
    else:
        module = model
        _present_output_as_dict(model)
        name_map = {n: n for n, _ in model.named_parameters()}
        local_named = list(model.named_parameters())

    ctl = StepControl()
    ds_config = build_deepspeed_config(cfg, batch)
    ctl.manage = cfg.parallel.zero_stage == 0 and precision == "fp32"
    ctl.clip = float(cfg.optim.grad_clip)
    ctl.tp_rank = layout.tp_rank
    ctl.model_group = topo.model_group if topo is not None else None
    ctl.flag_group = None  # world
    groups = param_groups(local_named, cfg.optim, no_decay=no_decay)
    fused = on_cuda
    optimizer = SkippableAdamW(groups, ctl=ctl, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                               eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
                               **({"fused": True} if fused else {}))
    ctl.params = [p for g in groups for p in g["params"]]
    mpu = topo.grid if (topo is not None and layout.pp == 1) else None
    ds, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config, mpu=mpu,
                                       dist_init_required=False)
    # Checkpoint files are read through the restricted unpickler: DeepSpeed's extension point for checkpoint IO
    # is its checkpoint engine (llmscale.checkpoint.safe_load; saving is unchanged).
    restrict_checkpoint_engine(ds.checkpoint_engine)
    if ctl.manage:
        ctl.params = [p for p in ds.module.parameters() if p.requires_grad]
    if cfg.parallel.zero_stage == 0 and layout.dp == 1 and layout.pp == 1:
        # One replica: DeepSpeed would still flatten, all-reduce and copy back every gradient (a group of one).
        ds.enable_backward_allreduce = False
    # Dropout differs per data-parallel replica, agrees within a tensor-parallel group (replicated activations).
    _seed_everything(cfg.train.seed + 1 + 1009 * layout.dp_rank + 7919 * layout.pp_rank)
    log.info("engine: %s, micro-batch %d x %d accumulation x dp %d = global batch %d, precision %s",
             layout.describe(), batch.micro_batch_size, batch.grad_accum_steps, batch.dp_size,
             batch.global_batch_size, precision)
    engine = Engine(cfg=cfg, ds=ds, layout=layout, plan=batch, topo=topo, ctl=ctl, model=model, kinds=kinds,
                    name_map=name_map, pipe_loss=pipe_loss, ds_config=ds_config, loss_over=loss_over)
    engine.group_hparams = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    return engine
