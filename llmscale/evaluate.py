"""The scoring loops shared by training's validation and the evaluation job.

:func:`lm_validation` scores a loader's validation split with an engine: the loss is total nats over all
targets divided by their count (sums reduced as (sum, count) over the data-parallel ranks by
:meth:`llmscale.engine.Engine.eval_loss`, never a mean of per-batch means), perplexity its exp, and bits
per byte the total nats / ln 2 / the UTF-8 bytes of those targets' text, where the bytes per token come
from the dataset manifest (``splits.val.num_bytes / num_tokens``), so they compare across tokenizers.
A split of at most :data:`FULL_EVAL_TOKENS` tokens is scored whole (exact numbers); a larger one on
``max_batches`` micro-batches per rank, always the same ones.

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
