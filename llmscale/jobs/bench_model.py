"""``llmscale bench model [--output FILE]``: forward+backward throughput (tokens/s, TFLOP/s, MFU on a GPU) of
model presets on this machine, as JSON (:func:`llmscale.bench.model.run`)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default=None, help="Write the JSON here too (it is always printed).")
    p.add_argument("--presets", nargs="+", default=None,
                   help="Presets to run (default: GPU gpt2-124m gpt2-350m llama-1b; CPU the tiny presets + gpt2-124m).")
    p.add_argument("--seq-len", type=int, default=None, help="Sequence length for every preset (default: per preset).")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="Micro-batch size for every preset (default: per preset).")
    p.add_argument("--steps", type=int, default=None,
                   help="Timed steps per preset, the median is reported (default: GPU 10, CPU 3).")
    p.add_argument("--warmup", type=int, default=None, help="Untimed steps first (default: GPU 3, CPU 1).")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on GPU, fp32 on CPU.")
    p.add_argument("--sdpa", choices=["flash", "auto"], default="flash",
                   help="GPU attention kernel: flash only, or let PyTorch choose.")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first.")
    p.add_argument("--activation-checkpointing", action="store_true", help="Recompute block activations in backward.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    p.add_argument("--peak-tflops", type=float, default=None, help="Peak TFLOP/s for MFU (default: table by GPU name).")


def main(args: argparse.Namespace) -> int:
    from llmscale.bench.model import run
    from llmscale.files import json_report

    res = run(presets=args.presets, seq_len=args.seq_len, batch=args.micro_batch, steps=args.steps, warmup=args.warmup,
              device=args.device, dtype=args.dtype, sdpa=args.sdpa, compile=args.compile,
              activation_checkpointing=args.activation_checkpointing, peak_tflops_override=args.peak_tflops,
              threads=args.threads)
    print(json_report(res, args.output))
    return 0
