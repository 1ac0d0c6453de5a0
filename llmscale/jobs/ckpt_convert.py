"""``llmscale ckpt convert CHECKPOINT``: add DeepSpeed's universal (layout-free) form to a checkpoint.

Resuming on a different data-, tensor- or pipeline-parallel layout does this automatically; run it ahead
of time to keep the conversion off the critical path of a restart. The result is CHECKPOINT/universal/,
listed (with checksums) in the checkpoint's manifest."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint",
                   help="A checkpoint folder (RUN_DIR/checkpoints/step-NNNNNN) or a run directory (its newest).")
    p.add_argument("--workers", type=int, default=1, help="DeepSpeed extraction/merge worker processes.")


def main(args: argparse.Namespace) -> int:
    from llmscale.checkpoint import MANIFEST, CheckpointError, convert_to_universal, list_checkpoints

    p = Path(args.checkpoint)
    if not (p / MANIFEST).exists():
        done = [i for i in list_checkpoints(p) if i.complete]
        if not done:
            raise CheckpointError(f"{p} is not a checkpoint and holds none (`llmscale ckpt list {p}`).")
        p = done[-1].path
    out = convert_to_universal(p, workers=args.workers)
    print(out)
    return 0
