"""Log-likelihood scoring of a single-device causal LM: sliding-window perplexity and continuations.

Both the eval job (:mod:`llmscale.jobs.eval`) and the lm-evaluation-harness adapter
(:mod:`llmscale.harness`) score through these functions, so their numbers agree by construction.

Sliding windows (:func:`rolling_windows`)
-----------------------------------------
A *stream* is the token ids of one document with a prefix token in front (the end-of-document id, as
between documents in training data), so every token of the text is a target, the first one included.
Targets are stream positions ``1 .. L-1``; each is scored **exactly once**, every window feeding at most
``context`` (C) tokens. The first window feeds positions ``[0, C)`` and scores every target it can,
``1 .. C``, each with all of its preceding tokens. Then, with ``align="start"`` (the default):

* window k feeds ``[k*stride, k*stride + C)`` and scores the targets the previous window did not reach,
  so each target sees at least ``C - stride`` tokens before it; the last window is cut at the end.
  These are exactly the windows of the transformers documentation's recipe (``perplexity.md``) run with
  ``max_length = context + 1`` and the same stride; ``stride == context`` gives the disjoint windows of
  nanoGPT / Megatron evaluation (x = t[i:i+C], y = t[i+1:i+C+1]).

With ``align="end"`` every further window scores the next ``stride`` targets ``[a, b)`` from the ``C``
positions ``[b-1-C, b-1)`` just before them: the same as "start" except that the last window gets a full
context. With ``context = stride = max_length`` these are lm-evaluation-harness's ``loglikelihood_rolling``
windows (prefix token eot, context_len 1). A smaller stride gives every target more context.

Numbers are sums (nats, float64) and counts per window; :func:`score_windows` returns them per window so
callers reduce them in window order over any number of ranks (the same total on 1 or N processes and for
any micro-batch size, up to the model's own floating-point noise).

What does not live here: reading text and choosing what to score (:mod:`llmscale.jobs.eval`), the
harness's request objects (:mod:`llmscale.harness`), training-time validation (:mod:`llmscale.evaluate`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Window:
    """One forward pass over ``stream[start:end]`` scoring the targets ``stream[score_from:end+1]``
    (each predicted from the position before it, so ``score_from > start``)."""

    doc: int
    start: int
    end: int
    score_from: int

    @property
    def num_targets(self) -> int:
        return self.end + 1 - self.score_from


def rolling_windows(length: int, *, context: int, stride: int, doc: int = 0, align: str = "start") -> list[Window]:
    """The windows over a stream of ``length`` ids (prefix included) that score every target 1..length-1
    once (see the module doc for ``align``). A stream of fewer than 2 ids has no target: no window."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}.")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}.")
    if align not in ("start", "end"):
        raise ValueError(f"align must be 'start' or 'end', got {align!r}.")
    if length < 2:
        return []
    first_end = min(context, length - 1)
    out = [Window(doc, 0, first_end, 1)]
    a = first_end + 1  # next target
    k = 1
    while a < length:
        if align == "start":  # the transformers recipe: window k starts at k * stride
            start = k * stride
            end = min(start + context, length - 1)
        else:  # the next `stride` targets, each window full
            end = min(a + stride, length) - 1
            start = max(0, end - context)
        out.append(Window(doc, start, end, a))
        a, k = end + 1, k + 1
    return out


def _forward_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits of a causal LM (llmscale's, or a transformers one)."""
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def score_windows(model: Any, streams: Sequence[Sequence[int]], windows: Sequence[Window], *,
                  batch_size: int, pad_id: int = 0) -> list[tuple[float, int, int]]:
    """``(nats, targets, correct)`` per window, in the order given: the summed negative log-likelihood (float64)
    of its targets, how many, and how many of them are the model's argmax. Windows are batched ``batch_size``
    at a time, right-padded (a causal model's earlier positions do not see the padding)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    device = next(model.parameters()).device
    results: list[tuple[float, int, int]] = []
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        T = max(w.end - w.start for w in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        for r, w in enumerate(chunk):
            ids[r, :w.end - w.start] = torch.as_tensor(streams[w.doc][w.start:w.end], dtype=torch.long)
        logp = torch.log_softmax(_forward_logits(model, ids.to(device)).float(), dim=-1)  # (B, T, V)
        for r, w in enumerate(chunk):
            pos = torch.arange(w.score_from - 1 - w.start, w.end - w.start, device=device)  # predicting positions
            tgt = torch.as_tensor(streams[w.doc][w.score_from:w.end + 1], dtype=torch.long, device=device)
            lp = logp[r, pos]  # (n, V)
            nats = -lp.gather(1, tgt[:, None]).squeeze(1).double().sum().item()
            correct = int((lp.argmax(-1) == tgt).sum().item())
            results.append((nats, len(tgt), correct))
    return results


def stream_windows(streams: Sequence[Sequence[int]], *, context: int, stride: int,
                   align: str = "start") -> list[Window]:
    """:func:`rolling_windows` of every stream, in stream order."""
    out: list[Window] = []
    for d, s in enumerate(streams):
        out.extend(rolling_windows(len(s), context=context, stride=stride, doc=d, align=align))
    return out


def score_stream(model: Any, stream: Sequence[int], *, context: int, stride: int, batch_size: int = 8,
                 align: str = "start") -> tuple[float, int]:
    """``(total nats, targets)`` of one stream (prefix included) on one process."""
    windows = rolling_windows(len(stream), context=context, stride=stride, align=align)
    res = score_windows(model, [stream], windows, batch_size=batch_size)
    return sum(r[0] for r in res), sum(r[1] for r in res)


@torch.no_grad()
def score_continuations(model: Any, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, max_len: int,
                        batch_size: int = 8, pad_id: int = 0) -> list[tuple[float, bool]]:
    """``(log-likelihood, is_greedy)`` of each continuation given its context: the summed log-probability of the
    continuation's tokens, and whether each of them is the argmax. The model sees the last ``max_len`` ids of
    ``context + continuation[:-1]`` (older context is cut from the left, as lm-evaluation-harness does)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    device = next(model.parameters()).device
    out: list[tuple[float, bool]] = []
    for i in range(0, len(requests), batch_size):
        chunk = requests[i:i + batch_size]
        inputs, conts = [], []
        for ctx, cont in chunk:
            if not cont:
                raise ValueError("a continuation has no tokens: nothing to score.")
            full = list(ctx) + list(cont)
            if len(full) < 2:
                raise ValueError("context + continuation must hold at least 2 tokens (give a context, e.g. the "
                                 "end-of-document id).")
            inputs.append(full[:-1][-max_len:])
            conts.append(list(cont))
        T = max(len(x) for x in inputs)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        for r, x in enumerate(inputs):
            ids[r, :len(x)] = torch.as_tensor(x, dtype=torch.long)
        logp = F.log_softmax(_forward_logits(model, ids.to(device)).float(), dim=-1)
        for r, (x, cont) in enumerate(zip(inputs, conts)):
            n = len(cont)
            lp = logp[r, len(x) - n:len(x)]  # (n, V): the positions predicting the continuation
            tgt = torch.as_tensor(cont, dtype=torch.long, device=device)
            ll = lp.gather(1, tgt[:, None]).squeeze(1).double().sum().item()
            out.append((ll, bool((lp.argmax(-1) == tgt).all().item())))
    return out


def rank_share(n: int, *, rank: int, world_size: int) -> range:
    """Indices ``rank, rank + world_size, ...`` below n: every item on exactly one rank, none twice, none
    padded in (ranks may get one item fewer)."""
    return range(rank, n, world_size)


def merge_ranked(parts: Sequence[Sequence[Any]], n: int) -> list[Any]:
    """Undo :func:`rank_share`: ``parts[r]`` holds the results of rank r's indices in order; returns all n in
    index order."""
    world = len(parts)
    out: list[Optional[Any]] = [None] * n
    for r, part in enumerate(parts):
        idx = list(rank_share(n, rank=r, world_size=world))
        if len(idx) != len(part):
            raise RuntimeError(f"rank {r} returned {len(part)} results for {len(idx)} items.")
        for i, v in zip(idx, part):
            out[i] = v
    return out
