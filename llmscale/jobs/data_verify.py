"""``llmscale data verify DIR``: check every shard against the manifest (presence, size, sha256) with
:func:`llmscale.data.shards.verify_dataset`.

Exit status 0 when the dataset is sound, 1 with the problems listed otherwise (a folder without a
manifest is reported as incomplete). ``--no-checksums`` checks presence and sizes only (as ``llmscale
ckpt verify --no-checksums``).
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="Dataset folder written by `llmscale prepare`.")
    p.add_argument("--no-checksums", action="store_true",
                   help="Check presence and sizes only, not the sha256 checksums (fast).")


def main(args: argparse.Namespace) -> int:
    from llmscale.data.shards import DatasetError, read_manifest, verify_dataset

    try:
        m = read_manifest(args.path)
        problems = verify_dataset(args.path, checksums=not args.no_checksums)
    except DatasetError as e:
        print(f"{args.path}: NOT OK\n  - {e}", file=sys.stderr)
        return 1
    nshards = sum(len(m.shards(s)) for s in m.data["splits"])
    if problems:
        print(f"{args.path}: {len(problems)} problem(s) in {nshards} shards", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        print(f"Re-run `llmscale prepare ... --output {args.path} --overwrite` to rebuild the dataset.",
              file=sys.stderr)
        return 1
    what = "sizes" if args.no_checksums else "sizes and sha256 checksums"
    print(f"{args.path}: OK ({nshards} shards, {what} match the manifest)")
    return 0
