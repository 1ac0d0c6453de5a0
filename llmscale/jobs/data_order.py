"""``llmscale data order DIR``: which sample ids every data-parallel rank reads at every step, as JSON.

    llmscale data order DIR --world-size 4 --global-batch 16 --steps 2 --start-step 10

prints ``{"steps": [{"step": 10, "ranks": [[ids of rank 0], [ids of rank 1], ...]}, ...]}``, for GPT with
the windows' token ``"starts"`` too (:func:`llmscale.data.order.sample_order`). Running it with another
``--world-size`` shows the same
global sequence, cut differently.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmscale.config import DataConfig

    p.add_argument("path", help="Dataset folder written by `llmscale prepare`.")
    p.add_argument("--world-size", type=int, required=True, help="Data-parallel ranks.")
    p.add_argument("--global-batch", type=int, required=True, help="Samples per optimizer step over all ranks.")
    p.add_argument("--steps", type=int, required=True, help="How many steps to print.")
    p.add_argument("--start-step", type=int, default=0, help="First step to print.")
    p.add_argument("--seed", type=int, default=DataConfig.seed, help="data.seed of the run.")
    p.add_argument("--seq-len", type=int, default=DataConfig.seq_len, help="data.seq_len of the run.")
    p.add_argument("--split", choices=("train", "val"), default="train", help="Split to read.")
    p.add_argument("--no-shuffle", action="store_true", help="The order without shuffling.")
    p.add_argument("--window-offsets", choices=("fixed", "epoch", "window"), default=DataConfig.window_offsets,
                   help="GPT: the run's data.window_offsets (default %(default)s).")


def main(args: argparse.Namespace) -> int:
    from llmscale.data.order import sample_order

    order = sample_order(args.path, world_size=args.world_size, global_batch=args.global_batch, steps=args.steps,
                         start_step=args.start_step, seed=args.seed, seq_len=args.seq_len, split=args.split,
                         shuffle=not args.no_shuffle, window_offsets=args.window_offsets)
    sys.stdout.write(json.dumps(order) + "\n")
    return 0
