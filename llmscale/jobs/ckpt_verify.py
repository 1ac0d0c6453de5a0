"""``llmscale ckpt verify PATH``: check every file of a checkpoint against its manifest (size + sha256).

PATH is a checkpoint folder, or a run directory / checkpoints folder (then every checkpoint is checked).
Exit status 0 when all are intact, 1 otherwise (the damaged files are named)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="A checkpoint folder (step-NNNNNN), or a run directory to verify all of them.")
    p.add_argument("--no-checksums", action="store_true", help="Check presence and sizes only (fast).")


def main(args: argparse.Namespace) -> int:
    from llmscale.checkpoint import MANIFEST, CheckpointError, list_checkpoints, verify_checkpoint

    p = Path(args.path)
    targets = [p] if (p / MANIFEST).exists() or p.name.startswith("step-") else [i.path for i in list_checkpoints(p)]
    if not targets:
        raise CheckpointError(f"{p} holds no checkpoint (`llmscale ckpt list {p}` shows what is there).")
    bad = 0
    for t in targets:
        problems = verify_checkpoint(t, checksums=not args.no_checksums)
        if problems:
            bad += 1
            print(f"DAMAGED  {t}")
            for pr in problems:
                print(f"  - {pr}")
        else:
            print(f"ok       {t}")
    return 1 if bad else 0
