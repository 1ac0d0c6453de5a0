"""Training-step throughput on DeepSpeed (``llmscale bench train``, :mod:`llmscale.jobs.bench_train`;
:func:`run` returns the report dict).

* **CPU presets on 1 and 2 processes** (gloo ranks, one thread each): tokens/s and the step-time
  breakdown — data wait, forward, backward, optimizer, communication — of the real engine and loader on
  the bundled corpus (prepared into a temporary folder). The micro-batch per rank is fixed, so 2
  processes do twice the work per step (weak scaling).
* **DeepSpeed against plain PyTorch**: in one process, the same model (same seed) and the same batches
  through ``Engine.train_step`` (ZeRO-0) and through a plain loop (``torch.optim.AdamW`` with the same
  parameter groups, the same clipping and learning rate). The two steps alternate, so whatever else runs
  on the machine slows both alike; medians are compared. Target: DeepSpeed within 10%.
* **On a GPU**: MFU (model FLOPs per second / the GPU's bf16 peak) of GPT-2 350M, the ~1B Llama-shape
  config and BERT-base, bf16, one process, on random token batches of their reference vocabulary.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from llmscale.log import get_logger

log = get_logger(__name__)

CPU_PRESETS = {
    # preset: (data format, seq_len, micro-batch per rank)
    "gpt-tiny": ("gpt", 128, 16),
    "gpt-char": ("gpt", 64, 12),
    "llama-tiny": ("gpt", 128, 16),
    "bert-tiny-cpu": ("bert", 128, 16),
}
GPU_MODELS = {
    # name: (preset, data format, seq_len, micro-batch)
    "gpt2-350m": ("gpt2-350m", "gpt", 1024, 8),
    "gpt-1b": ("llama-1b", "gpt", 2048, 4),
    "bert-base": ("bert-base", "bert", 128, 64),
}
TIMING_KEYS = ("data", "forward", "backward", "optimizer", "comm")


# --------------------------------------------------------------------------- helpers


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "mean": statistics.fmean(values), "min": min(values),
            "max": max(values)}


def _run_config(preset: str, fmt: str, seq_len: int, mbs: int, gbs: int, data: str, *, precision: str = "fp32",
                vocab_size: Optional[int] = None, zero_stage: int = 0) -> dict:
    model: dict[str, Any] = {"preset": preset, "max_seq_len": seq_len, "dropout": 0.0}
    if vocab_size is not None:
        model["vocab_size"] = vocab_size
    data_cfg: dict[str, Any] = {"path": data, "format": fmt, "seq_len": seq_len}
    if fmt == "bert":
        data_cfg["nsp"] = True
        model["nsp_head"] = True
    return {
        "run_dir": "unused", "data": data_cfg, "model": model,
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10},
        "parallel": {"zero_stage": zero_stage, "micro_batch_size": mbs, "global_batch_size": gbs},
        "train": {"steps": 1000, "precision": precision, "tensorboard": False},
    }


def _build(cfg_dict: dict, world_size: int):
    import torch

    from llmscale.config import RunConfig, from_dict
    from llmscale.data.shards import read_manifest
    from llmscale.dist import discover_world
    from llmscale.engine import build_engine
    from llmscale.models import build_model
    from llmscale.parallel import plan_run

    cfg = from_dict(RunConfig, cfg_dict)
    if cfg.model.vocab_size is None and cfg.data.path:
        cfg.model.vocab_size = read_manifest(cfg.data.path).vocab_size
    world = discover_world()
    run_plan = plan_run(cfg, world_size)
    plan = run_plan.batch
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, vocab_size=cfg.model.vocab_size)
    engine = build_engine(cfg, model, world=world, plan=run_plan)
    return cfg, plan, model, engine


def _loader(cfg, engine, plan):
    from llmscale.data.loader import build_loader

    return build_loader(cfg.data, dp_rank=engine.dp_rank, dp_size=engine.dp_size,
                        global_batch_size=plan.global_batch_size, micro_batch_size=plan.micro_batch_size,
                        vocab_size=cfg.model.vocab_size)




def _plain_step(model, opt, micro_batches: list[dict], *, clip: float, lr: float) -> float:
    """The textbook PyTorch step the engine is measured against."""
    import torch

    for g in opt.param_groups:
        g["lr"] = lr
    n = len(micro_batches)
    total = 0.0
    for mb in micro_batches:
        kwargs = {k: v for k, v in mb.items() if k not in ("input_ids", "sample_ids")}
        out = model(mb["input_ids"], **kwargs)
        (out.loss / n).backward()
        total += float(out.loss.detach())
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total / n


# --------------------------------------------------------------------------- workers (spawned ranks)


def _cpu_worker(rank: int, world_size: int, cfg_dict: dict, steps: int, warmup: int, with_plain: bool) -> dict:
    import torch

    from llmscale.models import build_model
    from llmscale.optim import lr_at, no_decay_names, param_groups

    cfg, plan, _, engine = _build(cfg_dict, world_size)
    loader = _loader(cfg, engine, plan)
    plain = opt = None
    if with_plain:
        torch.manual_seed(cfg.train.seed)  # the same initial weights as the engine's copy
        plain = build_model(cfg.model, vocab_size=cfg.model.vocab_size)
        o = cfg.optim
        no_decay = no_decay_names(plain, decay_embeddings=o.decay_embeddings)
        opt = torch.optim.AdamW(param_groups(plain.named_parameters(), o, no_decay=no_decay),
                                lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    step_s, plain_s, data_s, timings = [], [], [], {k: [] for k in TIMING_KEYS}
    losses = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        mbs = loader.next_step()
        t_data = time.perf_counter() - t0
        t1 = time.perf_counter()
        res = engine.train_step(mbs)
        t_step = time.perf_counter() - t1
        if plain is not None:
            t2 = time.perf_counter()
            pl = _plain_step(plain, opt, mbs, clip=cfg.optim.grad_clip, lr=lr_at(i, cfg.optim, cfg.train.steps))
            t_plain = time.perf_counter() - t2
        if i < warmup:
            continue
        step_s.append(t_step)
        data_s.append(t_data)
        res.timings["data"] = t_data
        for k in TIMING_KEYS:
            timings[k].append(res.timings.get(k, 0.0))
        if plain is not None:
            plain_s.append(t_plain)
            losses.append((res.loss, pl))
    loader.close()
    tokens_per_step = plan.global_batch_size * cfg.data.seq_len
    out = {
        "rank": rank,
        "tokens_per_step": tokens_per_step,
        "step_time_s": _summary([a + b for a, b in zip(step_s, data_s)]),
        "engine_step_s": _summary(step_s),
        "breakdown_s": {k: statistics.fmean(v) for k, v in timings.items()},
    }
    if plain is not None:
        out["plain_step_s"] = _summary(plain_s)
        out["last_losses"] = {"deepspeed": losses[-1][0], "plain": losses[-1][1]}
    return out


def _gpu_worker(rank: int, world_size: int, cfg_dict: dict, steps: int, warmup: int) -> dict:
    import torch

    from llmscale.metrics import device_peak_flops

    cfg, plan, model, engine = _build(cfg_dict, world_size)
    vocab, T, B = cfg.model.vocab_size, cfg.data.seq_len, plan.micro_batch_size
    g = torch.Generator().manual_seed(0)

    def batch() -> dict:
        ids = torch.randint(7, vocab, (B, T), generator=g)
        if cfg.data.format == "gpt":
            return {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}
        labels = torch.full_like(ids, -100)
        pick = torch.rand(B, T, generator=g) < 0.15
        labels[pick] = ids[pick]
        return {"input_ids": ids, "labels": labels, "token_type_ids": torch.zeros_like(ids),
                "attention_mask": torch.ones_like(ids), "next_sentence_label": torch.randint(0, 2, (B,), generator=g)}

    times = []
    for i in range(warmup + steps):
        mbs = [batch() for _ in range(plan.grad_accum_steps)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.train_step(mbs)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    tokens_per_s = plan.global_batch_size * T / step
    flops = model.flops_per_token(T)
    peak = device_peak_flops()
    return {
        "device": torch.cuda.get_device_name(), "params": model.num_params(), "seq_len": T, "micro_batch_size": B,
        "step_time_s": step, "tokens_per_s": tokens_per_s, "model_tflops": flops * tokens_per_s / 1e12,
        "peak_tflops": peak / 1e12 if peak else None, "mfu": flops * tokens_per_s / peak if peak else None,
        "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
    }


# --------------------------------------------------------------------------- main


def _prepare_data(root: Path) -> dict[str, str]:
    from llmscale.data.prepare import prepare_dataset

    corpus = Path(__file__).resolve().parents[1] / "corpus" / "tinyshakespeare.txt"
    gpt, bert = root / "gpt", root / "bert"
    prepare_dataset([corpus], gpt, vocab_size=512, format="gpt", seq_len=128, val_fraction=0.01,
                    doc_split="paragraph", num_proc=1)
    prepare_dataset([corpus], bert, vocab_size=512, format="bert", seq_len=128, val_fraction=0.01,
                    doc_split="paragraph", num_proc=1)
    return {"gpt": str(gpt), "bert": str(bert)}


def run_cpu(*, presets: list[str], nprocs: list[int], steps: int, warmup: int, data: dict[str, str]) -> dict:
    from llmscale.dist import CPU_RANK_ENV, run_local_ranks

    runs, versus = [], []
    for preset in presets:
        if preset not in CPU_PRESETS:
            raise SystemExit(f"unknown CPU preset {preset!r}; choose from {', '.join(CPU_PRESETS)}")
        fmt, T, mbs = CPU_PRESETS[preset]
        for n in nprocs:
            cfg = _run_config(preset, fmt, T, mbs, mbs * n, data[fmt])
            t0 = time.time()
            res = run_local_ranks(_cpu_worker, n, args=(cfg, steps, warmup, n == 1), timeout=1200, env=CPU_RANK_ENV)
            r0 = res[0]
            step = max(r["step_time_s"]["median"] for r in res)  # ranks wait for each other each step
            entry = {
                "preset": preset, "nproc": n, "zero_stage": 0, "seq_len": T, "micro_batch_size": mbs,
                "global_batch_size": mbs * n, "tokens_per_step": r0["tokens_per_step"],
                "tokens_per_s": r0["tokens_per_step"] / step, "step_time_s": r0["step_time_s"],
                "breakdown_s": r0["breakdown_s"], "wall_s": round(time.time() - t0, 1),
            }
            runs.append(entry)
            log.info("%s x%d: %.0f tokens/s, step %.1f ms (%s)", preset, n, entry["tokens_per_s"], 1e3 * step,
                     ", ".join(f"{k} {1e3 * v:.1f}" for k, v in entry["breakdown_s"].items()))
            if n == 1:
                ds, pl = r0["engine_step_s"]["median"], r0["plain_step_s"]["median"]
                versus.append({
                    "preset": preset, "deepspeed_zero0_step_s": ds, "plain_pytorch_step_s": pl,
                    "overhead_pct": 100.0 * (ds / pl - 1.0), "within_10pct": ds <= 1.10 * pl,
                    "last_losses": r0["last_losses"],
                })
                log.info("%s: DeepSpeed ZeRO-0 %.1f ms vs plain PyTorch %.1f ms per step (%+.1f%%)", preset, 1e3 * ds,
                         1e3 * pl, versus[-1]["overhead_pct"])
    scaling = []
    for preset in presets:
        by_n = {r["nproc"]: r for r in runs if r["preset"] == preset}
        if 1 in by_n and 2 in by_n:
            scaling.append({"preset": preset, "tokens_per_s_1": by_n[1]["tokens_per_s"],
                            "tokens_per_s_2": by_n[2]["tokens_per_s"],
                            "speedup_2_vs_1": by_n[2]["tokens_per_s"] / by_n[1]["tokens_per_s"]})
    return {"runs": runs, "deepspeed_vs_plain": versus, "scaling": scaling}


def _gpu_entry(queue: Any, port: int, cfg: dict, steps: int, warmup: int) -> None:
    """A fresh process on the GPU: DeepSpeed's CUDA accelerator and an NCCL group of one."""
    import traceback

    os.environ.update(DS_ACCELERATOR="cuda", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import torch
        import torch.distributed as dist

        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1)
        queue.put((True, _gpu_worker(0, 1, cfg, steps, warmup)))
        dist.destroy_process_group()
    except BaseException:
        queue.put((False, traceback.format_exc()))


def run_gpu(*, steps: int, warmup: int = 3) -> list[dict]:
    import multiprocessing as mp

    from llmscale.dist import free_port
    from llmscale.models.presets import REFERENCE_VOCAB

    out = []
    ctx = mp.get_context("spawn")
    for name, (preset, fmt, T, mbs) in GPU_MODELS.items():
        cfg = _run_config(preset, fmt, T, mbs, mbs, "", precision="bf16", vocab_size=REFERENCE_VOCAB[preset],
                          zero_stage=1)
        queue = ctx.Queue()
        proc = ctx.Process(target=_gpu_entry, args=(queue, free_port(), cfg, steps, warmup))
        proc.start()
        try:
            ok, payload = queue.get(timeout=1800)
        except Exception:  # noqa: BLE001 - a hung or killed worker
            ok, payload = False, "no result within 1800 s"
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
        if ok:
            out.append({"model": name, "preset": preset, **payload})
            log.info("%s: %.0f tokens/s, MFU %s", name, payload["tokens_per_s"], payload["mfu"])
        else:  # one model failing (e.g. out of memory) should not hide the others
            out.append({"model": name, "preset": preset, "error": payload.strip().splitlines()[-1][:500]})
    return out


def run(*, presets: list[str], nprocs: list[int], steps: int = 30, warmup: int = 5, gpu_steps: int = 20,
        skip_gpu: bool = False) -> dict:
    """The whole benchmark: CPU presets on each process count in ``nprocs``, then (unless ``skip_gpu``) the GPU
    models."""
    import torch

    t0 = time.time()
    report: dict[str, Any] = {
        "benchmark": "train",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "threads_per_rank": 1},
        "steps": steps, "warmup": warmup,
    }
    try:
        import deepspeed

        report["machine"]["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    gpu = torch.cuda.is_available() and not skip_gpu
    # the CPU part runs on the CPU even on a GPU machine
    saved = os.environ.get("DS_ACCELERATOR")
    os.environ["DS_ACCELERATOR"] = "cpu"
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        with tempfile.TemporaryDirectory(prefix="llmscale-bench-") as tmp:
            data = _prepare_data(Path(tmp))
            report["cpu"] = run_cpu(presets=presets, nprocs=nprocs, steps=steps, warmup=warmup, data=data)
    finally:
        for k, v in (("DS_ACCELERATOR", saved), ("CUDA_VISIBLE_DEVICES", hidden)):
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if gpu:
        os.environ.pop("DS_ACCELERATOR", None)
        report["gpu"] = run_gpu(steps=gpu_steps)
    else:
        report["gpu"] = {"skipped": "no CUDA GPU on this machine" if not skip_gpu else "--skip-gpu"}
    report["wall_s"] = round(time.time() - t0, 1)
    return report
