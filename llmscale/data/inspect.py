"""What a dataset holds (the library behind ``llmscale data inspect DIR``, :mod:`llmscale.jobs.data_inspect`).

Counts per split, shards, documents read / written / skipped with the reasons, the tokenizer, and
the decoded text of the first document(s) of the train split, so one can see the tokens round-trip.
"""
from __future__ import annotations

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
                                          view.sentence_lengths[view.sentence_offsets[i]:
                                                                view.sentence_offsets[i + 1]][:32]]
            examples.append(ex)
    out["samples"] = examples
    return out
