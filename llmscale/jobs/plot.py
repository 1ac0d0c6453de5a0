"""``llmscale plot RUN_DIR [--output PNG]``: the run's train and validation loss curves, from
RUN_DIR/metrics.jsonl, drawn to a PNG (:func:`llmscale.plots.plot_run`; several runs on one axis:
``llmscale report``)."""
from __future__ import annotations

import argparse
import sys

from llmscale.errors import PlotError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="A run directory written by `llmscale train` (holds metrics.jsonl).")
    p.add_argument("--output", default=None, help="PNG to write (default RUN_DIR/loss.png).")


def main(args: argparse.Namespace) -> int:
    from llmscale.plots import plot_run

    try:
        out = plot_run(args.run_dir, args.output)
    except PlotError as e:
        print(f"llmscale plot: error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
