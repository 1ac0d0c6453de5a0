"""Fine-tuning throughput against pretraining of the same model (``llmscale bench finetune``,
:mod:`llmscale.jobs.bench_finetune`; :func:`run` returns the report dict).

Everything runs on spawned CPU ranks (gloo, one thread each; 1 and 2 processes by default), on the bundled
corpus, with one BPE tokenizer (vocab 1024) trained on it into a temporary folder:

* **BERT classification**: bert-tiny-cpu with a ``cls_pooler`` head and 2 labels, on the blank-line-separated
  paragraphs of ``corpus/tinyshakespeare.txt`` (label: the first byte of the text's SHA-256, mod 2), rows of
  at most ``max_len`` tokens padded per micro-batch (:class:`~llmscale.data.finetune.FinetuneLoader`).
* **GPT SFT**: gpt-tiny on ``corpus/shakespeare_dialogue_train.jsonl`` (response-only targets), dynamic
  padding; and packed (several examples per row) when the model and the engine both take ``position_ids`` /
  ``doc_ids`` — otherwise that throughput is ``null`` with the reason. The padding fraction of the packed
  rows is always reported (computed from the features).
* **Pretraining of the same models**: the same architecture trained as an LM (bert-tiny-cpu masked LM,
  gpt-tiny causal LM) on full ``seq_len`` windows of a dataset prepared from the same corpus with the same
  tokenizer, through the pretraining loader and ``loss_over="micro_batch"``.

Both sides use the same micro-batch (rows per rank), optimizer, ZeRO-0 and fp32, so twice the processes do
twice the work per step (weak scaling). Fine-tune engines use ``loss_over="step_targets"``, as the fine-tune
job does. Each process builds all engines of a model and steps them in turns (the order alternating every
round), so whatever else runs on the machine slows both sides alike.

Per step: the wall time of ``loader.next_step()`` + ``Engine.train_step`` (the slowest rank: ranks wait for
each other), and the step's examples, real tokens (attention_mask), padded tokens (the batch tensors' size)
and targets, summed over ranks. Rates are medians of the per-step rates. The headline ratio is the
fine-tune's real tokens/s over the pretraining's tokens/s (window positions), against ``target`` (0.80);
``meets_target`` reports it, nothing asserts it.

Padding fractions (1 - real / padded): ``padding`` holds them over one whole epoch of the loader's order
(micro-batches as served), a property of the data and the micro-batch size; each run also reports the
fraction of the steps it measured.
"""
from __future__ import annotations

import hashlib
import inspect
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

CORPUS_DIR = Path(__file__).resolve().parents[1] / "corpus"
TEXT_CORPUS = CORPUS_DIR / "tinyshakespeare.txt"
SFT_CORPUS = CORPUS_DIR / "shakespeare_dialogue_train.jsonl"
BERT_PRESET, GPT_PRESET = "bert-tiny-cpu", "gpt-tiny"
TIMING_KEYS = ("data", "forward", "backward", "optimizer", "comm")
COUNT_KEYS = ("examples", "real_tokens", "padded_tokens", "targets")
PACKING_KEYS = ("position_ids", "doc_ids")


# --------------------------------------------------------------------------- helpers


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "mean": statistics.fmean(values), "min": min(values),
            "max": max(values)}


def text_label(text: str) -> str:
    """The benchmark's deterministic label of a text: "0" or "1" (the first byte of its SHA-256, mod 2)."""
    return str(hashlib.sha256(text.encode("utf-8")).digest()[0] % 2)


def packing_support() -> Optional[str]:
    """None when ``GPT.forward`` takes ``position_ids`` and ``doc_ids`` (packed rows), else why not."""
    from llmscale.models.gpt import GPT

    params = inspect.signature(GPT.forward).parameters
    missing = [k for k in PACKING_KEYS if k not in params]
    if missing:
        return f"GPT.forward takes no {'/'.join(missing)}: packed rows cannot keep attention inside each example"
    return None


def padding_fraction(features: Any, *, micro_batch_size: int, seed: int) -> dict:
    """Real and padded tokens of one epoch of ``features`` in the fine-tune loader's order, each micro-batch of
    ``micro_batch_size`` rows padded to its longest (what the loader's collate does), and 1 - real / padded."""
    import numpy as np

    from llmscale.data.finetune import FinetuneLoader

    loader = FinetuneLoader(features, dp_rank=0, dp_size=1, global_batch_size=micro_batch_size,
                            micro_batch_size=micro_batch_size, seed=seed, pad_id=0)
    lengths = features.lengths[loader.samples_at(np.arange(len(features)))]
    real = padded = 0
    for i in range(0, len(lengths), micro_batch_size):
        chunk = lengths[i : i + micro_batch_size]
        real += int(chunk.sum())
        padded += len(chunk) * int(chunk.max())
    return {"rows": len(features), "real_tokens": real, "padded_tokens": padded, "fraction": 1.0 - real / padded}


# --------------------------------------------------------------------------- configs


def _common(mbs: int, world_size: int, model: dict) -> dict:
    return {
        "model": dict(model),
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10},
        "parallel": {"zero_stage": 0, "micro_batch_size": mbs, "global_batch_size": mbs * world_size},
    }


def _pretrain_config(*, preset: str, fmt: str, data: str, seq_len: int, mbs: int, world_size: int,
                     vocab_size: int) -> dict:
    return {**_common(mbs, world_size, {"preset": preset, "dropout": 0.0, "vocab_size": vocab_size}),
            "run_dir": "unused", "data": {"path": data, "format": fmt, "seq_len": seq_len},
            "train": {"steps": 1000, "precision": "fp32", "tensorboard": False}}


def _finetune_config(*, preset: str, task: str, max_len: int, mbs: int, world_size: int, tokenizer: str,
                     packing: bool = False) -> dict:
    out = {**_common(mbs, world_size, {"preset": preset, "dropout": 0.0}), "run_dir": "unused", "task": task,
           "init": {"from": "scratch", "tokenizer": tokenizer},
           "train": {"steps": 1000, "precision": "fp32", "tensorboard": False}}
    # the features are encoded once by the parent; the paths only satisfy the config's validation
    if task == "classify":
        out["classify"] = {"train": [str(TEXT_CORPUS)], "max_len": max_len, "labels": ["0", "1"],
                           "pooling": "cls_pooler"}
    else:
        out["sft"] = {"train": [str(SFT_CORPUS)], "max_len": max_len, "packing": packing}
    return out


# --------------------------------------------------------------------------- workers (spawned ranks)


class _Side:
    """One engine and its loader, stepped in turns with the others; records per-step time and counts."""

    def __init__(self, name: str, engine: Any, loader: Any, *, pad_id: int, row_examples: Optional[list] = None):
        self.name, self.engine, self.loader = name, engine, loader
        self.pad_id = pad_id
        self.row_examples = row_examples  # packed SFT: examples per feature row
        self.step_s: list[float] = []
        self.timings: dict[str, list[float]] = {k: [] for k in TIMING_KEYS}
        self.counts: dict[str, list[int]] = {k: [] for k in COUNT_KEYS}
        self.seen_kwargs: set[str] = set()

    def _count(self, micro_batches: list[dict]) -> dict[str, int]:
        c = dict.fromkeys(COUNT_KEYS, 0)
        for mb in micro_batches:
            ids = mb["input_ids"]
            if self.row_examples is not None:
                c["examples"] += sum(len(self.row_examples[int(i)]) for i in mb["sample_ids"])
            else:
                c["examples"] += int(ids.shape[0])
            mask = mb.get("attention_mask")
            c["real_tokens"] += int(mask.sum()) if mask is not None else int((ids != self.pad_id).sum())
            c["padded_tokens"] += int(ids.numel())
            c["targets"] += int((mb["labels"] != -100).sum())
        return c

    def step(self, *, record: bool) -> None:
        t0 = time.perf_counter()
        mbs = self.loader.next_step()
        t_data = time.perf_counter() - t0
        res = self.engine.train_step(mbs)
        t_total = time.perf_counter() - t0
        if not record:
            return
        self.step_s.append(t_total)
        res.timings["data"] = t_data
        for k in TIMING_KEYS:
            self.timings[k].append(res.timings.get(k, 0.0))
        for k, v in self._count(mbs).items():
            self.counts[k].append(v)

    def watch_model_inputs(self, model: Any):
        """Record the keyword arguments the engine hands ``model`` (a hook; returns its handle)."""
        def hook(module, args, kwargs):
            self.seen_kwargs.update(kwargs)

        return model.register_forward_pre_hook(hook, with_kwargs=True)

    def result(self) -> dict:
        return {"step_s": self.step_s, "timings": self.timings, "counts": self.counts}


def _pretrain_side(cfg_dict: dict, world_size: int, world: Any, ids: dict) -> _Side:
    import torch

    from llmscale.config import RunConfig, from_dict
    from llmscale.data.loader import build_loader
    from llmscale.engine import build_engine
    from llmscale.models import build_model
    from llmscale.parallel import plan_run

    cfg = from_dict(RunConfig, cfg_dict)
    plan = plan_run(cfg, world_size)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, vocab_size=cfg.model.vocab_size)
    engine = build_engine(cfg, model, world=world, plan=plan, loss_over="micro_batch")
    b = plan.batch
    loader = build_loader(cfg.data, dp_rank=engine.dp_rank, dp_size=engine.dp_size,
                          global_batch_size=b.global_batch_size, micro_batch_size=b.micro_batch_size,
                          pad_id=ids["pad"], mask_id=ids["mask"], cls_id=ids["cls"], sep_id=ids["sep"],
                          vocab_size=cfg.model.vocab_size)
    return _Side("pretrain", engine, loader, pad_id=ids["pad"])


def _finetune_side(name: str, cfg_dict: dict, features: Any, world_size: int, world: Any, ids: dict,
                   vocab_size: int) -> tuple[_Side, Any]:
    import torch

    from llmscale.config import from_dict
    from llmscale.config_finetune import FinetuneConfig, classifier_config
    from llmscale.data.finetune import FinetuneLoader
    from llmscale.engine import build_engine
    from llmscale.models import build_model
    from llmscale.models.classify import SequenceClassifier
    from llmscale.models.presets import resolve_config
    from llmscale.parallel import plan_run

    cfg = from_dict(FinetuneConfig, cfg_dict)
    cfg.model = resolve_config(cfg.model, vocab_size)  # as jobs/finetune.py: the backbone's resolved config
    cfg.data.seq_len = cfg.classify.max_len if cfg.task == "classify" else cfg.sft.max_len
    plan = plan_run(cfg, world_size)
    torch.manual_seed(cfg.train.seed)
    if cfg.task == "classify":
        model = SequenceClassifier.from_config(cfg.model, classifier_config(cfg), vocab_size=vocab_size,
                                               pad_id=ids["pad"])
    else:
        model = build_model(cfg.model)
    engine = build_engine(cfg, model, world=world, plan=plan, loss_over="step_targets")
    b = plan.batch
    loader = FinetuneLoader(features, dp_rank=engine.dp_rank, dp_size=engine.dp_size,
                            global_batch_size=b.global_batch_size, micro_batch_size=b.micro_batch_size,
                            seed=cfg.train.seed, pad_id=ids["pad"])
    rows = features.row_examples if getattr(features, "packed", False) else None
    return _Side(name, engine, loader, pad_id=ids["pad"], row_examples=rows), model


def _group_worker(world_size: int, group: dict, steps: int, warmup: int) -> dict:
    from llmscale.dist import discover_world

    t0 = time.perf_counter()
    world = discover_world()
    ids, vocab = group["ids"], group["vocab_size"]
    sides = [_pretrain_side(group["pretrain"], world_size, world, ids)]
    packed_side = hook = None
    for name, cfg_dict, feats in group["finetune"]:
        side, model = _finetune_side(name, cfg_dict, feats, world_size, world, ids, vocab)
        sides.append(side)
        if name == "packed":
            packed_side = side
            hook = side.watch_model_inputs(model)
    packed_skipped = None
    for i in range(warmup + steps):
        for side in sides if i % 2 == 0 else sides[::-1]:
            side.step(record=i >= warmup)
        if i == 0 and hook is not None:
            hook.remove()
            missing = [k for k in PACKING_KEYS if k not in packed_side.seen_kwargs]
            if missing:  # the rows would run as one sequence each: not what packing computes
                packed_skipped = (f"Engine.train_step does not hand {'/'.join(missing)} to the model (it passes "
                                  f"{', '.join(sorted(packed_side.seen_kwargs)) or 'nothing'} besides input_ids): "
                                  f"packed rows would attend across examples")
                sides.remove(packed_side)
    for side in sides:
        side.loader.close()
    out = {side.name: side.result() for side in sides}
    out["wall_s"] = time.perf_counter() - t0  # engines built, warm-up and measured steps of every side
    if packed_skipped:
        out["packed_skipped"] = packed_skipped
    return out


def _worker(rank: int, world_size: int, groups: list[dict], steps: int, warmup: int) -> list[dict]:
    out = []
    for group in groups:
        out.append(_group_worker(world_size, group, steps, warmup))
        log.info("rank %d: %s done", rank, group["model"])
    return out


# --------------------------------------------------------------------------- aggregation


def _aggregate(per_rank: list[dict]) -> dict:
    """One side over all ranks: per step the slowest rank's time and the counts summed."""
    n = len(per_rank[0]["step_s"])
    times = [max(r["step_s"][i] for r in per_rank) for i in range(n)]
    counts = {k: [sum(r["counts"][k][i] for r in per_rank) for i in range(n)] for k in COUNT_KEYS}

    def rate(key: str) -> float:
        return statistics.median(c / t for c, t in zip(counts[key], times))

    real, padded = sum(counts["real_tokens"]), sum(counts["padded_tokens"])
    return {
        "examples_per_s": rate("examples"),
        "real_tokens_per_s": rate("real_tokens"),
        "padded_tokens_per_s": rate("padded_tokens"),
        "target_tokens_per_s": rate("targets"),
        "padding_fraction": 1.0 - real / padded,
        "per_step": {k: statistics.fmean(v) for k, v in counts.items()},
        "step_time_s": _summary(times),
        "breakdown_s": {k: statistics.fmean(v) for k, v in per_rank[0]["timings"].items()},
    }


def _pretrain_entry(agg: dict, *, objective: str, seq_len: int) -> dict:
    return {
        "objective": objective, "seq_len": seq_len,
        "tokens_per_step": agg["per_step"]["padded_tokens"],
        "tokens_per_s": agg["padded_tokens_per_s"],  # window positions, as bench train counts them
        "real_tokens_per_s": agg["real_tokens_per_s"],
        "step_time_s": agg["step_time_s"], "breakdown_s": agg["breakdown_s"],
    }


def _finetune_entry(agg: dict, task: str) -> dict:
    out = {k: agg[k] for k in ("examples_per_s", "real_tokens_per_s", "padded_tokens_per_s")}
    if task == "sft":
        out["target_tokens_per_s"] = agg["target_tokens_per_s"]
    out.update(padding_fraction=agg["padding_fraction"], per_step=agg["per_step"], step_time_s=agg["step_time_s"],
               breakdown_s=agg["breakdown_s"])
    return out


# --------------------------------------------------------------------------- main


def _prepare(root: Path, *, vocab_size: int, seq_len: int, max_len: int) -> dict:
    """The tokenizer, the two pretraining datasets and the fine-tune features (built once, in this process)."""
    from llmscale.data.finetune import Example, LabelMap, encode_classification, encode_sft, read_sft
    from llmscale.data.prepare import prepare_dataset
    from llmscale.data.sources import iter_documents
    from llmscale.data.tokenizer import train_tokenizer

    tok = train_tokenizer([TEXT_CORPUS], root / "tokenizer", vocab_size=vocab_size)
    data = {}
    for fmt in ("gpt", "bert"):
        m = prepare_dataset([TEXT_CORPUS], root / fmt, tokenizer=tok, format=fmt, seq_len=seq_len,
                            val_fraction=0.01, num_proc=1)
        data[fmt] = {"path": str(root / fmt), "train_tokens": m.num_tokens("train"),
                     "tokenizer_hash": m.tokenizer_hash[:12]}
    examples = [Example(text, text_label(text), source)
                for source, text in iter_documents([TEXT_CORPUS], doc_split="paragraph")]
    classify = encode_classification(examples, tok, LabelMap(["0", "1"]), max_len=max_len, family="bert")
    pairs = read_sft([SFT_CORPUS])
    sft = encode_sft(pairs, tok, max_len=max_len)
    packed = encode_sft(pairs, tok, max_len=max_len, packing=True)
    ids = {"pad": tok.pad_id, "mask": tok.mask_id, "cls": tok.cls_id, "sep": tok.sep_id}
    return {"tokenizer": tok, "tokenizer_dir": str(root / "tokenizer"), "data": data, "classify": classify,
            "sft": sft, "packed": packed, "ids": ids}


def _groups(prep: dict, *, world_size: int, seq_len: int, max_len: int, mbs: int, packing: bool) -> list[dict]:
    vocab = prep["tokenizer"].vocab_size
    common = {"ids": prep["ids"], "vocab_size": vocab}
    ft = dict(max_len=max_len, mbs=mbs, world_size=world_size, tokenizer=prep["tokenizer_dir"])
    gpt_ft = [("dynamic", _finetune_config(preset=GPT_PRESET, task="sft", **ft), prep["sft"])]
    if packing:
        gpt_ft.append(("packed", _finetune_config(preset=GPT_PRESET, task="sft", packing=True, **ft), prep["packed"]))
    pre = dict(seq_len=seq_len, mbs=mbs, world_size=world_size, vocab_size=vocab)
    return [
        {"model": BERT_PRESET, "task": "classify", **common,
         "pretrain": _pretrain_config(preset=BERT_PRESET, fmt="bert", data=prep["data"]["bert"]["path"], **pre),
         "finetune": [("dynamic", _finetune_config(preset=BERT_PRESET, task="classify", **ft), prep["classify"])]},
        {"model": GPT_PRESET, "task": "sft", **common,
         "pretrain": _pretrain_config(preset=GPT_PRESET, fmt="gpt", data=prep["data"]["gpt"]["path"], **pre),
         "finetune": gpt_ft},
    ]


def _ratio(finetune: dict, pretrain: dict, *, target: float) -> dict:
    r = finetune["real_tokens_per_s"] / pretrain["tokens_per_s"]
    return {"finetune_real_tokens_per_s": finetune["real_tokens_per_s"],
            "pretrain_tokens_per_s": pretrain["tokens_per_s"], "ratio": r, "target": target,
            "meets_target": r >= target}


def run_cpu(prep: dict, *, nprocs: list[int], steps: int, warmup: int, seq_len: int, max_len: int, mbs: int,
            target: float) -> dict:
    from llmscale.dist import CPU_RANK_ENV, run_local_ranks

    no_packing = packing_support()
    runs, ratios = [], []
    for n in nprocs:
        groups = _groups(prep, world_size=n, seq_len=seq_len, max_len=max_len, mbs=mbs, packing=no_packing is None)
        res = run_local_ranks(_worker, n, args=(groups, steps, warmup), timeout=1800, env=CPU_RANK_ENV)
        for gi, group in enumerate(groups):
            per_rank = [r[gi] for r in res]
            pre = _pretrain_entry(_aggregate([r["pretrain"] for r in per_rank]),
                                  objective="masked LM" if group["task"] == "classify" else "causal LM",
                                  seq_len=seq_len)
            ft = _finetune_entry(_aggregate([r["dynamic"] for r in per_rank]), group["task"])
            entry: dict[str, Any] = {
                "model": group["model"], "task": group["task"], "nproc": n, "micro_batch_size": mbs,
                "global_batch_size": mbs * n, "max_len": max_len, "finetune": ft, "pretrain": pre,
            }
            ratio = {"model": group["model"], "task": group["task"], "variant": "dynamic padding", "nproc": n,
                     **_ratio(ft, pre, target=target)}
            ratios.append(ratio)
            log.info("%s %s x%d: fine-tune %.0f real tokens/s (%.0f padded, %.0f examples/s), pretraining %.0f "
                     "tokens/s: ratio %.2f (target %.2f)", group["model"], group["task"], n, ft["real_tokens_per_s"],
                     ft["padded_tokens_per_s"], ft["examples_per_s"], pre["tokens_per_s"], ratio["ratio"], target)
            if group["task"] == "sft":
                why = no_packing or per_rank[0].get("packed_skipped")
                if why:
                    entry["finetune_packed"] = {"real_tokens_per_s": None, "skipped": why}
                    ratios.append({**ratio, "variant": "packing", "finetune_real_tokens_per_s": None, "ratio": None,
                                   "meets_target": None, "skipped": why})
                else:
                    packed = entry["finetune_packed"] = _finetune_entry(_aggregate([r["packed"] for r in per_rank]),
                                                                        "sft")
                    ratios.append({**ratio, "variant": "packing", **_ratio(packed, pre, target=target)})
                    log.info("%s sft packed x%d: %.0f real tokens/s, padding %.3f (dynamic %.3f): ratio %.2f",
                             group["model"], n, packed["real_tokens_per_s"], packed["padding_fraction"],
                             ft["padding_fraction"], ratios[-1]["ratio"])
            entry["wall_s"] = round(max(r["wall_s"] for r in per_rank), 1)
            runs.append(entry)
    skipped = [r["skipped"] for r in ratios if r.get("skipped")]
    return {"runs": runs, "ratios": ratios,
            "packing_throughput": {"measured": not skipped, "reason": skipped[0] if skipped else None}}


def run(*, nprocs: list[int], steps: int = 10, warmup: int = 3, micro_batch_size: int = 16, max_len: int = 128,
        seq_len: int = 128, vocab_size: int = 1024, target: float = 0.80) -> dict:
    """The whole benchmark on the CPU: for each process count in ``nprocs``, both models' fine-tune and
    pretraining steps, ``warmup`` unmeasured then ``steps`` measured ones each."""
    import torch

    from llmscale.config_finetune import FinetuneTrainConfig

    if steps < 1 or warmup < 1:
        from llmscale.errors import ConfigError

        raise ConfigError(f"--steps ({steps}) and --warmup ({warmup}) must be >= 1 (the first step checks what "
                          f"the engine hands the model).")
    t0 = time.time()
    report: dict[str, Any] = {
        "benchmark": "finetune",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "threads_per_rank": 1},
        "steps": steps, "warmup": warmup, "micro_batch_size": micro_batch_size, "max_len": max_len,
        "seq_len": seq_len, "target_ratio": target,
    }
    try:
        import deepspeed

        report["machine"]["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    saved = {k: os.environ.get(k) for k in ("DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES")}
    os.environ.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")  # CPU ranks, even on a GPU machine
    try:
        with tempfile.TemporaryDirectory(prefix="llmscale-bench-ft-") as tmp:
            prep = _prepare(Path(tmp), vocab_size=vocab_size, seq_len=seq_len, max_len=max_len)
            seed = FinetuneTrainConfig().seed  # the fine-tune runs' train.seed: their loaders' order
            report["data"] = _data_report(prep)
            report["padding"] = {
                "classify": padding_fraction(prep["classify"], micro_batch_size=micro_batch_size, seed=seed),
                "sft_dynamic": padding_fraction(prep["sft"], micro_batch_size=micro_batch_size, seed=seed),
                "sft_packed": padding_fraction(prep["packed"], micro_batch_size=micro_batch_size, seed=seed),
            }
            report.update(run_cpu(prep, nprocs=nprocs, steps=steps, warmup=warmup, seq_len=seq_len, max_len=max_len,
                                  mbs=micro_batch_size, target=target))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    report["wall_s"] = round(time.time() - t0, 1)
    return report


def _data_report(prep: dict) -> dict:
    import numpy as np

    tok, c, s, p = prep["tokenizer"], prep["classify"], prep["sft"], prep["packed"]
    return {
        "tokenizer": {"model_type": tok.model_type, "vocab_size": tok.vocab_size, "hash": tok.hash[:12],
                      "trained_on": TEXT_CORPUS.name},
        "classify": {"source": TEXT_CORPUS.name, "unit": "paragraph", "examples": len(c),
                     "label_counts": {lab: int((c.labels == i).sum()) for i, lab in enumerate(("0", "1"))},
                     "truncated": c.num_truncated, "mean_tokens": float(c.lengths.mean())},
        "sft": {"source": SFT_CORPUS.name, "examples": len(s), "dropped_no_target": s.num_no_target,
                "truncated": s.num_truncated, "mean_tokens": float(s.lengths.mean()), "packed_rows": len(p),
                "examples_per_packed_row": float(np.mean([len(r) for r in p.row_examples]))},
        "pretrain": {fmt: {"source": TEXT_CORPUS.name, "train_tokens": d["train_tokens"],
                           "tokenizer_hash": d["tokenizer_hash"]} for fmt, d in prep["data"].items()},
    }
