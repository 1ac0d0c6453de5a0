"""``llmscale prepare``: raw text -> tokenized, sharded Arrow dataset (:func:`llmscale.data.prepare.prepare_dataset`);
prints the dataset's counts as JSON."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmscale.data.prepare import FORMATS
    from llmscale.data.sources import DEFAULT_DOC_CHARS, DEFAULT_MAX_DOC_CHARS, DOC_SPLITS
    from llmscale.data.tokenizer import MODEL_TYPES

    p.add_argument("--input", nargs="+", required=True,
                   help="Files, folders (recursive) or globs: .txt, .jsonl/.json, .parquet, .csv/.tsv, optionally .gz.")
    p.add_argument("--output", required=True,
                   help="Dataset folder to create (written via DIR.tmp-<pid>, manifest last).")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tokenizer", default=None, help="Tokenizer folder from `llmscale tokenizer train`.")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="Train a tokenizer of this size into DIR/tokenizer first.")
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe",
                   help="Kind of tokenizer to train (with --vocab-size).")
    p.add_argument("--character-coverage", type=float, default=None,
                   help="With --vocab-size: fraction of characters with their own piece (default 0.9995; rarer ones "
                        "use bytes).")
    p.add_argument("--format", choices=FORMATS, default="gpt",
                   help="gpt: documents end with eos; bert: sentence lengths for MLM/NSP.")
    p.add_argument("--seq-len", type=int, default=512,
                   help="Training sequence length (checked: the corpus must hold one).")
    p.add_argument("--val-fraction", type=float, default=0.005, help="Fraction of documents in the validation split.")
    p.add_argument("--num-proc", type=int, default=None, help="Tokenizer threads (default: all CPUs of this process).")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="Tokens per shard file.")
    p.add_argument("--text-field", default="text",
                   help="Field of json/parquet/csv records holding the text (dotted path ok; list of strings joined "
                        "by newlines).")
    p.add_argument("--doc-split", choices=DOC_SPLITS, default="chunk",
                   help=".txt documents: chunk (blank-line paragraphs grouped to --doc-chars), file, paragraph, line.")
    p.add_argument("--doc-chars", type=int, default=DEFAULT_DOC_CHARS,
                   help="Target document size for --doc-split chunk.")
    p.add_argument("--max-doc-chars", type=int, default=DEFAULT_MAX_DOC_CHARS,
                   help="Longer documents are cut into pieces (bounded memory).")
    p.add_argument("--seed", type=int, default=1234,
                   help="Seed of the train/validation split (and tokenizer sampling).")
    p.add_argument("--overwrite", action="store_true", help="Replace a complete dataset already at --output.")
    p.add_argument("--reuse", action="store_true",
                   help="If --output already holds a complete dataset of the same inputs and settings, keep it and "
                        "exit 0 (a re-run pipeline step does not redo the work).")
    p.add_argument("--part", default=None, metavar="I/N",
                   help="Tokenize only the I-th of N ranges of the input files (0 <= I < N, balanced by bytes) into "
                        "OUTPUT.parts/; needs --tokenizer. `llmscale data merge OUTPUT` joins the N parts "
                        "(slurm/prepare.sbatch as an array job does both).")


def main(args: argparse.Namespace) -> int:
    from llmscale.data.prepare import PrepareError, prepare_dataset

    part = None
    if args.part is not None:
        try:
            i, n = (int(x) for x in args.part.split("/"))
        except ValueError:
            raise PrepareError(f"--part {args.part!r}: give I/N, e.g. --part 0/3.") from None
        part = (i, n)
    m = prepare_dataset(
        args.input, args.output, tokenizer=args.tokenizer, vocab_size=args.vocab_size, model_type=args.model_type,
        character_coverage=args.character_coverage, format=args.format, seq_len=args.seq_len,
        val_fraction=args.val_fraction, num_proc=args.num_proc,
        shard_tokens=args.shard_tokens, text_field=args.text_field, seed=args.seed, doc_split=args.doc_split,
        doc_chars=args.doc_chars, max_doc_chars=args.max_doc_chars, overwrite=args.overwrite,
        part=part, reuse=args.reuse,
    )
    d = m.data
    print(json.dumps({
        "output": str(m.root),
        "kind": d["kind"],
        "tokenizer_hash": d["tokenizer"]["hash"],
        "vocab_size": d["tokenizer"]["vocab_size"],
        "train": {k: d["splits"]["train"][k] for k in ("num_documents", "num_tokens", "num_bytes")},
        "val": {k: d["splits"]["val"][k] for k in ("num_documents", "num_tokens", "num_bytes")},
        "stats": {k: d["stats"][k]
                  for k in ("documents_read", "documents_written", "documents_skipped", "skipped_reasons")},
    }, indent=2, ensure_ascii=False))
    return 0
