"""Forward+backward throughput of model presets on this machine (``llmscale bench model``,
:mod:`llmscale.jobs.bench_model`; :func:`run` returns the result dict).

For each preset: tokens per second of a training step without the optimizer (forward with labels, loss,
backward), the achieved TFLOP/s using the model's own ``flops_per_token(seq_len)`` (6 x matmul weights +
full-matrix attention, see :mod:`llmscale.models.flops`) and, on a CUDA GPU, the model FLOPs utilisation
(MFU) against the GPU's dense bf16 peak (:data:`llmscale.metrics.BF16_PEAK_FLOPS`, matched on the device name; override
with ``peak_tflops_override`` / ``--peak-tflops``). On every device, also the limit measured in the same run: the
FLOP/s of one large square matmul in the benchmark's dtype (:func:`matmul_tflops`), and each preset's achieved
FLOP/s as a fraction of it (``of_measured_matmul``). A datasheet peak says what the chip could do; the measured
matmul says what this machine, its BLAS / cuBLAS, clocks and neighbours give right now.

Defaults: on a GPU gpt2-124m (T=1024), gpt2-350m and llama-1b (T=2048) in bf16 autocast with the flash
SDPA kernel; on a CPU the tiny presets and gpt2-124m at T=128 in fp32. The vocabulary is each preset's
reference one (50257 GPT-2, 32000 llama, 30522 BERT). A sequence longer than a preset's max_seq_len grows
its learned position table (gpt2-350m at 2048 has 2048 positions instead of 1024).
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Optional

import torch

from llmscale.log import get_logger

log = get_logger(__name__)

# (seq_len, batch) per preset when --seq-len / --batch are not given
CPU_DEFAULTS: dict[str, tuple[int, int]] = {
    "gpt-tiny": (256, 8), "gpt-char": (256, 8), "llama-tiny": (256, 8), "bert-tiny-cpu": (128, 8),
    "lstm-tiny": (256, 8), "gpt2-124m": (128, 2),
}
GPU_DEFAULTS: dict[str, tuple[int, int]] = {"gpt2-124m": (1024, 16), "gpt2-350m": (2048, 8), "llama-1b": (2048, 4)}


def peak_tflops(device_name: str) -> Optional[float]:
    """Dense bf16 peak TFLOP/s of a GPU by name, from the one table (:data:`llmscale.metrics.BF16_PEAK_FLOPS`)."""
    from llmscale.metrics import peak_flops_for

    peak = peak_flops_for(device_name)
    return peak / 1e12 if peak is not None else None


def matmul_tflops(device: torch.device, dtype: str, *, n: Optional[int] = None, repeats: Optional[int] = None) -> dict:
    """TFLOP/s of ``C = A @ B`` for square (n, n) matrices in ``dtype`` (fp32, or bf16 on a GPU): 2 n^3 FLOPs per
    product, the median of ``repeats`` timed products after two untimed ones. The same-run limit the
    presets' achieved FLOP/s are compared with."""
    n = n or (8192 if device.type == "cuda" else 2048)
    repeats = repeats or (20 if device.type == "cuda" else 5)
    tdtype = torch.bfloat16 if dtype == "bf16" and device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=tdtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=tdtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        a @ b
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"n": n, "dtype": str(tdtype).replace("torch.", ""), "repeats": repeats,
            "time_s_median": round(t, 6), "tflops": round(2 * n**3 / t / 1e12, 4)}


def _batch(family: str, B: int, T: int, vocab: int, device, gen: torch.Generator) -> dict:
    ids = torch.randint(0, vocab, (B, T), generator=gen).to(device)
    if family != "bert":
        return {"input_ids": ids, "labels": torch.randint(0, vocab, (B, T), generator=gen).to(device)}
    labels = torch.where(torch.rand(B, T, generator=gen).to(device) < 0.15, ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids)}


def bench_preset(
    preset: str,
    *,
    seq_len: int,
    batch: int,
    steps: int,
    warmup: int,
    device: torch.device,
    dtype: str,
    sdpa: str,
    compile: bool = False,
    activation_checkpointing: bool = False,
    peak: Optional[float] = None,
    measured: Optional[float] = None,
) -> dict:
    from llmscale.config import ModelConfig, from_dict
    from llmscale.models import build_model
    from llmscale.models.presets import PRESETS, REFERENCE_VOCAB

    spec = PRESETS[preset]
    overrides = {"preset": preset, "dropout": 0.0, "activation_checkpointing": activation_checkpointing}
    if seq_len > spec.get("max_seq_len", 1024) and spec["family"] != "lstm":
        overrides["max_seq_len"] = seq_len
    cfg = from_dict(ModelConfig, overrides)
    vocab = REFERENCE_VOCAB[preset]
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg, vocab_size=vocab)
    model.train()
    fwd = torch.compile(model) if compile else model
    gen = torch.Generator().manual_seed(0)
    data = _batch(cfg.family, batch, seq_len, vocab, device, gen)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def sdpa_ctx():
        if device.type == "cuda" and sdpa == "flash":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
        import contextlib

        return contextlib.nullcontext()

    def step() -> float:
        with autocast, sdpa_ctx():
            loss = fwd(**data).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return float(loss.detach())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    sync()
    times = []
    loss = math.nan
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)  # robust to a disturbed step on a shared machine
    tokens = batch * seq_len
    tok_s = tokens / step_s
    fpt = model.flops_per_token(seq_len)
    tflops = fpt * tok_s / 1e12
    out = {
        "preset": preset, "family": cfg.family, "params": model.num_params(),
        "params_non_embedding": model.num_params(exclude_embeddings=True), "vocab_size": vocab,
        "seq_len": seq_len, "batch": batch, "tokens_per_step": tokens, "steps": steps, "warmup": warmup,
        "step_time_s_median": round(step_s, 6), "step_time_s_all": [round(t, 6) for t in times],
        "tokens_per_s": round(tok_s, 1), "tokens_per_s_best_step": round(tokens / min(times), 1),
        "flops_per_token": fpt, "achieved_tflops": round(tflops, 4),
        "peak_tflops": peak, "mfu": round(tflops / peak, 4) if peak else None,
        "of_measured_matmul": round(tflops / measured, 4) if measured else None, "loss": round(loss, 4),
        "activation_checkpointing": activation_checkpointing, "compile": compile,
    }
    if device.type == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    log.info("%s: %.0f tokens/s, %.3f TFLOP/s%s%s", preset, tok_s, tflops,
             f", {tflops / measured:.1%} of the measured matmul" if measured else "",
             f", MFU {tflops / peak:.1%}" if peak else "")
    model = fwd = data = None  # free the weights and batch (step() holds them too) before the next preset
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def run(
    *,
    presets: Optional[Sequence[str]] = None,
    seq_len: Optional[int] = None,
    batch: Optional[int] = None,
    steps: Optional[int] = None,
    warmup: Optional[int] = None,
    device: str = "auto",
    dtype: str = "auto",
    sdpa: str = "flash",
    compile: bool = False,
    activation_checkpointing: bool = False,
    peak_tflops_override: Optional[float] = None,
    threads: Optional[int] = None,
) -> dict:
    from llmscale.models.presets import PRESETS

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device("cuda" if (device == "auto" and torch.cuda.is_available())
                       else ("cpu" if device == "auto" else device))
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    defaults = GPU_DEFAULTS if dev.type == "cuda" else CPU_DEFAULTS
    steps = steps or (10 if dev.type == "cuda" else 3)
    warmup = (3 if dev.type == "cuda" else 1) if warmup is None else warmup
    presets = list(presets or defaults)
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        from llmscale.errors import ConfigError

        raise ConfigError(f"unknown preset(s) {unknown}; choose among: {', '.join(PRESETS)}.")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    peak = peak_tflops_override or (peak_tflops(name) if dev.type == "cuda" else None)
    if dev.type == "cuda" and dtype != "bf16" and peak_tflops_override is None:
        peak = None  # the table holds bf16 peaks only
    limit = matmul_tflops(dev, dtype)
    log.info("measured matmul limit: %.3f TFLOP/s (%s, n=%d)", limit["tflops"], limit["dtype"], limit["n"])
    results = []
    for p in presets:
        T, B = defaults.get(p, (256, 4))
        T, B = seq_len or T, batch or B
        try:
            results.append(bench_preset(p, seq_len=T, batch=B, steps=steps, warmup=warmup, device=dev, dtype=dtype,
                                        sdpa=sdpa, compile=compile, activation_checkpointing=activation_checkpointing,
                                        peak=peak, measured=limit["tflops"]))
        except RuntimeError as e:  # out of memory, no SDPA kernel for this shape...: record, go on
            if dev.type != "cuda":
                raise
            log.warning("%s at batch %d x %d failed: %s", p, B, T, str(e)[:200])
            results.append({"preset": p, "seq_len": T, "batch": B, "error": str(e)[:500]})
            torch.cuda.empty_cache()
    return {
        "benchmark": "model",
        "what": "forward + backward (no optimizer step) of one batch; tokens/s from the median step time",
        "flops_formula": "flops_per_token = 6 * matmul weights per token (incl. the LM head) + "
                         "12 * n_layers * n_heads * head_dim * seq_len (attention over the full TxT matrix)",
        "device": {"type": dev.type, "name": name, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "cuda": torch.version.cuda,
                   "load_average_1m_at_end": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count()},
        "dtype": dtype, "sdpa": sdpa if dev.type == "cuda" else "default",
        "measured_matmul": limit,
        "results": results,
    }
