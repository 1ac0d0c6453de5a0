"""``llmscale data verify DIR``: check every shard against the manifest (presence, size, sha256).

Exit status 0 when the dataset is sound, 1 with the problems listed otherwise (a folder without a
manifest is reported as incomplete). ``--quick`` checks sizes only.
"""
from __future__ import annotations

import sys

from llmscale.data.shards import DatasetError, read_manifest, verify_dataset


def add_arguments(p) -> None:
    p.add_argument("path", help="Dataset folder written by `llmscale prepare`.")
    p.add_argument("--quick", action="store_true", help="Check presence and sizes only, not the sha256 checksums.")


def main(args) -> int:
    try:
        m = read_manifest(args.path)
        problems = verify_dataset(args.path, checksums=not args.quick)
    except DatasetError as e:
        print(f"{args.path}: NOT OK\n  - {e}", file=sys.stderr)
        return 1
    nshards = sum(len(m.shards(s)) for s in m.data["splits"])
    if problems:
        print(f"{args.path}: {len(problems)} problem(s) in {nshards} shards", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        print(f"Re-run `llmscale prepare ... --output {args.path} --overwrite` to rebuild the dataset.", file=sys.stderr)
        return 1
    what = "sizes" if args.quick else "sizes and sha256 checksums"
    print(f"{args.path}: OK ({nshards} shards, {what} match the manifest)")
    return 0
