"""Shared pieces of the checkpoint tests: a tiny regression model trained on real DeepSpeed (CPU, gloo)
through llmscale's own ``build_engine`` (the engine the trainer uses, not a hand-written DeepSpeed
config), a deterministic data loader with a resumable position, and a training function that uses
llmscale.checkpoint exactly as the trainer does (resume at start, maybe_save after each step)."""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Optional

import torch

GLOBAL_BATCH = 8
DIM = 16


class ToyLoader:
    """Global batch ``step`` = GLOBAL_BATCH samples drawn from a generator seeded by (seed, step): the
    order depends only on the step, never on dp_size; rank r takes the r-th contiguous chunk."""

    def __init__(self, *, dp_rank: int, dp_size: int, seed: int = 7, micro_batch: Optional[int] = None) -> None:
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.step = 0
        self.micro = micro_batch or GLOBAL_BATCH // dp_size

    def global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + step)
        x = torch.randn(GLOBAL_BATCH, DIM, generator=g)
        y = torch.randn(GLOBAL_BATCH, DIM, generator=g)
        ids = torch.arange(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
        return x, y, ids

    def next_step(self) -> list[dict]:
        x, y, ids = self.global_batch(self.step)
        self.step += 1
        n = GLOBAL_BATCH // self.dp_size
        sl = slice(self.dp_rank * n, (self.dp_rank + 1) * n)
        x, y, ids = x[sl], y[sl], ids[sl]
        return [{"input_ids": x[i:i + self.micro], "labels": y[i:i + self.micro], "sample_ids": ids[i:i + self.micro]}
                for i in range(0, n, self.micro)]

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, s: dict) -> None:
        assert s["seed"] == self.seed
        self.step = int(s["step"])


class Counters:
    def __init__(self) -> None:
        self.step = 0
        self.tokens_seen = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, s: dict) -> None:
        self.step, self.tokens_seen = int(s["step"]), int(s["tokens_seen"])


class ToyRegressor(torch.nn.Module):
    """A small MLP with dropout, trained on mean squared error: the engine only needs ``forward(input_ids,
    labels=...)`` returning an output with ``loss`` (here the inputs are float vectors, not token ids)."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(DIM, 64), torch.nn.GELU(), torch.nn.Dropout(dropout), torch.nn.Linear(64, 64),
            torch.nn.GELU(), torch.nn.Linear(64, DIM),
        )

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None):
        from llmscale.models.layers import ModelOutput

        out = self.net(input_ids)
        loss = ((out - labels) ** 2).mean() if labels is not None else None
        return ModelOutput(logits=out, loss=loss)


def toy_model(seed: int = 0, dropout: float = 0.2) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ToyRegressor(dropout)


def toy_config(*, zero_stage: int = 1, nan_policy: str = "skip") -> Any:
    """The RunConfig the toy engine is built from. Its model section only has to pass the layout checks
    (data parallel only): the engine wraps the module it is given."""
    from llmscale.config import RunConfig, from_dict

    return from_dict(RunConfig, {
        "data": {"seq_len": DIM},
        "model": {"family": "gpt", "n_layers": 1, "d_model": DIM, "n_heads": 1, "vocab_size": DIM, "max_seq_len": DIM},
        "optim": {"lr": 3e-3, "min_lr": 0.0, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.01,
                  "grad_clip": 1.0},
        "train": {"steps": 1000, "seed": 0, "precision": "fp32", "nan_policy": nan_policy},
        "parallel": {"global_batch_size": GLOBAL_BATCH, "grad_accum_steps": 1, "zero_stage": zero_stage},
    })


def world_of(rank: int, world_size: int) -> Any:
    from llmscale.dist import World

    return World(rank=rank, world_size=world_size, local_rank=rank, local_world_size=world_size)


def build_ds(*, zero_stage: int = 1, world_size: int, model: Optional[torch.nn.Module] = None) -> Any:
    """An llmscale Engine (DeepSpeed underneath) for the toy model on the current process group."""
    import torch.distributed as dist

    from llmscale.engine import build_engine
    from llmscale.parallel import plan_run

    cfg = toy_config(zero_stage=zero_stage)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return build_engine(cfg, model or toy_model(), world=world_of(rank, world_size), plan=plan_run(cfg, world_size))


def train_step(engine: Any, micro_batches: list[dict], *, poison: bool = False) -> float:
    """One optimizer step; returns the global mean loss (all ranks agree), NaN for a skipped step.
    ``poison`` makes the inputs NaN, so the loss and gradients are non-finite and every rank skips."""
    if poison:
        micro_batches = [{**mb, "input_ids": mb["input_ids"] * float("nan")} for mb in micro_batches]
    result = engine.train_step(micro_batches)
    return float("nan") if result.skipped else result.loss


def params_digest(engine: Any) -> str:
    h = hashlib.sha256()
    for name, p in sorted(engine.ds.module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def train(rank: int, world_size: int, run_dir: str, steps: int, *, every_steps: int = 2, keep_last: int = 2,
          keep_every: int = 0, zero_stage: int = 1, stop_after: Optional[int] = None, resume: bool = True,
          nan_steps: tuple = (), max_bad_steps: int = 0, loss_log: Optional[str] = None,
          preempt: bool = False, step_sleep: float = 0.0, dropout: float = 0.2,
          resume_from: Optional[str] = None, wait_timeout_s: Optional[float] = None) -> dict:
    """The trainer's checkpoint protocol on a toy DeepSpeed model. Returns losses by step and a digest of
    the final weights. ``stop_after``: leave the loop after that many steps of this process (a clean
    "interruption"). ``nan_steps``: global steps (1-based) whose loss is poisoned."""
    from llmscale.checkpoint import CheckpointManager
    from llmscale.config import CheckpointConfig
    from llmscale.trainer import BadStepGuard

    engine = build_ds(zero_stage=zero_stage, world_size=world_size, model=toy_model(dropout=dropout))
    loader = ToyLoader(dp_rank=rank, dp_size=world_size)
    counters = Counters()
    stateful = {"trainer": counters, "loader": loader}
    manager = CheckpointManager(world=world_of(rank, world_size), run_dir=run_dir, checkpoint=CheckpointConfig(
        every_steps=every_steps, keep_last=keep_last, keep_every=keep_every), wait_timeout_s=wait_timeout_s)
    resumed = manager.resume(engine, stateful, resume_from=resume_from, no_resume=not resume)
    guard = BadStepGuard(max_bad_steps)
    stop_flag = None
    if preempt:
        from llmscale.signals import Preemption, grace_from_env

        stop_flag = Preemption(grace_s=grace_from_env())  # as Trainer.fit installs it
    stopped = False
    losses: dict[int, float] = {}
    rollbacks = []
    done = 0
    seen_ids: list[int] = []
    while counters.step < steps:
        batch = loader.next_step()
        seen_ids.extend(int(i) for mb in batch for i in mb["sample_ids"])
        # NaN injection is keyed on the data position, so skipped batches stay skipped after a rollback
        poison = loader.step in nan_steps
        loss = train_step(engine, batch, poison=poison)
        bad = not math.isfinite(loss)
        counters.step += 1
        counters.tokens_seen += GLOBAL_BATCH
        if not bad:
            losses[counters.step] = loss
        if loss_log and rank == 0:
            with open(loss_log, "a") as f:
                f.write(json.dumps({"step": counters.step, "loss": loss}) + "\n")
        if guard.update(bad):
            rollbacks.append((counters.step, manager.rollback(engine, stateful)))
            continue
        stop = stop_flag.should_stop() if stop_flag is not None else False
        if not bad:
            manager.maybe_save(counters.step, engine, stateful, force=counters.step == steps or stop)
        if stop:
            stopped = True
            break
        if step_sleep:
            import time

            time.sleep(step_sleep)
        done += 1
        if stop_after is not None and done >= stop_after:
            break
    return {"resumed": resumed, "losses": losses, "digest": params_digest(engine), "step": counters.step,
            "rollbacks": rollbacks, "loader_step": loader.step, "stopped": stopped,
            "sample_ids": seen_ids}
