"""``llmscale report RUN_DIR [RUN_DIR ...] --output PNG``: several runs' loss curves on the same axes.

    llmscale report runs/gpt_gutenberg runs/lstm_gutenberg --x time --output docs/lm.png
    llmscale report runs/sst2_bert_s1 runs/sst2_scratch_s1 --metric accuracy --label pretrained --label scratch

``--x step|tokens|time`` (wall minutes of training); ``--metric`` is the validation record's field to draw
(``val_loss`` by default; a classification fine-tune also has ``accuracy``, ``f1``, ``mcc``, ...). Prints one JSON line
per run with its last figures (:func:`llmscale.plots.compare_runs`).
"""
from __future__ import annotations

import argparse
import json
import sys

from llmscale.errors import PlotError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmscale.plots import X_AXES

    p.add_argument("run_dirs", nargs="+", help="Run directories (pretraining or fine-tune; each holds metrics.jsonl).")
    p.add_argument("--output", required=True, help="PNG to write.")
    p.add_argument("--x", choices=X_AXES, default="step", help="Horizontal axis (default step).")
    p.add_argument("--metric", default="val_loss", help="Validation field to draw (default val_loss).")
    p.add_argument("--label", action="append", default=None, help="Legend name of each run, in order (repeat).")
    p.add_argument("--title", default=None, help="Title of the figure.")
    p.add_argument("--no-train", action="store_true", help="Leave out the train-loss lines.")


def main(args: argparse.Namespace) -> int:
    from llmscale.plots import compare_runs

    try:
        out, rows = compare_runs(args.run_dirs, args.output, x=args.x, metric=args.metric, labels=args.label,
                                 title=args.title, train=not args.no_train)
    except PlotError as e:
        print(f"llmscale report: error: {e}", file=sys.stderr)
        return 1
    for row in rows:
        print(json.dumps(row))
    print(out)
    return 0
