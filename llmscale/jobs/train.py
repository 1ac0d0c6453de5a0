"""``llmscale train CONFIG [key=value ...]``: pretrain a GPT (causal LM) or BERT (masked LM, optional NSP)
on datasets written by ``llmscale prepare``, on DeepSpeed.

Launch it any way you like; the world is read from the environment (:func:`llmscale.dist.discover_world`)::

    llmscale train configs/quickstart.yaml                               # one process
    torchrun --nproc_per_node 8 -m llmscale train configs/gpt2_124m.yaml optim.lr=6e-4
    accelerate launch --num_processes 8 -m llmscale train configs/gpt2_124m.yaml
    srun --ntasks-per-node 8 python -m llmscale train configs/gpt2_124m.yaml   # SLURM_* variables

Before anything is built, the datasets' tokenizers are checked: a blend must share one tokenizer;
``model.vocab_size`` (null = take the dataset's) must equal the tokenizer's; and a run directory that
already trained with one tokenizer (``RUN_DIR/tokenizer``) refuses data made with another. The
resolved config goes to ``RUN_DIR/config.yaml``; at the end the consolidated weights go to
``RUN_DIR/final/model.pt`` (loaded by :func:`llmscale.artifacts.load_model`). The checks live in
:mod:`llmscale.data.checks`, the loop in :mod:`llmscale.trainer`; this job only builds the pieces.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from llmscale.artifacts import CONFIG_FILE, FINAL_DIR, FINAL_WEIGHTS, record_tokenizer, save_final_weights
from llmscale.config import RunConfig, load_config, save_resolved
from llmscale.data.checks import check_datasets
from llmscale.log import get_logger

log = get_logger(__name__)



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (see configs/ and `llmscale config show`).")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.steps=500 run_dir=runs/x")
    p.add_argument("--no-final-weights", action="store_true",
                   help=f"Do not write the consolidated weights to RUN_DIR/{FINAL_DIR}/{FINAL_WEIGHTS} at the end.")
    p.add_argument("--resume-from", default=None,
                   help="Resume from this checkpoint (or run/checkpoints folder) instead of RUN_DIR's newest.")
    p.add_argument("--no-resume", action="store_true",
                   help="Start from scratch even if RUN_DIR has checkpoints (they are moved aside, not deleted).")
    p.add_argument("--log-all-ranks", action="store_true", help="Log from every rank, not only rank 0.")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(RunConfig, args.config, args.overrides)
    if args.log_all_ranks:
        cfg.train.log_all_ranks = True
    summary = run(cfg, final_weights=not args.no_final_weights, resume_from=args.resume_from,
                  no_resume=args.no_resume)
    if summary.get("rank", 0) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "rank"}))
    if summary.get("stopped"):
        from llmscale.signals import EXIT_REQUEUE

        return EXIT_REQUEUE  # saved on request (preemption): run the same command again to resume
    return 0


# --------------------------------------------------------------------------- the job


def run(cfg: RunConfig, *, final_weights: bool = True, resume_from: str | None = None,
        no_resume: bool = False) -> dict:
    """Train per ``cfg`` in this process (one rank of the job). Returns the final counters and val metrics."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere
    from llmscale import dist as ldist
    from llmscale.log import setup_logging

    setup_logging(all_ranks=cfg.train.log_all_ranks)
    manifests = check_datasets(cfg)  # refuse mismatched data before any process group or model exists
    world = ldist.world_for_job()

    from llmscale.checkpoint import CheckpointManager
    from llmscale.data.loader import build_loader
    from llmscale.data.tokenizer import Tokenizer
    from llmscale.engine import build_engine
    from llmscale.metrics import MetricsLogger
    from llmscale.models import build_model
    from llmscale.parallel import plan_run
    from llmscale.trainer import Trainer

    plan = plan_run(cfg, world.world_size)  # layout and batch, once: refused here before any process group
    batch = plan.batch
    ldist.init_distributed(world)
    monitor = ldist.PeerMonitor(timeout_s=cfg.train.peer_timeout_s)
    try:
        monitor.start()  # a dead node ends the job in train.peer_timeout_s, naming the lost ranks
        run_dir = Path(cfg.run_dir)
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            record_tokenizer(run_dir, manifests[0].tokenizer_dir())
            save_resolved(cfg, run_dir / CONFIG_FILE)
        torch.distributed.barrier()  # RUN_DIR/tokenizer exists for every rank from here on
        tok = Tokenizer.load(manifests[0].tokenizer_dir())
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model, vocab_size=cfg.model.vocab_size)
        flops = model.flops_per_token(cfg.data.seq_len) if hasattr(model, "flops_per_token") else None
        log.info("model: %s, %.2fM parameters (%.2fM without embeddings), vocab %d", cfg.model.family,
                 model.num_params() / 1e6, model.num_params(exclude_embeddings=True) / 1e6, cfg.model.vocab_size)
        if cfg.train.compile:
            model.compile()  # in place: parameter names (and so checkpoints) stay those of the plain model
        engine = build_engine(cfg, model, world=world, plan=plan)
        loader = build_loader(
            cfg.data, split="train", dp_rank=engine.dp_rank, dp_size=engine.dp_size,
            global_batch_size=batch.global_batch_size, micro_batch_size=batch.micro_batch_size,
            pad_id=tok.pad_id, mask_id=tok.mask_id, cls_id=tok.cls_id, sep_id=tok.sep_id,
            vocab_size=cfg.model.vocab_size, shuffle=True,
        )
        manager = CheckpointManager(cfg, world=world)
        metrics = MetricsLogger(run_dir, enabled=world.is_main, tensorboard=cfg.train.tensorboard,
                                total_steps=cfg.train.steps)
        try:
            # fit() turns SIGTERM / SIGUSR1 into a save at the next step boundary, then stopped=True (exit 75)
            trainer = Trainer(cfg, engine=engine, loader=loader, world=world, metrics=metrics, flops_per_token=flops,
                              checkpoints=manager, resume_from=resume_from, no_resume=no_resume)
            summary = trainer.fit()
        except Exception as e:
            monitor.settle(e)  # a collective that failed because a rank vanished: exit 76 naming it
            raise
        finally:
            metrics.close()
            loader.close()
        if final_weights and not summary["stopped"]:
            save_final_weights(engine, run_dir, is_main=world.is_main)
        summary["rank"] = world.rank
        monitor.stop()
        return summary
    finally:
        monitor.stop()
        ldist.shutdown()
