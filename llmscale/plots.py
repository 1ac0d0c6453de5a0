"""Loss curves from run directories' ``metrics.jsonl``, drawn to PNG with matplotlib's Agg backend (no display).

* :func:`plot_run`: one run, train loss per logged step and validation loss (``llmscale plot``).
* :func:`compare_runs`: several runs on the same axes (``llmscale report``), against the optimizer step,
  the tokens seen or the wall time, with one colour per run (train: line, validation: markers), and a
  table of each run's last figures returned beside the PNG.

Both read pretraining and fine-tune runs alike (the trainer writes the same records for both). A
resumed run appends to its file: a later record for the same step replaces the earlier one, and the
wall-time axis leaves out the time a run spent stopped (a gap between two train records longer than 10
times what their steps took counts as just what the steps took).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from llmscale.artifacts import METRICS_FILE
from llmscale.errors import PlotError
from llmscale.metrics import read_metrics

X_AXES = ("step", "tokens", "time")
_X_LABEL = {"step": "optimizer step", "tokens": "tokens seen", "time": "training wall time (minutes)"}


@dataclass
class Curves:
    """One run's curves, keyed by step (later records replace earlier ones for the same step)."""

    name: str
    train: dict[int, float] = field(default_factory=dict)
    val: dict[int, float] = field(default_factory=dict)
    tokens: dict[int, float] = field(default_factory=dict)
    minutes: dict[int, float] = field(default_factory=dict)
    last: dict = field(default_factory=dict)

    def x(self, steps: list[int], axis: str) -> list[float]:
        if axis == "step":
            return [float(s) for s in steps]
        table = self.tokens if axis == "tokens" else self.minutes
        known = sorted(table)
        out = []
        for s in steps:  # validation records carry no tokens/time of their own: the last train record's
            i = bisect.bisect_right(known, s)
            out.append(table[known[i - 1]] if i else 0.0)
        return out


def read_curves(run_dir: str | Path, *, metric: str = "val_loss", name: Optional[str] = None) -> Curves:
    """The train loss, the validation ``metric``, tokens seen and wall minutes of one run, per step."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    c = Curves(name=name or run_dir.resolve().name)
    minutes, prev_time, prev_step = 0.0, None, None
    for r in records:
        step = r.get("step")
        if step is None:
            continue
        if r.get("kind") == "train" and r.get("loss") is not None:
            c.train[step] = float(r["loss"])
            if r.get("tokens_seen") is not None:
                c.tokens[step] = float(r["tokens_seen"])
            t = r.get("time")
            if t is not None:
                if prev_time is not None:
                    gap = float(t) - prev_time
                    # a gap far longer than the steps it covers is a stop (preemption, crash) or a long eval
                    steps = step - prev_step if prev_step is not None and step > prev_step else 1
                    expected = steps * float(r.get("step_time_s") or gap)
                    minutes += (gap if gap <= 10 * expected else expected) / 60
                c.minutes[step] = minutes
                prev_time, prev_step = float(t), step
        elif r.get("kind") == "val" and r.get(metric) is not None:
            c.val[step] = float(r[metric])
            c.last = {k: v for k, v in r.items() if k not in ("step", "time") and isinstance(v, (int, float))}
            c.last["step"] = step
    if not c.train and not c.val:
        raise PlotError(f"{run_dir / METRICS_FILE} has no loss records yet (missing or empty). Train first: "
                        f"`llmscale train CONFIG run_dir={run_dir}`.")
    return c


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path, output: Optional[str | Path] = None) -> Path:
    """Draw train loss (per logged step) and validation loss against the step; returns the PNG path."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    c = read_curves(run_dir)
    out = Path(output) if output else run_dir / "loss.png"
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    if c.train:
        steps = sorted(c.train)
        ax.plot(steps, [c.train[s] for s in steps], label="train loss", color="tab:blue", linewidth=1.2)
    if c.val:
        steps = sorted(c.val)
        ax.plot(steps, [c.val[s] for s in steps], label="validation loss", color="tab:orange", marker="o",
                linewidth=1.5)
        last = steps[-1]
        ax.annotate(f"{c.val[last]:.3f}", (last, c.val[last]), textcoords="offset points", xytext=(4, 6))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per target token)")
    ax.set_title(c.name)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def compare_runs(run_dirs: list[str | Path], output: str | Path, *, x: str = "step", metric: str = "val_loss",
                 labels: Optional[list[str]] = None, title: Optional[str] = None,
                 train: bool = True) -> tuple[Path, list[dict]]:
    """Draw several runs' curves on the same axes; returns the PNG path and one summary row per run."""
    if x not in X_AXES:
        raise PlotError(f"x axis {x!r} is not one of {', '.join(X_AXES)}.")
    if not run_dirs:
        raise PlotError("no run directories given: name at least one (e.g. `llmscale report runs/a runs/b`).")
    if labels is not None and len(labels) != len(run_dirs):
        raise PlotError(f"{len(labels)} labels for {len(run_dirs)} runs: give one --label per run, or none.")
    curves = [read_curves(d, metric=metric, name=labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    names = [c.name for c in curves]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup and labels is None:  # same folder names under different parents: use the paths
        for c, d in zip(curves, run_dirs):
            c.name = str(d)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rows = []
    for i, c in enumerate(curves):
        col = colors[i % len(colors)]
        if train and c.train:
            steps = sorted(c.train)
            ax.plot(c.x(steps, x), [c.train[s] for s in steps], color=col, linewidth=1.0, alpha=0.55,
                    label=f"{c.name} (train loss)")
        if c.val:
            steps = sorted(c.val)
            ax.plot(c.x(steps, x), [c.val[s] for s in steps], color=col, marker="o", linewidth=1.8,
                    label=f"{c.name} ({metric})")
        final_step = max([*c.train, *c.val])
        rows.append({"run": c.name, "path": str(run_dirs[i]), "steps": final_step,
                     "tokens": c.x([final_step], "tokens")[0] if c.tokens else None,
                     "minutes": round(c.x([final_step], "time")[0], 2) if c.minutes else None,
                     "final_train_loss": c.train[max(c.train)] if c.train else None,
                     metric: c.val[max(c.val)] if c.val else None,
                     f"best_{metric}": (max if "loss" not in metric else min)(c.val.values()) if c.val else None})
    ax.set_xlabel(_X_LABEL[x])
    ax.set_ylabel("loss (nats per target token)" if "loss" in metric else metric)
    ax.set_title(title or f"{metric} of {len(curves)} runs")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out, rows
