"""Sequence-classification data: labelled examples -> a label map -> token features a loader batches.

    train = read_classification(["sst2/train.tsv"], text_field="sentence", label_field="label")
    dev = read_classification(["sst2/dev.tsv"], text_field="sentence", label_field="label")
    labels = LabelMap.from_examples(train)                    # sorted label strings: "0" -> 0, "1" -> 1
    feats = encode_classification(train, tok, labels, max_len=128, family="bert")
    imdb = read_classification(["aclImdb_v1.tar.gz"], split="train")   # folder-per-label, read in place
    chn = read_classification(["chnsenticorp.zip::train.tsv"], text_field="text_a", label_field="label")

Paths and formats are those of :mod:`llmscale.data.records` (TSV/CSV with a header, JSONL, a zip
member as ``archive.zip::member``, folder-per-label text files in a folder or a tar archive).

Labels are strings (JSON integers and booleans become ``"3"``, ``"true"``). :class:`LabelMap` gives
them ids 0..K-1 in sorted order (numeric order when every label is an integer, so ``"2" < "10"``),
or in the order of an explicit list; it travels with the model as JSON (:meth:`LabelMap.to_json`).
Validation and test labels must be in the training map: an unknown one is an error naming it.

Token rows per model family (``max_len`` counts every token of a row):

- ``bert``: ``[CLS] a [SEP]``, or ``[CLS] a [SEP] b [SEP]`` for pairs with token types 0 up to and
  including the first ``[SEP]``, 1 after it;
- ``gpt`` / ``bilstm``: the bare text ids, or ``a [SEP] b`` for pairs (no other special token).

Truncation, when a row would exceed ``max_len``: the text budget is ``max_len`` minus the special
tokens. A pair is shortened longest-first (the longer segment loses a token until both fit; on a tie
the second), then each segment keeps its share by the ``truncation`` rule: ``"head"`` keeps the first
tokens, ``"head_tail"`` keeps the first ``h = floor(share * head_tail_ratio + 0.5)`` and the last
``share - h`` (Sun et al. 2019, "How to Fine-Tune BERT for Text Classification?": at max_len 512
BERT keeps 128 head and 382 tail tokens). Blank texts (empty or whitespace only; for pairs either
segment) are skipped and counted, never silently dropped; truncated rows are counted.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from llmscale.data.records import FORMATS, PathLike, as_paths, detect_format, get_field, iter_folder, iter_rows
from llmscale.errors import ConfigError, FinetuneDataError
from llmscale.log import get_logger

log = get_logger(__name__)

IGNORE = -100
FAMILIES = ("bert", "gpt", "bilstm")
TRUNCATIONS = ("head", "head_tail")


@dataclass(frozen=True)
class Example:
    """One classification example. ``label`` is None for unlabelled data (predictions)."""

    text: str
    label: Optional[str]
    source: str  # "file:line" (or the file / archive member of a folder-per-label example)
    text_pair: Optional[str] = None


def label_string(value: object, source: str, field_name: str) -> str:
    """A record's label value as the label string (strings stripped; JSON ints and bools spelled)."""
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise FinetuneDataError(
            f"{source}: the label field {field_name!r} holds {value!r}, not a label. Labels are non-empty strings or "
            f"integers; fix that record, or set label_field to the column that holds the labels.")
    return value.strip()


def _text(value: object, source: str, field_name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise FinetuneDataError(f"{source}: the text field {field_name!r} holds a {type(value).__name__} "
                                f"({str(value)[:40]!r}), not text. Fix that record or set text_field.")
    return value


def read_classification(
    paths: PathLike | Sequence[PathLike],
    *,
    text_field: str = "text",
    text_pair_field: Optional[str] = None,
    label_field: Optional[str] = "label",
    format: Optional[str] = None,
    split: Optional[str] = None,
) -> list[Example]:
    """Every example of ``paths`` (in order). ``format`` (tsv, csv, jsonl, folder) defaults to each
    path's suffix; ``split`` picks ``ROOT/{split}/`` of folder-per-label data; ``label_field=None``
    reads unlabelled rows (``""`` counts as None for both optional fields). Each path must hold at least one example."""
    text_pair_field, label_field = text_pair_field or None, label_field or None  # "" (a config's unset) = none
    if format is not None and format not in FORMATS:
        raise ConfigError(f"format={format!r} is unknown; choose one of {', '.join(FORMATS)}.")
    out: list[Example] = []
    for path in as_paths(paths):
        fmt = format or detect_format(path)
        before = len(out)
        if fmt == "folder":
            if text_pair_field is not None:
                raise ConfigError(f"{path}: folder-per-label files hold one text each; text_pair_field is for tables.")
            out.extend(Example(text, label, source) for text, label, source in iter_folder(path, split=split))
        else:
            for rec, source in iter_rows(path, fmt):
                text = _text(get_field(rec, text_field, source, option="text_field"), source, text_field)
                pair = None
                if text_pair_field is not None:
                    pair = _text(get_field(rec, text_pair_field, source, option="text_pair_field"), source,
                                 text_pair_field)
                label = None
                if label_field is not None:
                    label = label_string(get_field(rec, label_field, source, option="label_field"), source,
                                         label_field)
                out.append(Example(text, label, source, pair))
        if len(out) == before:
            raise FinetuneDataError(f"{path}: no examples (only a header row?). Give a file with at least one "
                                    f"example, or remove it from the inputs.")
        log.info("%s: %d examples (%s)", path, len(out) - before, fmt)
    return out


# --------------------------------------------------------------------------- labels


def _label_sort_key(labels: Iterable[str]):
    labels = list(labels)
    try:
        if all(str(int(x)) == x for x in labels):
            return lambda x: (int(x), x)
    except ValueError:
        pass
    return lambda x: x


class LabelMap:
    """Label strings <-> class ids 0..K-1; saved with the model (``to_json``/``from_json``)."""

    def __init__(self, labels: Sequence[str]) -> None:
        labels = list(labels)
        bad = [x for x in labels if not isinstance(x, str) or not x.strip()]
        if bad or not labels:
            raise FinetuneDataError(f"labels must be a non-empty list of non-empty strings, got {labels!r}.")
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise FinetuneDataError(f"labels list the label(s) {', '.join(map(repr, dup))} twice; give each once.")
        self.labels: tuple[str, ...] = tuple(labels)
        self._ids = {x: i for i, x in enumerate(labels)}

    @classmethod
    def from_examples(cls, examples: Iterable[Example], labels: Optional[Sequence[str]] = None) -> LabelMap:
        """The sorted labels of (training) ``examples``, or the explicit ``labels`` (checked against them)."""
        examples = list(examples)
        if labels is not None:
            m = cls([str(x) for x in labels])
            for ex in examples:
                if ex.label is not None:
                    m.index(ex.label, ex.source)
            return m
        seen = {ex.label for ex in examples if ex.label is not None}
        if len(seen) < 2:
            where = examples[0].source.rsplit(":", 1)[0] if examples else "the training data"
            raise FinetuneDataError(
                f"{where}: the training examples carry {len(seen)} distinct label(s) ({', '.join(sorted(seen))}); "
                f"classification needs at least two. Check label_field, or give the label list explicitly "
                f"(labels=[...]).")
        return cls(sorted(seen, key=_label_sort_key(seen)))

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, label: object) -> bool:
        return label in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and other.labels == self.labels

    def __hash__(self) -> int:
        return hash(self.labels)

    def __repr__(self) -> str:
        return f"LabelMap({list(self.labels)!r})"

    def index(self, label: str, source: str = "") -> int:
        i = self._ids.get(label)
        if i is None:
            known = ", ".join(map(repr, self.labels[:20])) + (" ..." if len(self.labels) > 20 else "")
            raise FinetuneDataError(
                f"{source or 'an example'}: label {label!r} is not one of the {len(self.labels)} known labels "
                f"({known}) of the training data. Fix that label, or give the complete label list explicitly "
                f"(classify.labels in the fine-tune config, labels=[...] in Python) so that the model has a class "
                f"for it.")
        return i

    def label(self, i: int) -> str:
        return self.labels[int(i)]

    def to_json(self) -> str:
        return json.dumps({"labels": list(self.labels)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> LabelMap:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FinetuneDataError(f"a label map must be JSON like {{\"labels\": [\"neg\", \"pos\"]}} ({e.msg}); "
                                    f"the model folder's label map is damaged: re-export the model.") from None
        if not isinstance(data, dict) or not isinstance(data.get("labels"), list):
            raise FinetuneDataError(f"a label map must be JSON like {{\"labels\": [\"neg\", \"pos\"]}}, got "
                                    f"{text[:80]!r}.")
        return cls(data["labels"])

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        p.write_text(self.to_json() + "\n", encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> LabelMap:
        p = Path(path)
        if not p.is_file():
            raise FinetuneDataError(f"{p}: no label map here; it is written with the fine-tuned model.")
        return cls.from_json(p.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- features


@dataclass
class ClassificationFeatures:
    """Token rows of the kept examples (in example order) and what encoding skipped or cut."""

    input_ids: list[np.ndarray]  # per example, int32, length <= max_len
    pair_start: np.ndarray  # (N,) int64: first position of token type 1 (= length without a pair)
    labels: np.ndarray  # (N,) int64 class ids, -100 for unlabelled examples
    sources: list[str]
    family: str
    max_len: int
    num_examples: int = 0  # examples given (kept + empty)
    num_empty: int = 0  # blank texts, skipped
    num_truncated: int = 0  # rows cut to max_len
    empty_sources: list[str] = field(default_factory=list)  # where the first blank texts are
    kind: str = "classification"
    lengths: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = np.array([len(x) for x in self.input_ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.input_ids)

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps([self.kind, self.family, self.max_len, len(self)]).encode())
        for a in (self.lengths, self.pair_start, self.labels):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        if len(self):
            h.update(np.concatenate(self.input_ids).astype(np.int32).tobytes())
        return h.hexdigest()[:16]

    def collate(self, rows: np.ndarray, *, pad_id: int) -> dict[str, np.ndarray]:
        """Rows padded to their own longest: input_ids, attention_mask, [token_type_ids], labels."""
        rows = np.asarray(rows, dtype=np.int64)
        lens = self.lengths[rows]
        B, T = len(rows), int(lens.max()) if len(rows) else 0
        ids = np.full((B, T), pad_id, dtype=np.int64)  # (B, T)
        att = (np.arange(T)[None, :] < lens[:, None]).astype(np.int64)  # (B, T)
        for r, i in enumerate(rows.tolist()):
            ids[r, : lens[r]] = self.input_ids[i]
        out = {"input_ids": ids, "attention_mask": att}
        if self.family == "bert":
            start = self.pair_start[rows]
            out["token_type_ids"] = ((np.arange(T)[None, :] >= start[:, None]) & (att == 1)).astype(np.int64)
        out["labels"] = self.labels[rows].copy()  # (B,)
        return out


def _fit_pair(la: int, lb: int, budget: int) -> tuple[int, int]:
    """Longest-first: the longer segment gives up a token until both fit (the second one on a tie)."""
    if la + lb <= budget:
        return la, lb
    short = min(la, lb)
    if short <= budget // 2:
        return (la, budget - la) if la == short and la < lb else (budget - lb, lb)
    return budget - budget // 2, budget // 2


def _cut(ids: list[int], n: int, truncation: str, ratio: float) -> list[int]:
    if len(ids) <= n:
        return ids
    if truncation == "head":
        return ids[:n]
    head = int(np.floor(n * ratio + 0.5))
    return ids[:head] + ids[len(ids) - (n - head):]


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer.encode_batch(texts, num_threads=min(os.cpu_count() or 1, 8))
    return [tokenizer.encode(t) for t in texts]


def encode_classification(
    examples: Sequence[Example],
    tokenizer,
    label_map: Optional[LabelMap],
    *,
    max_len: int,
    family: str,
    truncation: str = "head",
    head_tail_ratio: float = 0.25,
) -> ClassificationFeatures:
    """Token rows of ``examples`` for a ``family`` model (see the module docstring for the layout)."""
    if family not in FAMILIES:
        raise ConfigError(f"family={family!r} is unknown; choose one of {', '.join(FAMILIES)}.")
    if truncation not in TRUNCATIONS:
        raise ConfigError(f"truncation={truncation!r} is unknown; choose one of {', '.join(TRUNCATIONS)}.")
    if not 0.0 <= head_tail_ratio <= 1.0:
        raise ConfigError(f"head_tail_ratio={head_tail_ratio} must be in [0, 1] (0.25: a quarter head, the rest tail).")
    pairs = any(ex.text_pair is not None for ex in examples)
    special = (3 if pairs else 2) if family == "bert" else (1 if pairs else 0)
    if max_len - special < 2:
        raise ConfigError(f"max_len={max_len} leaves {max_len - special} text tokens after {special} special "
                          f"token(s); use max_len >= {special + 2}.")
    keep, empty = [], []
    for ex in examples:
        blank = not ex.text.strip() or (ex.text_pair is not None and not ex.text_pair.strip())
        (empty if blank else keep).append(ex)
        if not blank and ex.label is not None and label_map is None:
            raise ConfigError(f"{ex.source}: labelled examples need a label map (LabelMap.from_examples(train)).")
    labels = np.array([IGNORE if ex.label is None else label_map.index(ex.label, ex.source) for ex in keep],
                      dtype=np.int64)
    a_ids = encode_texts(tokenizer, [ex.text for ex in keep])
    b_ids = encode_texts(tokenizer, [ex.text_pair or "" for ex in keep]) if pairs else None
    cls_id, sep_id = int(tokenizer.cls_id), int(tokenizer.sep_id)
    rows, starts, truncated = [], [], 0
    for j, ex in enumerate(keep):
        a, b = a_ids[j], (b_ids[j] if ex.text_pair is not None else None)
        sp = (3 if b is not None else 2) if family == "bert" else (1 if b is not None else 0)
        budget = max_len - sp
        la, lb = _fit_pair(len(a), len(b) if b is not None else 0, budget)
        if la < len(a) or (b is not None and lb < len(b)):
            truncated += 1
            a = _cut(a, la, truncation, head_tail_ratio)
            b = _cut(b, lb, truncation, head_tail_ratio) if b is not None else None
        if family == "bert":
            first = [cls_id, *a, sep_id]
            row = first + ([*b, sep_id] if b is not None else [])
            starts.append(len(first))
        else:
            row = a + ([sep_id, *b] if b is not None else [])
            starts.append(len(row))
        rows.append(np.array(row, dtype=np.int32))
    feats = ClassificationFeatures(
        input_ids=rows, pair_start=np.array(starts, dtype=np.int64), labels=labels,
        sources=[ex.source for ex in keep], family=family, max_len=max_len, num_examples=len(examples),
        num_empty=len(empty), num_truncated=truncated, empty_sources=[ex.source for ex in empty[:5]])
    if empty:
        log.warning("%d of %d examples have a blank text and are skipped (first: %s)", len(empty), len(examples),
                    ", ".join(feats.empty_sources))
    log.info("encoded %d examples for %s (max_len %d): %d truncated (%s), mean length %.1f", len(feats), family,
             max_len, truncated, truncation, float(feats.lengths.mean()) if len(feats) else 0.0)
    return feats
