"""The training loop. It stays short by leaving the work to the modules around it:

* the loader serves this rank's micro-batches of the next global batch (:mod:`llmscale.data.loader`);
* the engine runs the optimizer step on DeepSpeed and reports loss, gradient norm, lr and timings
  (:mod:`llmscale.engine`);
* metric sinks write the console line, ``metrics.jsonl`` and TensorBoard (:mod:`llmscale.metrics`);
* the checkpoint manager saves and resumes everything with ``state_dict()`` (:mod:`llmscale.checkpoint`);
* a preemption request (SIGTERM / SIGUSR1) is a flag the loop reads at a step boundary: :meth:`Trainer.fit`
  installs the handlers itself for its duration (:class:`llmscale.signals.Preemption`, hard deadline from
  ``LLMSCALE_PREEMPT_GRACE_S``).

    trainer = Trainer(cfg, engine=engine, loader=loader, world=world, metrics=metrics,
                      flops_per_token=model.flops_per_token(cfg.data.seq_len))
    summary = trainer.fit()      # {"step": ..., "val_loss": ..., ...}

Validation reports loss (nats per target token), perplexity and bits per byte, scored by
:func:`llmscale.evaluate.lm_validation` (shared with the evaluation job): a small val split whole, a
larger one on ``train.eval_batches`` micro-batches per rank, always the same ones.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from llmscale.errors import CheckpointError
from llmscale.evaluate import lm_validation
from llmscale.log import get_logger
from llmscale.metrics import MetricsLogger, device_peak_flops, memory_stats

log = get_logger(__name__)


@dataclass
class TrainState:
    """Counters that survive a restart (saved in every checkpoint)."""

    step: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.samples_seen = int(state["samples_seen"])


class BadStepGuard:
    """Counts non-finite (skipped) steps in a row; ``update(skipped)`` is True when a rollback is due.
    ``max_bad_steps=0`` turns rollback off."""

    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.in_a_row = 0

    def update(self, skipped: bool) -> bool:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.max_bad_steps and self.in_a_row >= self.max_bad_steps:
            self.in_a_row = 0
            return True
        return False


class BestTracker:
    """The best validation so far and early stopping (``patience`` validations without improvement; 0 = never
    stop). ``metric`` is a key of the validation dict; higher is better except for losses. Stateful."""

    def __init__(self, metric: str, *, patience: int = 0) -> None:
        self.metric = metric
        self.patience = patience
        self.higher_is_better = "loss" not in metric
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.bad_evals = 0

    def update(self, metrics: dict, step: int) -> tuple[bool, bool]:
        """``(is_best, stop)`` after the validation of ``step``."""
        value = float(metrics[self.metric])
        better = self.best is None or (value > self.best if self.higher_is_better else value < self.best)
        if better:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return better, bool(self.patience and self.bad_evals >= self.patience)

    def state_dict(self) -> dict:
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.best = None if state["best"] is None else float(state["best"])
        self.best_step = None if state["best_step"] is None else int(state["best_step"])
        self.bad_evals = int(state["bad_evals"])


class _Window:
    """Sums over the steps since the last log line, averaged when it is written."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.loss = 0.0
        self.loss_steps = 0
        self.grad_norm: Optional[float] = None
        self.skipped = 0
        self.tokens = 0
        self.wall = 0.0
        self.timings: dict[str, float] = {}

    def add(self, result: Any, *, tokens: int, wall: float) -> None:
        self.steps += 1
        if result.skipped:
            self.skipped += 1
        elif math.isfinite(result.loss):
            self.loss += result.loss
            self.loss_steps += 1
        if result.grad_norm is not None and math.isfinite(result.grad_norm):
            self.grad_norm = result.grad_norm  # the latest: norms are noisy, the last one is what clipping saw
        self.tokens += tokens
        self.wall += wall
        for k, v in result.timings.items():
            self.timings[k] = self.timings.get(k, 0.0) + v


# Test hook: comma-separated loader positions (optimizer steps of the data stream, 0-based) whose batches are
# "poisoned" (the loss becomes NaN before the backward), to drive the real skip -> rollback path end to end.
# Keyed on the loader's position, like a corrupt batch: after a rollback the loader keeps its position, so the
# poisoned batches are not met again.
POISON_ENV = "LLMSCALE_TEST_NAN_BATCHES"


def _poisoned_positions() -> frozenset[int]:
    raw = os.environ.get(POISON_ENV, "").strip()
    return frozenset(int(x) for x in raw.split(",") if x.strip()) if raw else frozenset()


class Trainer:
    """Runs ``cfg.train.steps`` optimizer steps of ``engine`` on ``loader``'s batches (see module doc).

    ``checkpoints``: a :class:`llmscale.checkpoint.CheckpointManager` (or None: no checkpoints); after
    ``train.max_bad_steps`` skipped (non-finite) steps in a row it rolls the run back to its newest checkpoint.
    ``handle_signals``: install SIGTERM/SIGUSR1 handlers for the duration of :meth:`fit` (main thread only);
    once any rank was signalled, all ranks agree at the next step boundary, save (``force=True``) and
    return with ``stopped=True`` (the job then exits :data:`llmscale.signals.EXIT_REQUEUE`). ``flops_per_token``:
    training FLOPs per token, for MFU.
    ``resume_from`` / ``no_resume``: passed to ``checkpoints.resume``.

    Fine-tuning hooks: ``validate`` (a collective returning the validation dict, instead of the language-model
    validation), ``best`` (a :class:`BestTracker`: the checkpoint of each new best validation is saved and
    marked best, and ``patience`` stops the run early), ``tokens_in`` (the real tokens of a step's
    micro-batches over all ranks, instead of global batch x seq_len, for dynamically padded batches)."""

    def __init__(self, cfg: Any, *, engine: Any, loader: Any, world: Any, metrics: MetricsLogger,
                 flops_per_token: Optional[float] = None, checkpoints: Any = None,
                 handle_signals: bool = True, resume_from: Optional[str] = None,
                 no_resume: bool = False, validate: Optional[Callable[[], dict]] = None,
                 best: Optional[BestTracker] = None, tokens_in: Optional[Callable[[list], int]] = None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.loader = loader
        self.world = world
        self.metrics = metrics
        self.flops_per_token = flops_per_token
        self.checkpoints = checkpoints
        self.handle_signals = handle_signals
        self.resume_from = resume_from
        self.no_resume = no_resume
        self.state = TrainState()
        self.peak_flops = device_peak_flops()
        self.seq_len = cfg.data.seq_len
        self.global_batch = engine.plan.global_batch_size
        self.last_eval: dict[str, Any] = {}
        self.validate = validate
        self.best = best
        self.tokens_in = tokens_in
        self._poisoned = _poisoned_positions()

    # ---- what a checkpoint holds besides the engine
    def stateful(self) -> dict[str, Any]:
        out = {"trainer": self.state, "loader": self.loader}
        if self.best is not None:
            out["best"] = self.best
        return out

    # ---- the loop
    def fit(self) -> dict[str, Any]:
        if not self.handle_signals:
            return self._fit(None)
        from llmscale.signals import Preemption, grace_from_env

        with Preemption(grace_s=grace_from_env()) as preemption:
            return self._fit(preemption)

    def _fit(self, preemption: Any) -> dict[str, Any]:
        cfg = self.cfg.train
        total = cfg.steps
        if self.checkpoints is not None:
            resumed = self.checkpoints.resume(self.engine, self.stateful(), resume_from=self.resume_from,
                                              no_resume=self.no_resume)
            if resumed is not None:
                log.info("resumed at step %d (%d tokens seen)", self.state.step, self.state.tokens_seen)
        run_dir = getattr(self.cfg, "run_dir", None)
        if run_dir and self.world.rank == 0:
            from llmscale.artifacts import clear_preempted

            clear_preempted(run_dir)
        self.metrics.total_steps = total
        self.metrics.begin(self.state.step)
        if self.state.step >= total:
            log.info("the run is already at step %d of train.steps=%d: nothing to train. Raise train.steps to "
                     "continue.", self.state.step, total)
        window = _Window()
        guard = None
        if self.checkpoints is not None and cfg.max_bad_steps:
            guard = BadStepGuard(cfg.max_bad_steps)
        stopped = False
        t_last = time.perf_counter()
        while self.state.step < total:
            t0 = time.perf_counter()
            position = getattr(self.loader, "step", None) if self._poisoned else None
            micro_batches = self.loader.next_step()
            t_data = time.perf_counter() - t0
            if position in self._poisoned:
                log.warning("test hook %s: batches at loader position %d poisoned (NaN loss)", POISON_ENV, position)
                result = self.engine.train_step(micro_batches, poison=True)
            else:
                result = self.engine.train_step(micro_batches)
            result.timings["data"] = t_data
            self.state.step += 1
            self.state.samples_seen += self.global_batch
            tokens = self.tokens_in(micro_batches) if self.tokens_in else self.global_batch * self.seq_len
            self.state.tokens_seen += tokens
            now = time.perf_counter()
            window.add(result, tokens=tokens, wall=now - t_last)
            t_last = now
            step = self.state.step
            last = step == total
            self.metrics.advance(1, loss=result.loss, lr=result.lr)
            if step % cfg.log_every == 0 or last:
                self._log_train(window, result.lr)
                window.reset()
            if guard is not None and guard.update(result.skipped):
                # the same decision on every rank: StepResult.skipped is agreed by the engine
                self.checkpoints.rollback(self.engine, self.stateful())
                window.reset()
                t_last = time.perf_counter()
                continue
            early = False
            if (cfg.eval_every and step % cfg.eval_every == 0) or last:
                out = self.evaluate()
                if self.best is not None and out:
                    is_best, early = self.best.update(out, step)
                    if is_best and self.checkpoints is not None:
                        self.checkpoints.maybe_save(step, self.engine, self.stateful(), force=True)
                        self.checkpoints.mark_best(step, metric=self.best.metric, value=self.best.best)
                    if early:
                        log.warning("early stop at step %d: %s has not improved on %.6g (step %d) for %d validations",
                                    step, self.best.metric, self.best.best, self.best.best_step, self.best.bad_evals)
            stop = preemption.should_stop() if preemption is not None else False
            if self.checkpoints is not None:
                try:
                    self.checkpoints.poll()  # finishes a background save once every rank wrote it (checkpoint.async)
                except CheckpointError as e:
                    if self.cfg.checkpoint.async_failure != "sync":
                        raise
                    log.error("%s\ncheckpoint.async_failure=sync: saving step %d synchronously instead", e, step)
                    self.checkpoints.maybe_save(step, self.engine, self.stateful(), force=True, sync=True)
                force = stop or early or (last and self.cfg.checkpoint.save_at_end)
                # preemption, early stop and the end wait for the save (and for one still in flight)
                self.checkpoints.maybe_save(step, self.engine, self.stateful(), force=force, sync=stop or early or last)
            t_last = time.perf_counter()  # eval and checkpoint time is not step time
            if stop:
                log.warning("stop requested: saved at step %d; re-run the same command to resume", step)
                if run_dir:
                    from llmscale.artifacts import mark_preempted

                    mark_preempted(run_dir, step=step)
                stopped = True
                break
            if early:
                break
        if self.checkpoints is not None:
            self.checkpoints.wait()  # the end of training waits for the last write
        out = {**self.state.state_dict(), **self.last_eval, "stopped": stopped}
        if self.best is not None:
            out.update(best_metric=self.best.metric, best_value=self.best.best, best_step=self.best.best_step,
                       early_stopped=bool(self.best.patience and self.best.bad_evals >= self.best.patience))
        return out

    def _log_train(self, w: _Window, lr: float) -> None:
        if w.steps == 0:
            return
        tokens_per_s = w.tokens / max(w.wall, 1e-9)
        rec: dict[str, Any] = {
            "kind": "train",
            "step": self.state.step,
            "loss": w.loss / w.loss_steps if w.loss_steps else float("nan"),
            "lr": lr,
            "grad_norm": w.grad_norm,
            "tokens_seen": self.state.tokens_seen,
            "samples_seen": self.state.samples_seen,
            "epoch": self.state.samples_seen / max(self.loader.samples_per_epoch, 1),
            "tokens_per_s": tokens_per_s,
            "step_time_s": w.wall / w.steps,
            "data_time_s": w.timings.get("data", 0.0) / w.steps,
        }
        for k in ("forward", "backward", "optimizer", "comm"):
            rec[f"{k}_time_s"] = w.timings.get(k, 0.0) / w.steps
        if self.flops_per_token:
            per_device = self.flops_per_token * tokens_per_s / self.world.world_size
            rec["tflops_per_device"] = per_device / 1e12
            rec["mfu"] = per_device / self.peak_flops if self.peak_flops else None
        else:
            rec["mfu"] = None
        rec["skipped_steps"] = w.skipped
        rec.update(memory_stats())
        self.metrics.log(rec)

    # ---- validation
    def evaluate(self) -> dict[str, Any]:
        """Validation loss, perplexity and bits per byte (the same numbers on every rank; see
        :func:`llmscale.evaluate.lm_validation`), logged as a ``val`` record."""
        t0 = time.perf_counter()
        if self.validate is not None:
            out = self.validate()
        else:
            out = lm_validation(self.engine, self.loader, max_batches=self.cfg.train.eval_batches)
        if not out:
            return {}
        self.metrics.log({"kind": "val", "step": self.state.step, **out, "eval_time_s": time.perf_counter() - t0})
        self.last_eval = out
        return out
