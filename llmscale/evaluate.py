"""The scoring loops shared by training's validation and the evaluation job.

:func:`lm_validation` scores a loader's validation split with an engine: the loss is total nats over all
targets divided by their count (sums reduced as (sum, count) over the data-parallel ranks by
:meth:`llmscale.engine.Engine.eval_loss`, never a mean of per-batch means), perplexity its exp, and bits
per byte the total nats / ln 2 / the UTF-8 bytes of those targets' text, where the bytes per token come
from the dataset manifest (``splits.val.num_bytes / num_tokens``), so they compare across tokenizers.
A split of at most :data:`FULL_EVAL_TOKENS` tokens is scored whole (exact numbers); a larger one on
``max_batches`` micro-batches per rank, always the same ones.

:func:`classification_metrics` turns a confusion matrix into accuracy, precision / recall / F1 per class and
macro-averaged, and Matthews' correlation; :func:`classification_validation` builds that matrix with an engine
over a loader's validation examples, each counted exactly once over the data-parallel ranks (padding rows
carry label -100 and count nowhere), plus the mean cross-entropy (unweighted) over them.

What does not live here: when to validate and where the numbers are logged (:mod:`llmscale.trainer`).
"""
from __future__ import annotations

import math
from typing import Any, Optional

FULL_EVAL_TOKENS = 1 << 18  # val splits up to this size are evaluated whole, every time


def lm_validation(engine: Any, loader: Any, *, max_batches: Optional[int]) -> dict[str, Any]:
    """``{val_loss, val_ppl, val_bpb, val_tokens, val_full}`` (the same on every rank), {} for an empty split.
    ``max_batches`` applies only to a split larger than :data:`FULL_EVAL_TOKENS`. Collective."""
    import torch

    full = loader.val_num_tokens <= FULL_EVAL_TOKENS
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for batch in loader.eval_batches(None if full else max_batches):
            s, k = engine.eval_loss(batch)
            loss_sum += s
            n += k
    if n == 0:
        return {}
    loss = loss_sum / n
    val_tokens, val_bytes = loader.val_num_tokens, loader.val_num_bytes
    bpb = None
    if val_bytes > 0 and val_tokens > 0:
        bpb = loss_sum / math.log(2) / (n * val_bytes / val_tokens)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_bpb": bpb, "val_tokens": n,
            "val_full": full}


def classification_metrics(confusion: Any, *, labels: Optional[list] = None) -> dict[str, Any]:
    """Metrics of a confusion matrix ``confusion[gold][predicted]`` (counts): accuracy, macro precision / recall /
    F1 (classes with no gold and no predicted example are left out of the macro mean), per-class figures and
    Matthews' correlation coefficient (the multi-class form). A class with nothing predicted has precision 0."""
    import numpy as np

    cm = np.asarray(confusion, dtype=np.float64)
    total = cm.sum()
    tp = np.diag(cm)
    gold, pred = cm.sum(axis=1), cm.sum(axis=0)
    precision = np.divide(tp, pred, out=np.zeros_like(tp), where=pred > 0)
    recall = np.divide(tp, gold, out=np.zeros_like(tp), where=gold > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = (gold + pred) > 0
    c = tp.sum()
    mcc_den = math.sqrt(max(total**2 - (pred**2).sum(), 0.0) * max(total**2 - (gold**2).sum(), 0.0))
    names = labels if labels is not None else list(range(len(tp)))
    return {
        "accuracy": float(c / total) if total else 0.0,
        "precision_macro": float(precision[present].mean()) if present.any() else 0.0,
        "recall_macro": float(recall[present].mean()) if present.any() else 0.0,
        "f1": float(f1[present].mean()) if present.any() else 0.0,
        "mcc": float((c * total - (pred * gold).sum()) / mcc_den) if mcc_den > 0 else 0.0,
        "per_class": {str(n): {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(g)}
                      for n, p, r, f, g in zip(names, precision, recall, f1, gold)},
        "confusion": cm.astype(int).tolist(),
        "examples": int(total),
    }


def classification_validation(engine: Any, loader: Any, *, num_labels: int, labels: Optional[list] = None,
                              max_batches: Optional[int] = None) -> dict[str, Any]:
    """``{"val_loss", "accuracy", "f1", ...}`` over the loader's validation examples (the same on every rank).
    Collective: every rank must call it with its own share."""
    import torch
    import torch.nn.functional as F

    cm = torch.zeros(num_labels, num_labels, dtype=torch.float64, device=engine.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    for batch in loader.eval_batches(max_batches or None):
        logits = engine.predict(batch).logits.float()
        gold = batch["labels"].to(engine.device)
        keep = gold != -100
        if keep.any():
            loss_sum += F.cross_entropy(logits[keep], gold[keep], reduction="sum").double()
            idx = gold[keep] * num_labels + logits[keep].argmax(-1)
            cm += torch.bincount(idx, minlength=num_labels * num_labels).reshape(num_labels, num_labels).double()
    packed = engine.all_reduce_dp(torch.cat([cm.flatten(), loss_sum[None]]))
    cm, loss_sum = packed[:-1].reshape(num_labels, num_labels), float(packed[-1])
    out = classification_metrics(cm.cpu().numpy(), labels=labels)
    n = out["examples"]
    out["val_loss"] = loss_sum / n if n else float("nan")
    return out


def sft_validation(engine: Any, loader: Any, *, max_batches: Optional[int] = None) -> dict[str, Any]:
    """``{val_loss, val_ppl, val_tokens}`` over a fine-tune loader's validation rows: total nats over every
    target token (response tokens and closing eos) / their count, the same on every rank. Collective."""
    loss_sum, n = 0.0, 0
    for batch in loader.eval_batches(max_batches or None):
        s, k = engine.eval_loss(batch)  # summed over the data-parallel ranks
        loss_sum += s
        n += k
    if n == 0:
        return {}
    loss = loss_sum / n
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": n}
