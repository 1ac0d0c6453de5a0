"""Autoregressive sampling with a KV cache (GPT) or the recurrent state (LSTM): greedy, temperature,
top-k, top-p, seeded.

    ids = generate(model, prompt_ids, max_new_tokens=100, temperature=0.8, top_k=50, top_p=0.95, seed=1,
                   eos_id=tok.eos_id)                 # (B, T0 + n) tensor: prompt followed by new tokens

Sampling order per step: logits (fp32) / temperature -> keep the top_k largest -> keep the smallest set whose
probability reaches top_p (the most likely token always stays) -> sample with a ``torch.Generator`` seeded
by ``seed`` (same seed, same model, same device: same tokens). ``temperature=0`` is greedy (argmax).

Longer than the model's context (``model.max_seq_len``; an LSTM has no limit): ``overflow="slide"`` (the
default) keeps generating with the last ``max_seq_len`` tokens as context — once the window is full, each
step recomputes the window, since learned positions cannot be shifted inside a cache (this is exactly what
the no-cache path computes); a prompt longer than the window is cut to its last ``max_seq_len`` tokens.
``overflow="error"`` raises instead when prompt + max_new_tokens does not fit.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional

import torch
import torch.nn as nn

from llmscale.log import get_logger

log = get_logger(__name__)


def filter_logits(logits: torch.Tensor, *, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """logits (B, V) with everything outside the top-k / nucleus set to -inf."""
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token
        drop_sorted = before >= top_p  # the first token has before == 0, so it always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Next token ids (B,) from the last-position logits (B, V)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def context_limit(model: nn.Module) -> Optional[int]:
    """Most tokens the model can condition on (None: unbounded, the LSTM)."""
    cfg = model.config
    return None if cfg.family == "lstm" else cfg.max_seq_len


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    eos_id: Optional[int] = None,
    use_cache: bool = True,
    overflow: Literal["slide", "error"] = "slide",
    on_token: Optional[Callable[[torch.Tensor], None]] = None,
) -> torch.Tensor:
    """Continue ``input_ids`` ((B, T0) tensor, or one prompt as a list of ids) by up to ``max_new_tokens``.

    Returns (B, T0' + n) with T0' the (possibly cut, see the module doc) prompt length. Generation stops
    early once every row has produced ``eos_id``; after its eos a row is filled with ``eos_id``.
    ``on_token(ids)`` is called with each step's new tokens (B,), e.g. to stream text. The model is put in
    eval mode for the call and restored after."""
    if getattr(model.config, "family", None) == "bert":
        raise ValueError("generate needs a causal LM (model.family gpt or lstm); BERT is a masked LM.")
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor([list(input_ids)], dtype=torch.long)
    device = next(model.parameters()).device
    ids = input_ids.to(device=device, dtype=torch.long)
    if ids.dim() != 2 or ids.size(1) == 0:
        raise ValueError(f"input_ids must be a non-empty (B, T) batch of prompts, got shape {tuple(ids.shape)}.")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    if overflow not in ("slide", "error"):
        raise ValueError(f"overflow must be 'slide' or 'error', got {overflow!r}.")
    limit = context_limit(model)
    if limit is not None:
        if overflow == "error" and ids.size(1) + max_new_tokens > limit:
            raise ValueError(
                f"prompt ({ids.size(1)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"max_seq_len={limit}: lower max_new_tokens, shorten the prompt, or use overflow='slide'.")
        if ids.size(1) > limit:
            log.info("prompt of %d tokens cut to the model's last %d (max_seq_len)", ids.size(1), limit)
            ids = ids[:, -limit:]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        return _loop(model, ids, max_new_tokens=max_new_tokens, limit=limit, use_cache=use_cache,
                     sample=lambda lg: sample_next(lg, temperature=temperature, top_k=top_k, top_p=top_p,
                                                   generator=generator),
                     eos_id=eos_id, on_token=on_token)
    finally:
        model.train(was_training)


def _loop(model, ids, *, max_new_tokens, limit, use_cache, sample, eos_id, on_token) -> torch.Tensor:
    B = ids.size(0)
    out = [ids]
    seq = ids
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    cache = None
    logits = None
    for step in range(max_new_tokens):
        if use_cache:
            if cache is None:
                cache = model.new_cache(B, limit)
                logits = model.forward_cached(seq, cache)[:, -1]
            # else: logits were computed after the previous token was appended
        else:
            window = seq if limit is None else seq[:, -limit:]
            logits = model(window).logits[:, -1]
        nxt = sample(logits)  # (B,)
        if eos_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            finished |= nxt == eos_id
        out.append(nxt[:, None])
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if on_token is not None:
            on_token(nxt)
        if eos_id is not None and bool(finished.all()):
            break
        if use_cache and step + 1 < max_new_tokens:
            if limit is not None and cache.pos >= limit:
                # window full: positions cannot slide inside the cache, recompute the last `limit` tokens
                cache = model.new_cache(B, limit)
                logits = model.forward_cached(seq[:, -limit:], cache)[:, -1]
            else:
                logits = model.forward_cached(nxt[:, None], cache)[:, -1]
    return torch.cat(out, dim=1)


def generate_text(model, tokenizer: Any, prompt: str, *, max_new_tokens: int = 100,
                  temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  greedy: bool = False, seed: Optional[int] = None) -> dict:
    """``{"prompt_ids", "new_ids", "text", "completion"}`` for one prompt. ``tokenizer``: anything with
    ``encode(text) -> ids``, ``decode(ids) -> text`` and ``eos_id`` (generation stops at eos; an empty
    prompt starts after an eos, i.e. at a document start)."""
    eos = getattr(tokenizer, "eos_id", None)
    prompt_ids = tokenizer.encode(prompt)
    start = prompt_ids if prompt_ids else ([eos] if eos is not None else [])
    if not start:
        raise ValueError("the prompt is empty and the tokenizer has no eos token to start from: give --prompt TEXT.")
    out = generate(model, start, max_new_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                   top_k=top_k, top_p=top_p, seed=seed, eos_id=eos)
    limit = context_limit(model)
    kept = len(start) if limit is None else min(len(start), limit)  # generate() keeps the prompt's last `limit`
    new = out[0].tolist()[kept:]
    if eos is not None and eos in new:
        new = new[:new.index(eos)]
    completion = tokenizer.decode(new)
    return {"prompt_ids": prompt_ids, "new_ids": new, "completion": completion, "text": prompt + completion}
