"""``llmscale bench ckpt [--output FILE] [--size-mb N] [--workdir DIR]``: checkpoint save/load throughput beside
the raw sequential write/read speed of the same disk, measured in the same run, as JSON
(:func:`llmscale.bench.ckpt.run`)."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default=None, help="Write the JSON here too (it is always printed).")
    p.add_argument("--size-mb", type=int, default=256, help="fp32 parameter bytes of the benchmark model (MB).")
    p.add_argument("--workdir", default=None,
                   help="Folder on the disk to measure (default: ./runs); the benchmark's files go to a temporary "
                        "folder inside it, removed afterwards unless --keep.")
    p.add_argument("--keep", action="store_true", help="Keep the benchmark files afterwards.")
    # the child process timed for "launch to first resumed step"
    p.add_argument("--resume-probe", help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    from llmscale.bench.ckpt import probe, run
    from llmscale.files import json_report

    if args.resume_probe:
        print(json.dumps(probe(args.resume_probe, args.size_mb)), flush=True)
        return 0
    print(json_report(run(size_mb=args.size_mb, workdir=args.workdir, keep=args.keep), args.output))
    return 0
