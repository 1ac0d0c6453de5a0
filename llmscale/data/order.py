"""`llmscale data order`: which sample ids every data-parallel rank reads at every step, as JSON.

    llmscale data order DIR --world-size 4 --global-batch 16 --steps 2 --start-step 10

prints ``{"steps": [{"step": 10, "ranks": [[ids of rank 0], [ids of rank 1], ...]}, ...]}``. The ids
are the loader's sample ids (GPT: window index in the split; BERT: segment-pair index). Running it
with another ``--world-size`` shows the same global sequence, cut differently.
"""
from __future__ import annotations

import json
import sys

from llmscale.config import DataConfig


def add_arguments(p) -> None:
    p.add_argument("dir", help="Dataset folder written by `llmscale prepare`.")
    p.add_argument("--world-size", type=int, required=True, help="Data-parallel ranks.")
    p.add_argument("--global-batch", type=int, required=True, help="Samples per optimizer step over all ranks.")
    p.add_argument("--steps", type=int, required=True, help="How many steps to print.")
    p.add_argument("--start-step", type=int, default=0, help="First step to print.")
    p.add_argument("--seed", type=int, default=DataConfig.seed, help="data.seed of the run.")
    p.add_argument("--seq-len", type=int, default=DataConfig.seq_len, help="data.seq_len of the run.")
    p.add_argument("--split", choices=("train", "val"), default="train", help="Split to read.")
    p.add_argument("--no-shuffle", action="store_true", help="The order without shuffling.")


def main(args) -> int:
    from llmscale.errors import ConfigError
    from llmscale.data.loader import build_loader
    from llmscale.data.shards import read_manifest

    if args.world_size < 1 or args.global_batch < 1 or args.steps < 0 or args.start_step < 0:
        raise ConfigError("--world-size and --global-batch must be >= 1, --steps and --start-step >= 0.")
    if args.global_batch % args.world_size:
        raise ConfigError(
            f"--global-batch {args.global_batch} is not divisible by --world-size {args.world_size}; use a multiple "
            f"of {args.world_size} such as {max(1, args.global_batch // args.world_size) * args.world_size}.")
    kind = read_manifest(args.dir).kind
    cfg = DataConfig(path=args.dir, format=kind, seq_len=args.seq_len, seed=args.seed)
    cfg.validate()
    loader = build_loader(
        cfg, split=args.split, dp_rank=0, dp_size=args.world_size, global_batch_size=args.global_batch,
        micro_batch_size=args.global_batch // args.world_size, shuffle=not args.no_shuffle,
    )
    steps = []
    for step in range(args.start_step, args.start_step + args.steps):
        ids = loader.global_sample_ids(step)
        per = args.global_batch // args.world_size
        steps.append({"step": step, "ranks": [ids[r * per : (r + 1) * per].tolist() for r in range(args.world_size)]})
    sys.stdout.write(json.dumps({"steps": steps}) + "\n")
    return 0
