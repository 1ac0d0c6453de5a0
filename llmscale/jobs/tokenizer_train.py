"""``llmscale tokenizer train``: a lossless SentencePiece tokenizer trained on local text
(:func:`llmscale.data.tokenizer.train_tokenizer`); prints the folder, vocabulary size, type and hash as JSON."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmscale.data.sources import DOC_SPLITS
    from llmscale.data.tokenizer import DEFAULT_SAMPLE_BYTES, MODEL_TYPES

    p.add_argument("--input", nargs="+", required=True,
                   help="Files, folders or globs (txt, jsonl/json, parquet, csv/tsv; .gz ok).")
    p.add_argument("--output", required=True, help="Folder for tokenizer.model, tokenizer.vocab, tokenizer_meta.json.")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="Total pieces incl. 7 special + 256 byte pieces (required for bpe/unigram; char: optional).")
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    p.add_argument("--character-coverage", type=float, default=None,
                   help="Fraction of characters that get their own piece (default 0.9995; char: 1.0). The rest use "
                        "bytes.")
    p.add_argument("--sample-bytes", type=int, default=DEFAULT_SAMPLE_BYTES,
                   help="Train on a sample of about this many bytes.")
    p.add_argument("--text-field", default="text", help="Field of json/parquet/csv records holding the text.")
    p.add_argument("--doc-split", default="chunk", choices=DOC_SPLITS, help="How .txt files are cut into documents.")
    p.add_argument("--seed", type=int, default=1234)


def main(args: argparse.Namespace) -> int:
    from llmscale.data.tokenizer import train_tokenizer

    tok = train_tokenizer(args.input, args.output, vocab_size=args.vocab_size, model_type=args.model_type,
                          sample_bytes=args.sample_bytes, character_coverage=args.character_coverage,
                          text_field=args.text_field, doc_split=args.doc_split, seed=args.seed)
    print(json.dumps({"output": str(args.output), "vocab_size": tok.vocab_size, "model_type": tok.model_type,
                      "hash": tok.hash}, indent=2))
    return 0
