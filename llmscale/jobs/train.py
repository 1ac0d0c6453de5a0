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
``RUN_DIR/final/model.pt`` (see :func:`load_final_model`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from llmscale.config import RunConfig, load_config, save_resolved
from llmscale.log import get_logger

log = get_logger(__name__)

CONFIG_FILE = "config.yaml"
FINAL_DIR = "final"
FINAL_WEIGHTS = "model.pt"
RUN_TOKENIZER = "tokenizer"


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


# --------------------------------------------------------------------------- tokenizer / vocab checks


def _read_meta(tok_dir: Path) -> dict:
    meta = tok_dir / "tokenizer_meta.json"
    if not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}


def check_data(cfg: RunConfig) -> list:
    """Read every dataset's manifest and check tokenizers before any work; fill ``model.vocab_size``.

    Raises DatasetError / TokenizerError whose message names both sides and the command that fixes it."""
    from llmscale.data.shards import DatasetError, read_manifest
    from llmscale.data.tokenizer import TokenizerError

    entries = cfg.data.sources()
    if not entries:
        raise DatasetError("No dataset given: set data.path (or data.blend) to a folder written by `llmscale prepare`, "
                           "e.g. `llmscale train CONFIG data.path=data/mycorpus`.")
    manifests = [read_manifest(e.path) for e in entries]
    for e, m in zip(entries, manifests):
        if m.kind != cfg.data.format:
            raise DatasetError(
                f"{e.path} was prepared with --format {m.kind}, but data.format={cfg.data.format}. Re-run "
                f"`llmscale prepare --format {cfg.data.format} --input ... --output {e.path}-{cfg.data.format}` "
                f"(or use a {cfg.data.format.upper()} dataset).")
    first, m0 = entries[0], manifests[0]
    for e, m in zip(entries[1:], manifests[1:]):
        if m.tokenizer_hash != m0.tokenizer_hash or m.vocab_size != m0.vocab_size:
            raise TokenizerError(
                f"The blend mixes tokenizers: {first.path} has tokenizer {m0.tokenizer_hash[:12]} (vocab {m0.vocab_size}), "
                f"{e.path} has {m.tokenizer_hash[:12]} (vocab {m.vocab_size}); token ids would mean different things. "
                f"Re-prepare it with the first one's tokenizer: `llmscale prepare --tokenizer {m0.tokenizer_dir()} "
                f"--input ... --output {e.path}`.")
    vocab = m0.vocab_size
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size != vocab:
        raise TokenizerError(
            f"model.vocab_size={cfg.model.vocab_size} does not match the tokenizer of {first.path} (vocab {vocab}, hash "
            f"{m0.tokenizer_hash[:12]}). Set model.vocab_size={vocab} (or null: taken from the dataset), or prepare the "
            f"data with the model's tokenizer: `llmscale prepare --tokenizer TOKENIZER_DIR --input ... --output "
            f"{first.path}`.")
    run_tok = Path(cfg.run_dir) / RUN_TOKENIZER
    meta = _read_meta(run_tok)
    if meta and (meta.get("hash") != m0.tokenizer_hash or int(meta.get("vocab_size", vocab)) != vocab):
        raise TokenizerError(
            f"The run directory {cfg.run_dir} was trained with tokenizer {str(meta.get('hash'))[:12]} "
            f"(vocab {meta.get('vocab_size')}), but {first.path} was made with tokenizer {m0.tokenizer_hash[:12]} "
            f"(vocab {vocab}): resuming would feed the model ids it never learned. Re-prepare the data with the run's "
            f"tokenizer: `llmscale prepare --tokenizer {run_tok} --input ... --output {first.path}-retok`, "
            f"or train into a new run_dir=...")
    return manifests


def _record_tokenizer(manifest: Any, run_dir: Path) -> None:
    """Copy the dataset's tokenizer into RUN_DIR/tokenizer (atomically), for resume checks and sampling."""
    dst = run_dir / RUN_TOKENIZER
    if _read_meta(dst):
        return
    tmp = run_dir / f".{RUN_TOKENIZER}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(manifest.tokenizer_dir(), tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


# --------------------------------------------------------------------------- the job


def _world():
    from llmscale.dist import discover_world
    from llmscale.testing import free_port

    world = discover_world()
    if world.world_size == 1 and "MASTER_PORT" not in os.environ:
        # a lone process still gets a process group; a free port lets several such runs share a host
        world = dataclasses.replace(world, master_port=free_port())
    return world


def run(cfg: RunConfig, *, final_weights: bool = True, resume_from: str | None = None,
        no_resume: bool = False) -> dict:
    """Train per ``cfg`` in this process (one rank of the job). Returns the final counters and val metrics."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere
    from llmscale.log import setup_logging

    setup_logging(all_ranks=cfg.train.log_all_ranks)
    manifests = check_data(cfg)  # refuse mismatched data before any process group or model exists
    world = _world()

    from llmscale import dist as ldist
    from llmscale.checkpoint import CheckpointManager
    from llmscale.data.loader import build_loader
    from llmscale.data.tokenizer import Tokenizer
    from llmscale.engine import build_engine, check_layout, solve_batch
    from llmscale.metrics import MetricsLogger
    from llmscale.models import build_model
    from llmscale.signals import Preemption
    from llmscale.trainer import Trainer

    check_layout(cfg, world.world_size)
    plan = solve_batch(cfg.parallel, world_size=world.world_size, seq_len=cfg.data.seq_len)
    ldist.init_distributed(world)
    try:
        run_dir = Path(cfg.run_dir)
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            _record_tokenizer(manifests[0], run_dir)
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
            global_batch_size=plan.global_batch_size, micro_batch_size=plan.micro_batch_size,
            pad_id=tok.pad_id, mask_id=tok.mask_id, cls_id=tok.cls_id, sep_id=tok.sep_id,
            vocab_size=cfg.model.vocab_size, shuffle=True,
        )
        manager = CheckpointManager(cfg, world=world)
        preemption = Preemption()  # SIGTERM / SIGUSR1 -> save at the next step boundary, exit 75 (requeue)
        metrics = MetricsLogger(run_dir, enabled=world.is_main, tensorboard=cfg.train.tensorboard,
                                total_steps=cfg.train.steps)
        try:
            trainer = Trainer(cfg, engine=engine, loader=loader, world=world, metrics=metrics, flops_per_token=flops,
                              checkpoints=manager, should_stop=preemption.should_stop, resume_from=resume_from,
                              no_resume=no_resume)
            summary = trainer.fit()
        finally:
            preemption.uninstall()
            metrics.close()
            loader.close()
        if final_weights and not summary["stopped"]:
            state = engine.full_state_dict()  # collective; the weights land on rank 0
            if world.is_main:
                out = run_dir / FINAL_DIR
                out.mkdir(parents=True, exist_ok=True)
                tmp = out / f".{FINAL_WEIGHTS}.tmp"
                torch.save(state, tmp)
                os.replace(tmp, out / FINAL_WEIGHTS)
                log.info("final weights written to %s", out / FINAL_WEIGHTS)
        summary["rank"] = world.rank
        return summary
    finally:
        ldist.shutdown()


def load_final_model(run_dir: str | Path, *, device: str = "cpu"):
    """``(model, tokenizer, cfg)`` from a finished run: RUN_DIR/config.yaml + RUN_DIR/final/model.pt, in eval mode."""
    import torch

    from llmscale.config import from_dict, read_yaml
    from llmscale.data.tokenizer import Tokenizer
    from llmscale.models import build_model

    run_dir = Path(run_dir)
    weights = run_dir / FINAL_DIR / FINAL_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist: the run did not finish (or ran with --no-final-weights). "
                                f"Re-run `llmscale train {run_dir / CONFIG_FILE}` to finish it.")
    cfg = from_dict(RunConfig, read_yaml(run_dir / CONFIG_FILE))
    model = build_model(cfg.model, vocab_size=cfg.model.vocab_size)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.to(device).eval()
    return model, Tokenizer.load(run_dir / RUN_TOKENIZER), cfg

