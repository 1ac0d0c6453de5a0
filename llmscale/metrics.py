"""Metric sinks of a training run: a console line (plus a progress bar), RUN_DIR/metrics.jsonl and
TensorBoard under RUN_DIR/tb, all behind one :class:`MetricsLogger`. Only the main rank writes.

Each record is a flat dict with a ``kind`` ("train" or "val") and a ``step``; the JSONL file holds one
record per line, appended (a resumed run continues the same file), so ``llmscale plot`` and any
notebook can read it with ``json.loads`` per line.

Also here: the hardware side of the numbers — a device's bf16 peak for MFU, and memory in use.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from llmscale.artifacts import METRICS_FILE, TB_DIR
from llmscale.log import get_logger

log = get_logger(__name__)

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) of common training GPUs, by a substring of
# torch.cuda.get_device_name() (case-insensitive). First match wins, so the more specific names come first.
# The one table: MFU in training logs and in `llmscale bench` both use it.
BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.4e12),
    ("H200", 989.4e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),  # SXM
    ("H800", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("A6000", 155e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # no bf16 units: its fp16 tensor peak, the closest meaningful bound
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
)


def peak_flops_for(device_name: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of a GPU by its name (:data:`BF16_PEAK_FLOPS`), None when unknown."""
    low = device_name.lower()
    for key, peak in BF16_PEAK_FLOPS:
        if key.lower() in low:
            return peak
    return None


def device_peak_flops() -> Optional[float]:
    """bf16 peak FLOP/s of this process's GPU, ``LLMSCALE_PEAK_FLOPS`` if set, else None (CPU, unknown GPU)."""
    env = os.environ.get("LLMSCALE_PEAK_FLOPS")
    if env:
        return float(env)
    if not torch.cuda.is_available() or os.environ.get("DS_ACCELERATOR") == "cpu":
        return None
    name = torch.cuda.get_device_name()
    peak = peak_flops_for(name)
    if peak is not None:
        return peak
    log.warning("unknown GPU %r: MFU is not reported; set LLMSCALE_PEAK_FLOPS to its bf16 peak FLOP/s", name)
    return None


def memory_stats() -> dict[str, float]:
    """Memory of this process in GiB: GPU peak allocated/reserved since the last call, or host RSS on CPU."""
    out: dict[str, float] = {}
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
        out["mem_alloc_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["mem_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        out["rss_gb"] = pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        import resource

        out["rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak, KiB on Linux
    return out


def _progress_enabled() -> bool:
    forced = os.environ.get("LLMSCALE_PROGRESS")
    return forced == "1" if forced is not None else sys.stderr.isatty()


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


# console line: (record key, label) in this order; absent keys are left out
_CONSOLE_TRAIN = (("loss", "loss"), ("lr", "lr"), ("grad_norm", "gnorm"), ("tokens_per_s", "tok/s"),
                  ("step_time_s", "step_s"), ("data_time_s", "data_s"), ("mfu", "mfu"), ("mem_alloc_gb", "mem_gb"),
                  ("rss_gb", "rss_gb"))
_CONSOLE_VAL = (("val_loss", "val_loss"), ("val_ppl", "ppl"), ("val_bpb", "bits/byte"), ("val_tokens", "tokens"),
                ("accuracy", "acc"), ("f1", "f1"), ("mcc", "mcc"), ("examples", "examples"), ("eval_time_s", "s"))


class MetricsLogger:
    """Write metric records to the console, ``RUN_DIR/metrics.jsonl`` and TensorBoard (``RUN_DIR/tb``).

    ``enabled=False`` (ranks other than 0) makes every call a no-op, so callers need no rank checks."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 total_steps: Optional[int] = None, start_step: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.total_steps = total_steps
        self._file = None
        self._tb = None
        self._bar = None
        self._redirect = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._want_tb = tensorboard
        self._begun = False
        if start_step:
            self.begin(start_step)

    def begin(self, start_step: int = 0) -> None:
        """Open TensorBoard and the progress bar at ``start_step`` (the step a resumed run continues from:
        TensorBoard drops events a crashed run wrote after it). Called by the first ``log`` otherwise."""
        if not self.enabled or self._begun:
            return
        self._begun = True
        if self._want_tb:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is a dependency; say so rather than silently skip
                raise RuntimeError(f"TensorBoard logging needs the tensorboard package ({e}); pip install tensorboard, "
                                   f"or set train.tensorboard=false.") from e
            self._tb = SummaryWriter(log_dir=str(self.run_dir / TB_DIR), purge_step=start_step or None)
        if self.total_steps and _progress_enabled():
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=self.total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, leave=False)
            # console log lines go through tqdm.write so they do not tear the bar
            self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger("llmscale")])
            self._redirect.__enter__()

    @property
    def path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def log(self, record: dict[str, Any], *, console: bool = True) -> None:
        """Write one record (needs ``kind`` and ``step``). Non-finite floats become null in JSON."""
        if not self.enabled:
            return
        self.begin(int(record["step"]))
        rec = {"kind": record.get("kind", "train"), "step": int(record["step"]), "time": round(time.time(), 3)}
        for k, v in record.items():
            if k in rec:
                continue
            if isinstance(v, torch.Tensor):
                v = v.item()
            if isinstance(v, float) and not math.isfinite(v):
                v = None
            rec[k] = v
        assert self._file is not None
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self._tb is not None:
            prefix = rec["kind"]
            for k, v in rec.items():
                if k in ("kind", "step", "time") or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                name = k[4:] if prefix == "val" and k.startswith("val_") else k
                self._tb.add_scalar(f"{prefix}/{name}", v, rec["step"])
            self._tb.flush()
        if console:
            keys = _CONSOLE_VAL if rec["kind"] == "val" else _CONSOLE_TRAIN
            total = f"/{self.total_steps}" if self.total_steps else ""
            parts = [f"{label} {_fmt(rec[k])}" for k, label in keys if k in rec and rec[k] is not None]
            log.info("%s step %d%s | %s", rec["kind"], rec["step"], total, " | ".join(parts))

    def advance(self, steps: int = 1, **postfix: Any) -> None:
        """Move the progress bar (when shown) by ``steps`` and show ``postfix`` values beside it."""
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of ``RUN_DIR/metrics.jsonl`` in file order (a torn last line is ignored)."""
    p = Path(run_dir) / METRICS_FILE
    if not p.is_file():
        return []
    out = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a record cut by a crash mid-write
    return out
