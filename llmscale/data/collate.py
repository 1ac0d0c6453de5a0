"""Turning sample indices into batch arrays: packed causal-LM windows and masked-LM segment pairs.

The loader (:mod:`llmscale.data.loader`) decides *which* samples a rank reads; this module
decides *what a sample is* and builds the numpy arrays of a micro-batch from memory-mapped
shards. Everything here is vectorized per row or per batch: there is no per-token Python.

GPT: sample ``j`` of a split is the window of ``seq_len + 1`` tokens starting at token
``j * seq_len + offset`` of the split's token stream (every shard's documents back to back, each ending
with eos), ``0 <= offset < seq_len``. A split of ``N`` tokens has ``ceil((N - 1) / seq_len)`` samples;
windows that run past the end are padded with ``pad_id`` and their padded labels are ``-100``. With
offset 0 (validation, and training with ``data.window_offsets: fixed``) consecutive windows overlap by
one token, so every token except the split's very first is the target of exactly one sample per epoch
and nothing is served twice. The loader draws training offsets (``data.window_offsets``): ``epoch`` (the
default), one offset per epoch and dataset, so no two epochs serve the same windows and every target is
still served once per epoch but the epoch's first ``offset``; ``window``, one per window and epoch, as
samplers that draw random offsets (nanoGPT's) do: a text lands at another position in every window, and
tokens are covered once per epoch on average (about 1/6 of them twice and 1/6 not at all), each sample
index still once.

BERT: sample ``j`` is a run of consecutive sentences of one document holding at most
``seq_len - 3`` tokens (greedy packing; a sentence longer than that is cut into pieces), split into
segment A and segment B at a sentence boundary (chosen from the seed; inside the sentence when
there is only one). Rows are ``[CLS] A [SEP] B [SEP]`` padded to ``seq_len``. The samples tile each
document's tokens exactly once. With next-sentence prediction, half of the samples (a coin) replace
B with the start of a sample from a different document (label 1; those B tokens are then not seen
in that epoch); the others keep their true B (label 0). Masking selects each content token with
probability ``mlm_probability``; selected tokens become ``[MASK]`` (80%), a random non-special token
(10%) or stay (10%). [CLS], [SEP] and padding are never selected. All of this randomness is a
counter-based hash of (seed, stream position): reproducible, the same for any number of ranks, and
different in every epoch (dynamic masking).
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from llmscale.data.shards import ShardView

IGNORE = -100


# --------------------------------------------------------------------------- token stream of one split


class TokenStream:
    """The tokens of one split: its memory-mapped shards back to back, addressed by global position."""

    def __init__(self, shards: Sequence[ShardView]) -> None:
        self.shards = list(shards)
        sizes = np.array([len(s.tokens) for s in self.shards], dtype=np.int64)
        self.cum = np.zeros(len(sizes) + 1, dtype=np.int64)  # cum[k] = global position of shard k's first token
        np.cumsum(sizes, out=self.cum[1:])
        self.num_tokens = int(self.cum[-1])
        self.sizes = sizes
        self._cum_list = self.cum.tolist()
        self._tokens = [s.tokens for s in self.shards]
        self._views: dict[tuple[int, int], np.ndarray] = {}

    def window_offset(self, k: int, seq_len: int, shift: int = 0) -> int:
        """Shard-local position of the first window (global start = shift + a multiple of seq_len) in shard k."""
        return int((shift - self._cum_list[k]) % seq_len)

    def windows(self, k: int, seq_len: int, shift: int = 0) -> np.ndarray:
        """Read-only strided view of shard k: row i = tokens [off + i*seq_len, off + i*seq_len + seq_len + 1)."""
        key = (k, seq_len, shift)
        v = self._views.get(key)
        if v is None:
            src = self._tokens[k]
            off = self.window_offset(k, seq_len, shift)
            rows = max(0, (len(src) - off - seq_len - 1) // seq_len + 1)
            base = src[off:] if off < len(src) else src[:0]
            v = np.lib.stride_tricks.as_strided(
                base, shape=(rows, seq_len + 1), strides=(seq_len * src.itemsize, src.itemsize), writeable=False)
            self._views[key] = v
        return v

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as one array (a zero-copy view when inside one shard)."""
        k = int(np.searchsorted(self.cum, start, side="right")) - 1
        if stop <= self._cum_list[k + 1]:
            base = self._cum_list[k]
            return self._tokens[k][start - base : stop - base]
        parts = []
        while start < stop:
            base, end = self._cum_list[k], self._cum_list[k + 1]
            take = min(stop, end)
            parts.append(self._tokens[k][start - base : take - base])
            start = take
            k += 1
        return np.concatenate(parts)


# --------------------------------------------------------------------------- GPT


def gpt_num_samples(num_tokens: int, seq_len: int) -> int:
    """Windows needed so that every token but the first is a target exactly once."""
    return max(0, -(-(num_tokens - 1) // seq_len))


def gpt_windows(
    stream: TokenStream,
    samples: np.ndarray,
    *,
    seq_len: int,
    pad_id: int,
    shift: int = 0,
    out: Optional[tuple[np.ndarray, np.ndarray]] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, labels)`` int64 arrays of shape (len(samples), seq_len) for these window indices.

    Window j starts at token shift + j*seq_len (``0 <= shift < seq_len``, the same for every row; the loader
    groups rows by offset, see the module docstring), so inside one shard the windows are the rows of a strided
    view of the memory map (row stride seq_len, row length seq_len + 1): a batch is one fancy-index
    gather of those rows plus two casting copies (inputs = rows[:, :-1], labels = rows[:, 1:]), a
    few C calls per shard instead of two per row. Windows across a shard boundary are read
    piecewise, and the split's last window is padded (inputs ``pad_id``, labels -100). ``out`` may
    give the two arrays to fill.
    """
    T = seq_len
    B = len(samples)
    if out is None:
        out = (np.empty((B, T), dtype=np.int64), np.empty((B, T), dtype=np.int64))
    inputs, labels = out  # (B, T) each
    if B == 0:
        return inputs, labels
    starts = np.asarray(samples, dtype=np.int64) * T + int(shift)
    lo, hi = int(starts.min()), int(starts.max())
    k0 = min(bisect.bisect_right(stream._cum_list, lo) - 1, len(stream.sizes) - 1)  # lo may lie past the end
    if hi + T + 1 <= stream._cum_list[k0 + 1]:  # the common case: one shard, no boundary, no padding
        j = (starts - (stream._cum_list[k0] + stream.window_offset(k0, T, shift))) // T
        rows = stream.windows(k0, T, shift)[j]  # (B, T+1), token dtype
        np.copyto(inputs, rows[:, :T], casting="unsafe")
        np.copyto(labels, rows[:, 1:], casting="unsafe")
        return inputs, labels
    shard = np.minimum(np.searchsorted(stream.cum, starts, side="right") - 1, len(stream.sizes) - 1)
    local = starts - stream.cum[shard]
    inside = local + (T + 1) <= stream.sizes[shard]
    for k in np.unique(shard[inside]).tolist():
        sel = np.flatnonzero(inside & (shard == k))
        rows = stream.windows(k, T, shift)[(local[sel] - stream.window_offset(k, T, shift)) // T]
        inputs[sel] = rows[:, :T]
        labels[sel] = rows[:, 1:]
    n = stream.num_tokens
    for r in np.flatnonzero(~inside).tolist():  # across a shard boundary, or the split's last window
        s = int(starts[r])
        w = stream.read(s, min(s + T + 1, n)) if s < n else np.empty(0, dtype=np.int64)
        m = len(w)  # real tokens of this window (< T + 1 only at the split's end; 0 past it, with a shift)
        inputs[r, : min(m, T)] = w[:T]
        inputs[r, m:] = pad_id
        labels[r, : max(m - 1, 0)] = w[1:]
        labels[r, max(m - 1, 0) :] = IGNORE
    return inputs, labels


# --------------------------------------------------------------------------- BERT


@dataclass
class BertSamples:
    """The static sample table of a BERT split (one entry per sample, all int64 arrays)."""

    start: np.ndarray  # global token position of the sample's first token
    length: np.ndarray  # tokens of A and B together (<= seq_len - 3)
    a_len: np.ndarray  # tokens of segment A
    doc: np.ndarray  # global document index (for NSP: "another document")

    def __len__(self) -> int:
        return len(self.start)


def bert_samples(shards: Sequence[ShardView], cum: np.ndarray, *, seq_len: int, seed: int) -> BertSamples:
    """Greedy sentence packing of every document into samples of at most ``seq_len - 3`` tokens.

    One pass over the sentence lengths (Python ints; about a microsecond per sentence), done once
    when the loader is built. The A/B boundary of each sample is drawn from the seed.
    """
    cap = seq_len - 3
    starts: list[int] = []
    lengths: list[int] = []
    docs: list[int] = []
    nb: list[int] = []  # internal sentence boundaries per sample
    bounds: list[int] = []  # flat: offsets (within the sample) of those boundaries
    doc_id = 0
    for k, sh in enumerate(shards):
        if sh.sentence_lengths is None:
            raise ValueError(f"{sh.path} has no sentence_lengths column")
        base = int(cum[k])
        sl = sh.sentence_lengths.tolist()
        so = sh.sentence_offsets.tolist()
        do = sh.doc_offsets.tolist()
        for d in range(len(do) - 1):
            pos = base + do[d]
            cur_start, cur_len, cur_b = pos, 0, []
            for s in sl[so[d] : so[d + 1]]:
                if cur_len + s <= cap:
                    if cur_len:
                        cur_b.append(cur_len)
                    cur_len += s
                    pos += s
                    continue
                if cur_len:  # close the current sample, the sentence starts a new one
                    starts.append(cur_start)
                    lengths.append(cur_len)
                    docs.append(doc_id)
                    nb.append(len(cur_b))
                    bounds.extend(cur_b)
                    cur_start, cur_len, cur_b = pos, 0, []
                while s > cap:  # a sentence longer than a sample: cut into full pieces
                    starts.append(pos)
                    lengths.append(cap)
                    docs.append(doc_id)
                    nb.append(0)
                    pos += cap
                    s -= cap
                cur_start, cur_len = pos, s
                pos += s
            if cur_len:
                starts.append(cur_start)
                lengths.append(cur_len)
                docs.append(doc_id)
                nb.append(len(cur_b))
                bounds.extend(cur_b)
            doc_id += 1
    length = np.array(lengths, dtype=np.int64)
    nbs = np.array(nb, dtype=np.int64)
    flat = np.array(bounds, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x41425350])))  # "ABSP"
    pick = np.floor(rng.random(len(length)) * np.maximum(nbs, 1)).astype(np.int64)
    first = np.zeros(len(nbs), dtype=np.int64)
    if len(nbs) > 1:
        np.cumsum(nbs[:-1], out=first[1:])
    has_b = nbs > 0
    a_len = np.where(length >= 2, length // 2, length)  # one sentence: cut it in the middle
    if has_b.any():
        a_len[has_b] = flat[first[has_b] + pick[has_b]]
    return BertSamples(np.array(starts, dtype=np.int64), length, a_len, np.array(docs, dtype=np.int64))


@dataclass
class MaskSpec:
    seq_len: int
    vocab_size: int
    mlm_probability: float
    nsp: bool
    pad_id: int
    mask_id: int
    cls_id: int
    sep_id: int

    @property
    def random_low(self) -> int:
        """Random replacements are drawn from [random_low, vocab_size): never a special token."""
        return max(self.pad_id, self.mask_id, self.cls_id, self.sep_id) + 1


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche of uint64 values (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, tag: int, positions: np.ndarray, n: int, lane: int) -> np.ndarray:
    """Counter-based uniforms in [0, 1), shape (len(positions), n): a pure function of
    (seed, tag, stream position, lane, column), so identical on every rank, run and prefetch thread,
    and computed for a whole batch in a few vectorized operations."""
    with np.errstate(over="ignore"):
        key = _mix64(np.array([seed % (1 << 64)], dtype=np.uint64))
        key = _mix64(key ^ np.uint64(tag))
        key = _mix64(key ^ np.uint64(lane + 1))
        row = _mix64(np.asarray(positions, dtype=np.uint64) * _GOLDEN ^ key)  # (B,)
        ctr = row[:, None] + (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)[None, :]  # (B, n)
        return (_mix64(ctr) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def bert_batch(
    stream: TokenStream,
    table: BertSamples,
    samples: np.ndarray,
    positions: np.ndarray,
    spec: MaskSpec,
    *,
    seed: int,
    tag: int,
) -> dict[str, np.ndarray]:
    """Masked-LM (+NSP) arrays for these sample indices. Row r's randomness (mask choice, NSP coin,
    random segment) depends only on (seed, tag, positions[r]): dp-size invariant and reproducible."""
    samples = np.asarray(samples, dtype=np.int64)
    B, T = len(samples), spec.seq_len
    ids = np.full((B, T), spec.pad_id, dtype=np.int64)  # (B, T)
    tti = np.zeros((B, T), dtype=np.int64)
    att = np.zeros((B, T), dtype=np.int64)
    nsp_label = np.zeros(B, dtype=np.int64)
    cap = T - 3
    S = len(table)
    st, ln, al = table.start[samples], table.length[samples], table.a_len[samples]
    b_start, b_len = st + al, ln - al
    if spec.nsp and B:
        coin = uniforms(seed, tag, positions, 1, 0)[:, 0] < 0.5
        cand = np.minimum((uniforms(seed, tag, positions, 16, 1) * S).astype(np.int64), S - 1)  # (B, 16)
        other = table.doc[cand] != table.doc[samples][:, None]  # a segment of another document
        pick = cand[np.arange(B), np.argmax(other, axis=1)]
        swap = coin & other.any(axis=1)  # >= 2 documents are checked when the loader is built
        b_start = np.where(swap, table.start[pick], b_start)
        b_len = np.where(swap, np.minimum(table.length[pick], cap - al), b_len)
        nsp_label = swap.astype(np.int64)
    for r, (s0, na, bs, nb_) in enumerate(zip(st.tolist(), al.tolist(), b_start.tolist(), b_len.tolist())):
        ids[r, 0] = spec.cls_id
        ids[r, 1 : 1 + na] = stream.read(s0, s0 + na)
        ids[r, 1 + na] = spec.sep_id
        ids[r, 2 + na : 2 + na + nb_] = stream.read(bs, bs + nb_)
        ids[r, 2 + na + nb_] = spec.sep_id
        tti[r, 2 + na : 3 + na + nb_] = 1
        att[r, : 3 + na + nb_] = 1
    ids, labels = mask_tokens(ids, att, spec, seed=seed, tag=tag, positions=positions)
    out = {"input_ids": ids, "token_type_ids": tti, "attention_mask": att, "labels": labels}
    if spec.nsp:
        out["next_sentence_label"] = nsp_label
    return out


def mask_tokens(ids: np.ndarray, att: np.ndarray, spec: MaskSpec, *, seed: int, tag: int,
                positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking rule on (B, T) rows: each real, non-special token is selected with probability
    ``spec.mlm_probability``; a selected one becomes [MASK] (80%), a random non-special token (10%) or stays
    (10%). Returns (masked ids, labels: the original id where selected, -100 elsewhere). Row r's choices depend
    only on (seed, tag, positions[r]), as in training (also used by the eval job's mlm task)."""
    B, T = ids.shape
    u_select = uniforms(seed, tag, positions, T, 2)
    u_kind = uniforms(seed, tag, positions, T, 3)
    rand_tok = spec.random_low + (uniforms(seed, tag, positions, T, 4)
                                  * (spec.vocab_size - spec.random_low)).astype(np.int64)
    special = (ids == spec.pad_id) | (ids == spec.cls_id) | (ids == spec.sep_id) | (ids == spec.mask_id)
    selected = (u_select < spec.mlm_probability) & (att == 1) & ~special
    labels = np.where(selected, ids, IGNORE)
    to_mask = selected & (u_kind < 0.8)
    to_rand = selected & (u_kind >= 0.8) & (u_kind < 0.9)
    return np.where(to_mask, spec.mask_id, np.where(to_rand, rand_tok, ids)), labels


def ignore_rows(batch: dict[str, np.ndarray], rows: np.ndarray) -> None:
    """Make these rows contribute nothing to a loss (used to fill the last evaluation batch)."""
    if not len(rows):
        return
    batch["labels"][rows] = IGNORE
    if "next_sentence_label" in batch:
        batch["next_sentence_label"][rows] = IGNORE
