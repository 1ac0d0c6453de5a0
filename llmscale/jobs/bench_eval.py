"""``llmscale bench eval [--output FILE]``: perplexity-scoring throughput of the eval job against training steps
of the same model in the same run, on 1 and 2 CPU processes, as JSON (:func:`llmscale.bench.eval.run`)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default=None, help="Write the JSON here too (it is always printed).")
    p.add_argument("--steps", type=int, default=20, help="Measured training steps and eval calls per process count.")
    p.add_argument("--warmup", type=int, default=3, help="Unmeasured rounds first (at least 1).")
    p.add_argument("--nproc", nargs="+", type=int, default=[1, 2], help="Process counts (default: 1 2).")
    p.add_argument("--micro-batch", type=int, default=8, help="Windows per rank per step, both sides (default: 8).")
    p.add_argument("--seq-len", type=int, default=128, help="Tokens per window (default: 128).")
    p.add_argument("--preset", default="gpt-tiny", help="Model preset (default: gpt-tiny).")
    p.add_argument("--target", type=float, default=2.0,
                   help="Eval tokens/s over training tokens/s to report as met (default: 2.0).")


def main(args: argparse.Namespace) -> int:
    from llmscale.bench.eval import run
    from llmscale.errors import ConfigError
    from llmscale.files import json_report

    if args.micro_batch < 1 or args.steps < 1 or args.warmup < 1 or any(n < 1 for n in args.nproc):
        raise ConfigError("--micro-batch, --steps, --warmup and --nproc must all be >= 1.")
    report = run(nprocs=list(args.nproc), steps=args.steps, warmup=args.warmup, micro_batch_size=args.micro_batch,
                 seq_len=args.seq_len, preset=args.preset, target=args.target)
    print(json_report(report, args.output))
    return 0
