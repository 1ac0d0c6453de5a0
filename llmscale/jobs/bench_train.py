"""``llmscale bench train [--output FILE]``: training-step throughput on DeepSpeed against plain PyTorch, and
MFU on a GPU, as JSON (:func:`llmscale.bench.train.run`)."""
from __future__ import annotations

import argparse


def _split(values: list[str]) -> list[str]:
    """``a b``, ``a,b`` and ``a,b c`` all mean [a, b, c]."""
    return [v for item in values for v in item.split(",") if v]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmscale.bench.train import CPU_PRESETS  # a light import: torch and deepspeed load in run()

    p.add_argument("--output", default=None, help="Write the JSON here too (it is always printed).")
    p.add_argument("--steps", type=int, default=30, help="Measured optimizer steps per configuration.")
    p.add_argument("--warmup", type=int, default=5, help="Unmeasured steps first.")
    p.add_argument("--presets", nargs="+", default=list(CPU_PRESETS), help="CPU presets to run (default: all of them).")
    p.add_argument("--nproc", nargs="+", default=["1", "2"], help="Process counts for the CPU runs (default: 1 2).")
    p.add_argument("--gpu-steps", type=int, default=20, help="Measured steps per GPU model.")
    p.add_argument("--skip-gpu", action="store_true", help="Leave out the GPU part even when a GPU is present.")


def main(args: argparse.Namespace) -> int:
    from llmscale.bench.train import run
    from llmscale.errors import ConfigError
    from llmscale.files import json_report

    try:
        nprocs = [int(n) for n in _split(args.nproc)]
    except ValueError:
        raise ConfigError(f"--nproc takes process counts, e.g. --nproc 1 2; got {' '.join(args.nproc)}.") from None
    report = run(presets=_split(args.presets), nprocs=nprocs, steps=args.steps, warmup=args.warmup,
                 gpu_steps=args.gpu_steps, skip_gpu=args.skip_gpu)
    print(json_report(report, args.output))
    return 0
