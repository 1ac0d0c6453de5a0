"""``llmscale bench finetune [--output FILE]``: fine-tuning throughput (BERT classification, GPT SFT with
dynamic padding and packing) against pretraining of the same models, on 1 and 2 CPU processes, as JSON
(:func:`llmscale.bench.finetune.run`)."""
from __future__ import annotations

import argparse


def _split(values: list[str]) -> list[str]:
    """``a b``, ``a,b`` and ``a,b c`` all mean [a, b, c]."""
    return [v for item in values for v in item.split(",") if v]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default=None, help="Write the JSON here too (it is always printed).")
    p.add_argument("--steps", type=int, default=10, help="Measured optimizer steps per engine and process count.")
    p.add_argument("--warmup", type=int, default=3, help="Unmeasured steps first (at least 1).")
    p.add_argument("--nproc", nargs="+", default=["1", "2"], help="Process counts (default: 1 2).")
    p.add_argument("--micro-batch", type=int, default=16, help="Rows per rank per step, both sides (default: 16).")
    p.add_argument("--target", type=float, default=0.80,
                   help="Fine-tune real tokens/s over pretraining tokens/s to report as met (default: 0.80).")


def main(args: argparse.Namespace) -> int:
    from llmscale.bench.finetune import run
    from llmscale.errors import ConfigError
    from llmscale.files import json_report

    try:
        nprocs = [int(n) for n in _split(args.nproc)]
    except ValueError:
        raise ConfigError(f"--nproc takes process counts, e.g. --nproc 1 2; got {' '.join(args.nproc)}.") from None
    if args.micro_batch < 1:
        raise ConfigError(f"--micro-batch must be >= 1, got {args.micro_batch}.")
    report = run(nprocs=nprocs, steps=args.steps, warmup=args.warmup, micro_batch_size=args.micro_batch,
                 target=args.target)
    print(json_report(report, args.output))
    return 0
