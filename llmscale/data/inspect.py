"""``llmscale data inspect DIR``: what a dataset holds, in a few lines.

Counts per split, shards, documents read / written / skipped with the reasons, the tokenizer, and
the decoded text of the first document(s) of the train split, so one can see the tokens round-trip.
"""
from __future__ import annotations

import json
from pathlib import Path

from llmscale.data.shards import open_shard, read_manifest


def inspect_dataset(root: str | Path, *, samples: int = 1, max_chars: int = 500) -> dict:
    """A JSON-friendly summary of the dataset at ``root`` with ``samples`` decoded documents."""
    from llmscale.data.tokenizer import Tokenizer

    m = read_manifest(root)
    d = m.data
    out = {
        "path": str(m.root),
        "kind": d["kind"],
        "schema_version": d.get("schema_version"),
        "tokenizer": d["tokenizer"],
        "token_dtype": d["token_dtype"],
        "seq_len": d.get("seq_len"),
        "eos_appended": d.get("eos_appended"),
        "splits": {},
        "stats": d.get("stats", {}),
    }
    for split, sp in d["splits"].items():
        ntok, nbytes = sp["num_tokens"], sp.get("num_bytes", 0)
        out["splits"][split] = {
            "num_documents": sp["num_documents"],
            "num_tokens": ntok,
            "num_bytes": nbytes,
            "bytes_per_token": round(nbytes / ntok, 3) if ntok else None,
            "shards": [{"path": s["path"], "num_documents": s["num_documents"], "num_tokens": s["num_tokens"],
                        "bytes": s["bytes"]} for s in sp["shards"]],
        }
    shards = m.shards("train") or m.shards("val")
    examples = []
    if samples > 0 and shards:
        tok = Tokenizer.load(m.tokenizer_dir())
        if tok.hash != m.tokenizer_hash:
            out["warning"] = (f"{m.tokenizer_dir()} has hash {tok.hash}, the manifest says {m.tokenizer_hash}: "
                              f"the tokenizer copy was changed; decoded text may be wrong.")
        view = open_shard(m.root / shards[0].path)
        for i in range(min(samples, view.num_documents)):
            ids = view.document(i)
            ex = {"shard": shards[0].path, "document": i, "num_tokens": int(ids.size),
                  "first_ids": [int(x) for x in ids[:16]], "text": tok.decode(ids[:4 * max_chars])[:max_chars]}
            if view.sentence_offsets is not None:
                ex["sentence_lengths"] = [int(x) for x in
                                          view.sentence_lengths[view.sentence_offsets[i]: view.sentence_offsets[i + 1]][:32]]
            examples.append(ex)
    out["samples"] = examples
    return out


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


def add_arguments(p) -> None:
    p.add_argument("path", help="Dataset folder written by `llmscale prepare`.")
    p.add_argument("--samples", type=int, default=1, help="Decoded documents to show from the start of the train split.")
    p.add_argument("--max-chars", type=int, default=500, help="Characters shown per document.")
    p.add_argument("--json", action="store_true", help="Print JSON instead of text.")


def main(args) -> int:
    info = inspect_dataset(args.path, samples=args.samples, max_chars=args.max_chars)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        _print_human(info)
    return 0
