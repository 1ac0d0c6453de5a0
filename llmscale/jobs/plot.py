"""``llmscale plot RUN_DIR [--output PNG]``: the run's train and validation loss curves, from
RUN_DIR/metrics.jsonl, drawn to a PNG (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from llmscale.artifacts import METRICS_FILE
from llmscale.errors import PlotError
from llmscale.log import get_logger
from llmscale.metrics import read_metrics

log = get_logger(__name__)




def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="A run directory written by `llmscale train` (holds metrics.jsonl).")
    p.add_argument("--output", default=None, help="PNG to write (default RUN_DIR/loss.png).")


def plot_run(run_dir: str | Path, output: Optional[str | Path] = None) -> Path:
    """Draw train loss (per logged step) and validation loss against the step; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    # A resumed run appends: a later record for the same step replaces the earlier one.
    train = {r["step"]: r["loss"] for r in records if r.get("kind") == "train" and r.get("loss") is not None}
    val = {r["step"]: r["val_loss"] for r in records if r.get("kind") == "val" and r.get("val_loss") is not None}
    if not train and not val:
        raise PlotError(f"{run_dir / METRICS_FILE} has no loss records yet (missing or empty). Train first: "
                        f"`llmscale train CONFIG run_dir={run_dir}`.")
    out = Path(output) if output else run_dir / "loss.png"
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    if train:
        steps = sorted(train)
        ax.plot(steps, [train[s] for s in steps], label="train loss", color="tab:blue", linewidth=1.2)
    if val:
        steps = sorted(val)
        ax.plot(steps, [val[s] for s in steps], label="validation loss", color="tab:orange", marker="o", linewidth=1.5)
        last = steps[-1]
        ax.annotate(f"{val[last]:.3f}", (last, val[last]), textcoords="offset points", xytext=(4, 6))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per target token)")
    ax.set_title(f"{run_dir.resolve().name}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(args: argparse.Namespace) -> int:
    try:
        out = plot_run(args.run_dir, args.output)
    except PlotError as e:
        print(f"llmscale plot: error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
