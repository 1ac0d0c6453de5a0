"""Supervised fine-tuning (SFT) data: prompt/response pairs -> causal-LM rows whose targets are the responses.

    exs = read_sft(["chat.jsonl"], template="### Question:\\n{prompt}\\n### Answer:\\n{response}")
    feats = encode_sft(exs, tok, max_len=512, packing=True)

Records are JSONL objects (or TSV/CSV rows, :mod:`llmscale.data.records`) with a prompt and a response
field (dotted names reach into nested objects).

Template. ``template`` is a string holding ``{prompt}`` and ``{response}`` exactly once each,
``{prompt}`` first; ``{{`` and ``}}`` are literal braces; any other ``{...}`` is an error. Everything
up to ``{response}`` (the prompt substituted) is the *prompt part*; ``{response}`` and the text after
it are the *response part*. So in ``"User: {prompt}\\nAssistant: {response}"`` the text
``"User: ... \\nAssistant: "`` is prompt (never a target) and only the response is learned. Without a
template the two fields are used as they are.

Rows. The prompt part and the response part are tokenized separately (so the boundary is exact) and
a row is ``input_ids = prompt_ids + response_ids + [eos]``. Labels follow llmscale's causal-LM
convention (:mod:`llmscale.data.collate`, ``GPT.forward``): they are *pre-shifted*, aligned with the
inputs, ``labels[t]`` is the target of position ``t``, i.e. the next token ``input_ids[t + 1]``, or
-100. A position is a target exactly when the token it predicts is a response token or the final eos:
``labels[t] = input_ids[t + 1]`` for ``P - 1 <= t < n - 1`` (P prompt tokens, n row tokens), -100
elsewhere; the last position (the eos as input) has no target. The eos id must differ from pad (pads
are never targets anyway: their labels are -100). With an empty prompt the first response token has
no position before it and is not a target.

Truncation cuts rows longer than ``max_len`` from the right (counted); a row left with no target (the
prompt fills ``max_len``) is dropped and counted; blank responses are skipped and counted.

Packing (``packing=True``): rows of at most ``max_len`` tokens each hold several whole examples
(best-fit decreasing on their lengths; examples keep their order inside a row, rows are ordered by
their first example). Each row carries ``position_ids`` restarting at 0 for every example and
``doc_ids`` (the index of the example within the row, -1 on padding) so a model can keep attention
inside each example. Labels are per example, so the last token of one example never predicts the
first of the next: the packed rows carry exactly the (input, target) pairs of the unpacked rows.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from llmscale.data.classify_data import encode_texts
from llmscale.data.records import TABLE_FORMATS, PathLike, as_paths, detect_format, get_field, iter_rows
from llmscale.errors import ConfigError, FinetuneDataError
from llmscale.log import get_logger

log = get_logger(__name__)

IGNORE = -100


@dataclass(frozen=True)
class SFTExample:
    """One prompt/response pair, the template already applied (``prompt`` is the whole prompt part)."""

    prompt: str
    response: str
    source: str


def parse_template(template: str) -> tuple[list[tuple[str, Optional[str]]], list[tuple[str, Optional[str]]]]:
    """(prompt-part pieces, response-part pieces): each a list of (literal text, field or None)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"template {template!r}: {e}. Write literal braces as {{{{ and }}}}.") from None
    pieces: list[tuple[str, Optional[str]]] = []
    for literal, name, spec, conv in parsed:
        if name is not None and (name not in ("prompt", "response") or spec or conv):
            shown = "{" + name + ("!" + conv if conv else "") + (":" + spec if spec else "") + "}"
            raise ConfigError(f"template {template!r}: {shown} is not a placeholder; use {{prompt}} and {{response}} "
                              f"(literal braces: {{{{ }}}}).")
        pieces.append((literal, name))
    names = [n for _, n in pieces if n is not None]
    if names != ["prompt", "response"]:
        raise ConfigError(f"template {template!r} must hold {{prompt}} and then {{response}}, each once (it has "
                          f"{', '.join('{' + n + '}' for n in names) or 'no placeholder'}).")
    cut = next(i for i, (_, n) in enumerate(pieces) if n == "response")
    return pieces[:cut] + [(pieces[cut][0], None)], [("", "response")] + pieces[cut + 1:]


def _fill(pieces: list[tuple[str, Optional[str]]], values: dict[str, str]) -> str:
    return "".join(lit + (values[n] if n is not None else "") for lit, n in pieces)


def _field_text(rec: dict, name: str, source: str, option: str) -> str:
    v = get_field(rec, name, source, option=option)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise FinetuneDataError(f"{source}: the field {name!r} holds a {type(v).__name__}, not text. Fix that record "
                                f"or set {option}.")
    return v


def read_sft(
    paths: PathLike | Sequence[PathLike],
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    template: Optional[str] = None,
    format: Optional[str] = None,
) -> list[SFTExample]:
    """Every prompt/response pair of ``paths`` (in order), the template applied."""
    parts = parse_template(template) if template is not None else None
    out: list[SFTExample] = []
    for path in as_paths(paths):
        fmt = format or detect_format(path)
        if fmt not in TABLE_FORMATS:
            raise FinetuneDataError(f"{path}: SFT data is JSONL (or TSV/CSV) with {prompt_field!r} and "
                                    f"{response_field!r} fields, not {fmt} data.")
        before = len(out)
        for rec, source in iter_rows(path, fmt):
            prompt = _field_text(rec, prompt_field, source, "prompt_field")
            response = _field_text(rec, response_field, source, "response_field")
            if parts is not None:
                values = {"prompt": prompt, "response": response}
                prompt, response = _fill(parts[0], values), _fill(parts[1], values)
            out.append(SFTExample(prompt, response, source))
        if len(out) == before:
            raise FinetuneDataError(f"{path}: no examples. Give a file with at least one prompt/response record, or "
                                    f"remove it from the inputs.")
        log.info("%s: %d prompt/response pairs", path, len(out) - before)
    return out


# --------------------------------------------------------------------------- features


@dataclass
class SFTFeatures:
    """Rows ready to batch: one per kept example, or packed rows of several (``packed``)."""

    input_ids: list[np.ndarray]  # per row, int32
    labels: list[np.ndarray]  # per row, int32, pre-shifted (labels[t] = target of position t), -100 ignored
    row_examples: list[tuple[int, ...]]  # kept-example indices in each row
    sources: list[str]  # per kept example
    max_len: int
    packed: bool = False
    position_ids: Optional[list[np.ndarray]] = None  # packed only: restart at 0 per example
    doc_ids: Optional[list[np.ndarray]] = None  # packed only: example index within the row
    num_examples: int = 0  # examples given
    num_empty: int = 0  # blank responses, skipped
    num_truncated: int = 0  # rows cut to max_len (kept or dropped)
    num_no_target: int = 0  # dropped: nothing left to learn after truncation
    dropped_sources: list[str] = field(default_factory=list)  # first skipped / dropped examples
    kind: str = "sft"
    lengths: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = np.array([len(x) for x in self.input_ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return int(sum(int((lab != IGNORE).sum()) for lab in self.labels))

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps([self.kind, self.max_len, self.packed, len(self)]).encode())
        h.update(self.lengths.tobytes())
        if len(self):
            h.update(np.concatenate(self.input_ids).astype(np.int32).tobytes())
            h.update(np.concatenate(self.labels).astype(np.int32).tobytes())
        return h.hexdigest()[:16]

    def collate(self, rows: np.ndarray, *, pad_id: int) -> dict[str, np.ndarray]:
        """Rows padded to their own longest: input_ids, attention_mask, labels (-100 on pads), and with
        packing position_ids (0 on pads) and doc_ids (-1 on pads)."""
        rows = np.asarray(rows, dtype=np.int64)
        lens = self.lengths[rows]
        B, T = len(rows), int(lens.max()) if len(rows) else 0
        ids = np.full((B, T), pad_id, dtype=np.int64)  # (B, T)
        lab = np.full((B, T), IGNORE, dtype=np.int64)  # (B, T)
        att = (np.arange(T)[None, :] < lens[:, None]).astype(np.int64)
        pos = np.zeros((B, T), dtype=np.int64) if self.packed else None
        doc = np.full((B, T), -1, dtype=np.int64) if self.packed else None
        for r, i in enumerate(rows.tolist()):
            n = lens[r]
            ids[r, :n] = self.input_ids[i]
            lab[r, :n] = self.labels[i]
            if self.packed:
                pos[r, :n] = self.position_ids[i]
                doc[r, :n] = self.doc_ids[i]
        out = {"input_ids": ids, "attention_mask": att, "labels": lab}
        if self.packed:
            out["position_ids"] = pos
            out["doc_ids"] = doc
        return out


def pack_rows(lengths: Sequence[int], capacity: int) -> list[tuple[int, ...]]:
    """Best-fit decreasing: example indices per row (each row's total <= capacity), rows ordered by their
    first example, examples in index order within a row. Deterministic."""
    free: list[tuple[int, int]] = []  # sorted (room left, row)
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, row = free.pop(k)
            rows[row].append(i)
        else:
            room, row = capacity, len(rows)
            rows.append([i])
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    return sorted(tuple(sorted(r)) for r in rows)


def encode_sft(examples: Sequence[SFTExample], tokenizer, *, max_len: int, packing: bool = False) -> SFTFeatures:
    """Rows of ``examples`` with response-only targets (see the module docstring for the exact layout)."""
    eos, pad = int(tokenizer.eos_id), int(tokenizer.pad_id)
    if eos == pad:
        raise ConfigError(f"the tokenizer's eos id equals its pad id ({eos}): SFT needs an eos distinct from padding "
                          f"(the eos is a target, padding never is). Use an llmscale tokenizer (eos=3, pad=0).")
    if max_len < 2:
        raise ConfigError(f"max_len={max_len} must be >= 2 (a token and its target).")
    keep = [ex for ex in examples if ex.response.strip()]
    blank = [ex.source for ex in examples if not ex.response.strip()]
    p_ids = encode_texts(tokenizer, [ex.prompt for ex in keep])
    r_ids = encode_texts(tokenizer, [ex.response for ex in keep])
    inputs, labels, sources, no_target = [], [], [], []
    truncated = 0
    for ex, p, r in zip(keep, p_ids, r_ids):
        s = np.array([*p, *r, eos], dtype=np.int32)
        if len(s) > max_len:
            truncated += 1
            s = s[:max_len]
        n, first = len(s), max(len(p), 1)  # first: position of the first token that is a target
        if first >= n:
            no_target.append(ex.source)
            continue
        lab = np.full(n, IGNORE, dtype=np.int32)
        lab[first - 1 : n - 1] = s[first:n]
        inputs.append(s)
        labels.append(lab)
        sources.append(ex.source)
    feats_kw = dict(sources=sources, max_len=max_len, num_examples=len(examples), num_empty=len(blank),
                    num_truncated=truncated, num_no_target=len(no_target), dropped_sources=(blank + no_target)[:5])
    if blank:
        log.warning("%d of %d SFT examples have a blank response and are skipped (first: %s)", len(blank),
                    len(examples), ", ".join(blank[:5]))
    if no_target:
        log.warning("%d SFT examples have no response token left within max_len=%d and are dropped (first: %s); "
                    "raise max_len or shorten the prompts", len(no_target), max_len, ", ".join(no_target[:5]))
    if not packing:
        feats = SFTFeatures(inputs, labels, [(i,) for i in range(len(inputs))], **feats_kw)
    else:
        rows = pack_rows([len(x) for x in inputs], max_len)
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        feats = SFTFeatures(
            [cat([inputs[i] for i in row]) for row in rows], [cat([labels[i] for i in row]) for row in rows], rows,
            packed=True,
            position_ids=[cat([np.arange(len(inputs[i]), dtype=np.int32) for i in row]) for row in rows],
            doc_ids=[cat([np.full(len(inputs[i]), d, dtype=np.int32) for d, i in enumerate(row)]) for row in rows],
            **feats_kw)
    log.info("encoded %d SFT examples into %d rows (max_len %d%s): %d truncated, %d targets", len(inputs), len(feats),
             max_len, ", packed" if packing else "", truncated, feats.num_targets)
    return feats
