"""Evaluation throughput against training of the same model (``llmscale bench eval``,
:mod:`llmscale.jobs.bench_eval`; :func:`run` returns the report dict).

On spawned CPU ranks (gloo, one thread each; 1 and 2 processes by default), with a BPE tokenizer (vocab 1024)
trained on the bundled corpus and a GPT dataset prepared from it, in a temporary folder:

* **training**: the model (default preset ``gpt-tiny``) on DeepSpeed (ZeRO-0, fp32), one micro-batch of
  ``micro_batch_size`` windows of ``seq_len`` tokens per rank and step, through the pretraining loader:
  forward, backward, optimizer step.
* **evaluation**: the same architecture as the eval job runs it (the consolidated single-device model, no
  DeepSpeed): :func:`llmscale.scoring.score_windows` on ``micro_batch_size`` disjoint windows of ``seq_len``
  tokens of the held-out text per rank and call (this rank's share, as ``perplexity`` splits them).

The two alternate call by call in each process, so whatever else runs on the machine slows both alike.
A step's time is the slowest rank's; its tokens are summed over ranks (training: window positions;
evaluation: scored targets, the same count per window). Rates are medians of per-step rates. The headline
is eval tokens/s over training tokens/s per process count, against ``target`` (2.0: there is no backward
and no optimizer step); ``meets_target`` reports it, nothing asserts it.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmscale.log import get_logger

log = get_logger(__name__)

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "tinyshakespeare.txt"


def _worker(rank: int, world_size: int, cfg_dict: dict, held_out: list[int], steps: int, warmup: int) -> dict:
    import torch

    from llmscale.config import RunConfig, from_dict
    from llmscale.data.loader import build_loader
    from llmscale.data.shards import read_manifest
    from llmscale.dist import discover_world
    from llmscale.engine import build_engine
    from llmscale.models import build_model
    from llmscale.parallel import plan_run
    from llmscale.scoring import rank_share, score_windows, stream_windows

    cfg = from_dict(RunConfig, cfg_dict)
    cfg.model.vocab_size = read_manifest(cfg.data.path).vocab_size
    torch.manual_seed(0)
    run_plan = plan_run(cfg, world_size)
    engine = build_engine(cfg, build_model(cfg.model, vocab_size=cfg.model.vocab_size), world=discover_world(),
                          plan=run_plan)
    plan = run_plan.batch
    loader = build_loader(cfg.data, dp_rank=engine.dp_rank, dp_size=engine.dp_size,
                          global_batch_size=plan.global_batch_size, micro_batch_size=plan.micro_batch_size,
                          vocab_size=cfg.model.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=cfg.model.vocab_size).eval()
    T, B = cfg.data.seq_len, plan.micro_batch_size
    windows = stream_windows([held_out], context=T, stride=T)
    mine = [windows[i] for i in rank_share(len(windows), rank=rank, world_size=world_size)]
    mine = [w for w in mine if w.end - w.start == T]  # full windows only: every call does the same work
    if len(mine) < B:
        raise RuntimeError(f"the held-out text gives rank {rank} only {len(mine)} full windows; {B} needed.")
    train_s, eval_s, eval_targets = [], [], []
    for i in range(warmup + steps):
        order = ("train", "eval") if i % 2 == 0 else ("eval", "train")
        for side in order:
            if side == "train":
                t0 = time.perf_counter()
                engine.train_step(loader.next_step())
                dt = time.perf_counter() - t0
                if i >= warmup:
                    train_s.append(dt)
            else:
                k = (i * B) % (len(mine) - B + 1)
                batch = mine[k:k + B]
                t0 = time.perf_counter()
                res = score_windows(model, [held_out], batch, batch_size=B)
                dt = time.perf_counter() - t0
                if i >= warmup:
                    eval_s.append(dt)
                    eval_targets.append(sum(r[1] for r in res))
    loader.close()
    return {"train_s": train_s, "eval_s": eval_s, "eval_targets": eval_targets}


def _rates(per_rank: list[dict], key: str, tokens: list[float]) -> dict:
    times = [max(r[key][j] for r in per_rank) for j in range(len(per_rank[0][key]))]  # the slowest rank
    rates = [tok / t for tok, t in zip(tokens, times)]
    return {"tokens_per_s": statistics.median(rates), "step_s_median": statistics.median(times),
            "steps": len(times)}


def run(*, nprocs: list[int], steps: int = 20, warmup: int = 3, micro_batch_size: int = 8, seq_len: int = 128,
        preset: str = "gpt-tiny", target: float = 2.0) -> dict:
    import torch

    from llmscale.data.prepare import prepare_dataset
    from llmscale.data.tokenizer import Tokenizer
    from llmscale.dist import CPU_RANK_ENV, run_local_ranks

    if steps < 1 or warmup < 1:
        raise ValueError("steps and warmup must be >= 1.")
    text = CORPUS.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    report: dict[str, Any] = {
        "benchmark": "eval", "preset": preset, "seq_len": seq_len, "micro_batch_size": micro_batch_size,
        "steps": steps, "warmup": warmup, "target": target,
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                    "cpus": os.cpu_count()},
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="llmscale-bench-eval-") as tmp:
        root = Path(tmp)
        (root / "train.txt").write_text(text[:cut], encoding="utf-8")
        prepare_dataset([root / "train.txt"], root / "ds", vocab_size=1024, format="gpt", seq_len=seq_len,
                        val_fraction=0.01, doc_split="paragraph", num_proc=1)
        tok = Tokenizer.load(root / "ds")
        held_out = [tok.eos_id, *tok.encode(text[cut:])]
        for n in nprocs:
            cfg = {"run_dir": str(root / "unused"), "data": {"path": str(root / "ds"), "seq_len": seq_len},
                   "model": {"preset": preset, "max_seq_len": seq_len, "dropout": 0.0},
                   "optim": {"lr": 1e-3, "warmup_steps": 1},
                   "parallel": {"zero_stage": 0, "micro_batch_size": micro_batch_size,
                                "global_batch_size": micro_batch_size * n},
                   "train": {"steps": 1000, "tensorboard": False}}
            per_rank = run_local_ranks(_worker, n, args=(cfg, held_out, steps, warmup), env=CPU_RANK_ENV,
                                       timeout=1800)
            train_tokens = [float(micro_batch_size * seq_len * n)] * steps
            eval_tokens = [float(sum(r["eval_targets"][j] for r in per_rank)) for j in range(steps)]
            train = _rates(per_rank, "train_s", train_tokens)
            ev = _rates(per_rank, "eval_s", eval_tokens)
            ratio = ev["tokens_per_s"] / train["tokens_per_s"]
            report["runs"][str(n)] = {"processes": n, "train": train, "eval": ev, "ratio": ratio,
                                      "meets_target": ratio >= target}
            log.info("%d process(es): train %.0f tok/s, eval %.0f tok/s, ratio %.2f (target %.1f)", n,
                     train["tokens_per_s"], ev["tokens_per_s"], ratio, target)
    return report
