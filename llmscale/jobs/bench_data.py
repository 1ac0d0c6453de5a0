"""``llmscale bench data [--output FILE]``: prepare and the loader against the raw limits of the same machine,
as JSON (:func:`llmscale.bench.data.run`)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default=None, help="Write the JSON here too (it is always printed).")
    p.add_argument("--input", nargs="+", default=None,
                   help="Text to prepare (default: the bundled corpus replicated to --target-mb), e.g. "
                        "../shared/data/gutenberg_top_authors_subset.")
    p.add_argument("--num-proc", type=int, default=None,
                   help="Tokenizer threads for prepare and the raw encode (default: all CPUs).")
    p.add_argument("--target-mb", type=float, default=24.0, help="Size of the replicated bundled corpus.")
    p.add_argument("--vocab-size", type=int, default=8000, help="Tokenizer trained for the benchmark.")
    p.add_argument("--seq-len", type=int, default=1024, help="Loader sequence length.")
    p.add_argument("--micro-batch", type=int, default=8, help="Loader micro-batch size.")
    p.add_argument("--global-batch", type=int, default=64, help="Loader global batch size (one process).")
    p.add_argument("--rounds", type=int, default=3,
                   help="Timing rounds of prepare and the raw encode (the best is reported).")
    p.add_argument("--loader-rounds", type=int, default=10,
                   help="Timing rounds of the loader and of the raw read, each over the whole train split "
                        "(the best is reported).")
    p.add_argument("--num-workers", type=int, default=1,
                   help="Also time the loader with this many prefetch threads (0 = skip).")
    p.add_argument("--workdir", default=None,
                   help="Folder for the corpus copy and datasets (default: a temp dir); removed afterwards unless "
                        "--keep.")
    p.add_argument("--keep", action="store_true", help="Keep the benchmark files (--workdir) afterwards.")


def main(args: argparse.Namespace) -> int:
    from llmscale.bench.data import run
    from llmscale.files import json_report

    res = run(inputs=args.input, num_proc=args.num_proc, target_mb=args.target_mb, vocab_size=args.vocab_size,
              seq_len=args.seq_len, micro_batch=args.micro_batch, global_batch=args.global_batch,
              rounds=args.rounds, loader_rounds=args.loader_rounds, num_workers=args.num_workers, workdir=args.workdir,
              keep=args.keep)
    print(json_report(res, args.output))
    return 0
