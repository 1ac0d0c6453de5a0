"""``llmscale data inspect DIR``: what a dataset holds, in a few lines (or ``--json``).

Counts per split, shards, documents read / written / skipped with the reasons, the tokenizer, and the
decoded text of the first document(s) of the train split (:func:`llmscale.data.inspect.inspect_dataset`).
"""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="Dataset folder written by `llmscale prepare`.")
    p.add_argument("--samples", type=int, default=1,
                   help="Decoded documents to show from the start of the train split.")
    p.add_argument("--max-chars", type=int, default=500, help="Characters shown per document.")
    p.add_argument("--json", action="store_true", help="Print JSON instead of text.")


def _print_human(info: dict) -> None:
    st = info["stats"]
    tk = info["tokenizer"]
    print(f"dataset   {info['path']}  ({info['kind']}, schema v{info['schema_version']}, seq_len {info['seq_len']}, "
          f"{info['token_dtype']})")
    print(f"tokenizer {tk.get('model_type', '?')} vocab {tk['vocab_size']}  hash {tk['hash']}")
    for split, sp in info["splits"].items():
        print(f"{split:<9} {sp['num_documents']:>10,} documents {sp['num_tokens']:>14,} tokens "
              f"{sp['num_bytes']:>14,} bytes  ({sp['bytes_per_token']} bytes/token, {len(sp['shards'])} shards)")
        for s in sp["shards"][:8]:
            print(f"          {s['path']}: {s['num_documents']:,} docs, {s['num_tokens']:,} tokens, {s['bytes']:,} B")
        if len(sp["shards"]) > 8:
            print(f"          ... {len(sp['shards']) - 8} more")
    print(f"documents read {st.get('documents_read', '?'):,}, written {st.get('documents_written', '?'):,}, "
          f"skipped {st.get('documents_skipped', '?'):,}")
    for reason, n in sorted(st.get("skipped_reasons", {}).items(), key=lambda kv: -kv[1]):
        print(f"  skipped {n:,}: {reason}")
    for reason, n in sorted(st.get("documents_repaired", {}).items(), key=lambda kv: -kv[1]):
        print(f"  repaired {n:,}: {reason}")
    if st.get("documents_split"):
        print(f"  {st['documents_split']:,} documents longer than max_doc_chars were cut into pieces")
    if "warning" in info:
        print("WARNING:", info["warning"])
    for ex in info["samples"]:
        print(f"--- {ex['shard']} document {ex['document']} ({ex['num_tokens']:,} tokens), first ids {ex['first_ids']}")
        if "sentence_lengths" in ex:
            print(f"    sentence lengths {ex['sentence_lengths']}")
        print(ex["text"])


def main(args: argparse.Namespace) -> int:
    from llmscale.data.inspect import inspect_dataset

    info = inspect_dataset(args.path, samples=args.samples, max_chars=args.max_chars)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        _print_human(info)
    return 0
