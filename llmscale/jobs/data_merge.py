"""``llmscale data merge OUTPUT [--overwrite]``: join the parts that ``llmscale prepare ... --output OUTPUT --part
I/N`` wrote to OUTPUT.parts/ into the dataset OUTPUT, with one manifest (:func:`llmscale.data.prepare.merge_parts`).
The merged dataset holds the documents and tokens of a one-process ``prepare`` of the same inputs, in the same
order. Prints the merged dataset's counts as JSON."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="The dataset to write; its parts are in OUTPUT.parts/.")
    p.add_argument("--overwrite", action="store_true", help="Replace a complete dataset already at OUTPUT.")


def main(args: argparse.Namespace) -> int:
    from llmscale.data.prepare import merge_parts

    m = merge_parts(args.output, overwrite=args.overwrite)
    d = m.data
    print(json.dumps({
        "output": str(m.root),
        "parts": (d.get("merged_from") or {}).get("parts"),
        "train": {k: d["splits"]["train"][k] for k in ("num_documents", "num_tokens", "num_bytes")},
        "val": {k: d["splits"]["val"][k] for k in ("num_documents", "num_tokens", "num_bytes")},
        "stats": {k: d["stats"][k] for k in ("documents_read", "documents_written", "documents_skipped",
                                              "skipped_reasons")},
    }, indent=2, ensure_ascii=False))
    return 0
