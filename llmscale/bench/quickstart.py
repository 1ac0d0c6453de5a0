"""The README's first command, timed: ``llmscale quickstart`` as a new user runs it, in a fresh folder (so the
corpus is prepared and the tokenizer trained, not reused), from the command line to its last line
(``llmscale bench quickstart``, :mod:`llmscale.jobs.bench_quickstart`; :func:`run` returns the result dict).

Reported beside the total: the phases the quickstart prints (prepare, train launch to exit, sample), the
training run's own wall time from its metrics, the validation loss reached, and the machine (CPU count), so the
README's "about N minutes on 2 cores" is a measured number with its machine.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(*, workdir: str | None = None, steps: int | None = None, keep: bool = False) -> dict:
    """One timed quickstart in a temporary folder inside ``workdir`` (default ./runs), removed unless ``keep``.
    ``steps``: fewer optimizer steps than the config (a quick check of the benchmark itself)."""
    from llmscale.metrics import read_metrics

    base = Path(workdir) if workdir else Path("runs")
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-quickstart-", dir=base))
    cmd = [sys.executable, "-m", "llmscale", "quickstart", "--run-dir", str(folder / "qs")]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    try:
        marks: dict[str, float] = {}
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = re.match(r"\[(\d)/3\]", line)
            if m:
                marks.setdefault(f"phase{m.group(1)}", time.perf_counter() - t0)
        rc = proc.wait()
        total = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` exited {rc}:\n{''.join(lines)[-3000:]}")
        recs = read_metrics(folder / "qs" / "run")
        train = [r for r in recs if r.get("kind") == "train"]
        vals = [r for r in recs if r.get("kind") == "val"]
        return {
            "benchmark": "quickstart",
            "command": "llmscale quickstart" + (f" --steps {steps}" if steps is not None else ""),
            "total_s": total,
            "prepare_s": marks.get("phase2", total) - marks.get("phase1", 0.0),
            "train_launch_to_exit_s": marks.get("phase3", total) - marks.get("phase2", 0.0),
            "report_and_sample_s": total - marks.get("phase3", total),
            "steps": train[-1]["step"] if train else None,
            "train_wall_s_from_metrics": (train[-1]["time"] - train[0]["time"]) if len(train) > 1 else None,
            "val_loss": vals[-1]["val_loss"] if vals else None,
            "cpu_count": os.cpu_count(),
        }
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
