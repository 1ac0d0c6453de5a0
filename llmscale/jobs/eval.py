"""``llmscale eval CONFIG [key=value ...]``: score any model on held-out data, on one process or many.

    llmscale eval configs/eval_wikitext2.yaml model=runs/quickstart
    llmscale eval configs/eval_sst2.yaml model=runs/finetune_sst2          # its best checkpoint
    torchrun --nproc_per_node 2 -m llmscale eval configs/eval_wikitext2.yaml model=runs/quickstart

Tasks (``tasks=[...]``, several per job): ``perplexity`` (sliding windows, bits per byte, word perplexity),
``mlm`` (BERT masked-LM loss and accuracy, fixed masking seed), ``nsp`` (next-sentence accuracy on a prepared
BERT dataset's val pairs), ``classify`` (accuracy, F1, MCC, confusion),
``generate`` (completions for a prompt file) and ``harness`` (lm-evaluation-harness tasks; the `harness`
extra). ``model`` is anything :func:`llmscale.artifacts.load_model` reads; a run directory gives its
best checkpoint when it records one (fine-tune runs), else its final weights (``checkpoint=...`` chooses).

Every rank loads the consolidated single-device model and scores its share of the items; per-item sums
are gathered and added in item order, so 1 and N processes and any ``batch_size`` give the same numbers.
The harness task runs on rank 0 only. Rank 0 writes OUTPUT_DIR/results.json, results.md and
predictions.jsonl (classify and generate) and prints the results as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from llmscale.log import get_logger

log = get_logger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML eval config (see configs/eval_*.yaml, `llmscale config show --eval`).")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model=runs/quickstart batch_size=16")


def main(args: argparse.Namespace) -> int:
    from llmscale.config import load_config
    from llmscale.config_eval import EvalConfig

    cfg = load_config(EvalConfig, args.config, args.overrides)
    report = run(cfg)
    if report is not None:
        print(json.dumps({"output_dir": cfg.output_dir, "tasks": {k: _numbers(r) for k, r in report["tasks"].items()}},
                         ensure_ascii=False))
    return 0


def _numbers(res: dict) -> dict:
    """The plain numbers of a task's results (the harness's per task, as "task/metric")."""
    out = {m: v for m, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for task, metrics in (res.get("results") or {}).items():
        out.update({f"{task}/{m}": v for m, v in metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


def _device(choice: str, local_rank: int) -> str:
    import torch

    if choice != "auto":
        return choice
    return f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"


def _load(cfg: Any, device: str):
    from llmscale.artifacts import load_model, select_weights
    from llmscale.models.hf import load_tokenizer_for

    loaded = load_model(select_weights(cfg.model, cfg.checkpoint), device=device)
    if cfg.tokenizer:
        from pathlib import Path

        loaded.tokenizer = load_tokenizer_for(cfg.tokenizer, loaded.config)
        loaded.tokenizer_dir = Path(cfg.tokenizer)
    return loaded


def run(cfg: Any) -> dict | None:
    """Evaluate per ``cfg`` in this process (one rank of the job). Returns the report on rank 0, else None."""
    import torch

    from llmscale import __version__, eval_tasks
    from llmscale import dist as ldist
    from llmscale.config import to_dict

    world = ldist.world_for_job()
    ldist.init_distributed(world, backend="nccl" if torch.cuda.is_available() else "gloo")
    try:
        device = _device(cfg.device, world.local_rank)
        loaded = _load(cfg, device)
        log.info("evaluating %s (%s, %s) on %d process(es)", loaded.path, loaded.kind, loaded.config.family,
                 world.world_size)
        tasks: dict[str, Any] = {}
        predictions: list[dict[str, Any]] = []
        for name in cfg.tasks:
            t0 = time.perf_counter()
            if name == "harness":
                res = _harness(loaded, cfg, device=device, world=world)
            else:
                res = eval_tasks.TASK_FUNCS[name](loaded, getattr(cfg, name), batch_size=cfg.batch_size, world=world)
            res.metrics["seconds"] = time.perf_counter() - t0
            tasks[name] = res.metrics
            predictions += res.predictions
            log.info("%s: %s", name, {k: v for k, v in res.metrics.items() if isinstance(v, (int, float))})
        if not world.is_main:
            return None
        report = {"model": eval_tasks.model_summary(loaded, cfg.model), "tasks": tasks, "world_size": world.world_size,
                  "batch_size": cfg.batch_size, "device": device, "llmscale_version": __version__,
                  "created_unix": time.time(), "config": to_dict(cfg)}
        path = eval_tasks.write_results(cfg.output_dir, report, predictions)
        log.info("results written to %s", path)
        return report
    finally:
        ldist.barrier()
        ldist.shutdown()


def _harness(loaded: Any, cfg: Any, *, device: str, world: Any):
    """The lm-evaluation-harness tasks, on rank 0 (the others wait at the next collective)."""
    from llmscale.eval_tasks import TaskResult

    if not world.is_main:
        return TaskResult({"ran_on": "rank 0"})
    from llmscale.harness import run_harness

    h = cfg.harness
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    out = run_harness(loaded, tasks=list(h.tasks), include_path=list(h.include_path),
                      num_fewshot=None if h.num_fewshot < 0 else h.num_fewshot, limit=h.limit or None,
                      batch_size=cfg.batch_size, device=device, seed=h.seed)
    out["settings"] = {"tasks": list(h.tasks), "num_fewshot": h.num_fewshot, "limit": h.limit or None,
                       "seed": h.seed}
    return TaskResult(out)
