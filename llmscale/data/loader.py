"""The training data loader: memory-mapped shards -> global sample order -> this rank's slice -> batches.

Order. Every dataset split is a list of samples (packed GPT windows or BERT segment pairs, see
:mod:`llmscale.data.collate`). The *global sample stream* is an endless sequence of sample ids that
depends only on ``data.seed`` (and the datasets): for one dataset it is the concatenation of one
permutation per epoch (epoch ``e`` is permuted by ``Generator(PCG64(SeedSequence([seed, tag, 0, e])))``).
Step ``k`` takes ``stream[k*B : (k+1)*B]`` for the global batch size ``B``; data-parallel rank ``r``
of ``W`` takes the r-th contiguous chunk of ``B / W`` of those, cut into micro-batches. The stream
never depends on ``W``, so a job resumed on 2, 4 or 8 ranks continues the very same sequence.

Window offsets (GPT, ``data.window_offsets``). Training window ``j`` starts at ``j * seq_len`` plus an
offset in ``[0, seq_len)`` (see :mod:`llmscale.data.collate`): ``epoch`` (the default) draws one per
(seed, dataset, epoch) from its own generator; ``window`` draws one per stream position from a
counter-based hash of (seed, position); ``fixed`` is 0. Like the permutation, a pure function of the seed
and the stream position: the same for every world size and on resume. Validation never shifts.

Remainders. Nothing is dropped: the last GPT window of a split is padded (labels -100), and the
stream runs straight from one epoch into the next, so a global batch may hold the last samples of
epoch ``e`` and the first of ``e + 1``. ``steps_per_epoch`` is ``ceil(samples_per_epoch / B)``.

Blends. With several datasets (``data.blend``), stream position ``i`` picks its source from a
pure function of ``(seed, i)``: positions come in blocks of ``K`` (>= 1024); block ``b`` holds exactly
``C_d(b+1) - C_d(b)`` samples of source ``d``, where ``C_d(b) = floor(b*K*w_d)`` (the largest-weight
source takes the rest), shuffled within the block by a generator seeded with ``(seed, b)``. The
``n``-th sample drawn from source ``d`` is that source's own stream position ``n`` (its own
per-epoch permutations). So the realised mixture matches the weights to within one sample per
block and source, and every dataset is still read epoch by epoch, each sample once per epoch.

Position. Because everything is a pure function of the stream position, the loader's state is
one counter (``consumed_samples``) plus checks: ``state_dict()`` resumes exactly mid-epoch, also on
another data-parallel size, and even with another global batch size (the stream continues from
the same sample).

Speed. Shards are memory-mapped (zero-copy Arrow views); a batch copies each window's two slices
(inputs, labels) straight from the page cache into int64 arrays; ``np.searchsorted`` over the
shards' cumulative token counts locates a window, which may straddle two shards.
``data.num_workers > 0`` prepares the next steps in background threads; a batch is a pure function
of its position, so prefetching cannot change what is served.
"""
from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch

from llmscale.config import ConfigError, DataConfig
from llmscale.data.collate import (
    BertSamples,
    MaskSpec,
    TokenStream,
    bert_batch,
    bert_samples,
    gpt_num_samples,
    gpt_windows,
    ignore_rows,
    uniforms,
)
from llmscale.data.shards import DatasetError, Manifest, open_shard, read_manifest
from llmscale.log import get_logger

log = get_logger(__name__)

STATE_VERSION = 1
# Tags keep the random streams of different purposes independent (SeedSequence entropy, hash keys).
_TAG_PERM = 0x5045524D  # "PERM"
_TAG_BLEND = 0x424C4E44  # "BLND"
_TAG_MASK = 0x4D41534B  # "MASK"
_TAG_EVAL = 0x4556414C  # "EVAL"
_TAG_SHIFT = 0x53484654  # "SHFT"
_BLOCK = 1024


def _seed64(seed: int) -> int:
    return int(seed) % (1 << 64)


# --------------------------------------------------------------------------- one dataset split


class DatasetSplit:
    """One dataset's split, memory-mapped, with its static sample table."""

    def __init__(self, manifest: Manifest, split: str, *, kind: str, seq_len: int, seed: int) -> None:
        self.manifest = manifest
        self.root = manifest.root
        self.split = split
        self.kind = kind
        self.seq_len = seq_len
        infos = manifest.shards(split)
        views = []
        for info in infos:
            v = open_shard(self.root / info.path)
            if len(v.tokens) != info.num_tokens:
                raise DatasetError(
                    f"{self.root / info.path} holds {len(v.tokens)} tokens, the manifest says {info.num_tokens}: the "
                    f"dataset changed after it was written. Run `llmscale data verify {self.root}` and re-run "
                    f"`llmscale prepare`.")
            views.append(v)
        self.stream = TokenStream(views)
        self.num_tokens = self.stream.num_tokens
        self.num_documents = sum(v.num_documents for v in views)
        self.table: Optional[BertSamples] = None
        if kind == "gpt":
            self.num_samples = gpt_num_samples(self.num_tokens, seq_len)
        else:
            self.table = bert_samples(views, self.stream.cum, seq_len=seq_len, seed=seed) if views else None
            self.num_samples = len(self.table) if self.table is not None else 0


# --------------------------------------------------------------------------- the global order


class SampleOrder:
    """Maps global stream positions to (source, sample index within the source): a pure function of the seed."""

    def __init__(self, sizes: list[int], weights: list[float], *, seed: int, shuffle: bool) -> None:
        self.sizes = np.array(sizes, dtype=np.int64)
        self.offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.offsets[1:])
        w = np.array(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.seed = _seed64(seed)
        self.shuffle = shuffle
        n = len(sizes)
        self.block = max(_BLOCK, 4 * n * n)  # >= n(n-1)/w_max keeps every block quota >= 0
        self.big = int(np.argmax(self.weights))
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def _cached(self, key, make):
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = make()
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > 16:
                self._cache.popitem(last=False)
        return value

    def permutation(self, source: int, epoch: int) -> np.ndarray:
        def make():
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, _TAG_PERM, source, epoch])))
            return rng.permutation(int(self.sizes[source]))

        return self._cached(("perm", source, epoch), make)

    def _quota_before(self, b: int) -> np.ndarray:
        """Samples of each source among the first b blocks (exact integers, monotone in b)."""
        total = b * self.block
        q = np.floor(total * self.weights).astype(np.int64)
        q[self.big] = 0
        q[self.big] = total - int(q.sum())
        return q

    def _block_sources(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, n-th draw from that source) of the block's positions."""

        def make():
            before = self._quota_before(b)
            quota = self._quota_before(b + 1) - before
            src = np.repeat(np.arange(len(self.sizes), dtype=np.int64), quota)
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, _TAG_BLEND, b])))
            rng.shuffle(src)
            nth = np.empty(self.block, dtype=np.int64)
            for d in range(len(self.sizes)):
                where = np.flatnonzero(src == d)
                nth[where] = before[d] + np.arange(len(where))
            return src, nth

        return self._cached(("block", b), make)

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, sample index within the source, epoch of that source) of each stream position."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(self.sizes) == 1:
            src = np.zeros(len(positions), dtype=np.int64)
            nth = positions
        else:
            src = np.empty(len(positions), dtype=np.int64)
            nth = np.empty(len(positions), dtype=np.int64)
            blocks = positions // self.block
            for b in np.unique(blocks).tolist():
                sel = blocks == b
                bs, bn = self._block_sources(b)
                within = positions[sel] - b * self.block
                src[sel] = bs[within]
                nth[sel] = bn[within]
        if len(self.sizes) == 1 and len(positions):
            size = int(self.sizes[0])
            e0 = int(positions[0]) // size
            if int(positions[-1]) // size == e0 and positions[-1] >= positions[0]:  # one epoch (the common case)
                local = positions - e0 * size
                epoch = np.full(len(positions), e0, dtype=np.int64)
                return src, (self.permutation(0, e0)[local] if self.shuffle else local), epoch
        sample = np.empty(len(positions), dtype=np.int64)
        epoch = nth // self.sizes[src]
        local = nth - epoch * self.sizes[src]
        if not self.shuffle:
            return src, local, epoch
        keys = src * (1 << 40) + epoch
        for key in np.unique(keys).tolist():
            sel = keys == key
            d, e = divmod(key, 1 << 40)
            sample[sel] = self.permutation(d, e)[local[sel]]
        return src, sample, epoch

    def shift(self, source: int, epoch: int, seq_len: int) -> int:
        """GPT: the token offset of every window of this source in this epoch, in [0, seq_len)."""
        def make():
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, _TAG_SHIFT, source, epoch])))
            return int(rng.integers(0, seq_len))

        return self._cached(("shift", source, epoch, seq_len), make)

    def global_ids(self, src: np.ndarray, sample: np.ndarray) -> np.ndarray:
        return self.offsets[src] + sample


# --------------------------------------------------------------------------- the loader


class TokenLoader:
    """This rank's batches of the global sample stream; resumable from a small state dict."""

    def __init__(
        self,
        splits: list[DatasetSplit],
        weights: list[float],
        *,
        data_cfg: DataConfig,
        manifests: list[Manifest],
        split: str,
        dp_rank: int,
        dp_size: int,
        global_batch_size: int,
        micro_batch_size: int,
        spec: MaskSpec,
        shuffle: bool,
    ) -> None:
        self.splits = splits
        self.manifests = manifests
        self.split = split
        self.cfg = data_cfg
        self.kind = data_cfg.format
        self.seq_len = data_cfg.seq_len
        self.seed = _seed64(data_cfg.seed)
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.per_rank = global_batch_size // dp_size
        self.grad_accum_steps = self.per_rank // micro_batch_size
        self.spec = spec
        self.shuffle = shuffle
        self.order = SampleOrder([s.num_samples for s in splits], weights, seed=self.seed, shuffle=shuffle)
        self.samples_per_epoch = int(sum(s.num_samples for s in splits))
        self.steps_per_epoch = math.ceil(self.samples_per_epoch / global_batch_size)
        self.consumed_samples = 0
        self._eval_splits: Optional[list[DatasetSplit]] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: dict[int, Future] = {}
        if data_cfg.num_workers > 0:
            self._pool = ThreadPoolExecutor(max_workers=data_cfg.num_workers, thread_name_prefix="llmscale-data")

    # ---------------------------------------------------------------- order

    @property
    def step(self) -> int:
        """Optimizer steps served so far (with the current global batch size)."""
        return self.consumed_samples // self.global_batch_size

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.samples_per_epoch

    def _ids_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(source, sample, global sample id, window offset) of each stream position (offset 0 unless GPT with
        data.window_offsets epoch or window)."""
        src, sample, epoch = self.order.lookup(positions)
        shift = np.zeros(len(positions), dtype=np.int64)
        mode = self.cfg.window_offsets if self.kind == "gpt" and self.shuffle else "fixed"
        if mode == "epoch":
            keys = src * (1 << 40) + epoch
            for key in np.unique(keys).tolist():
                d, e = divmod(key, 1 << 40)
                shift[keys == key] = self.order.shift(d, e, self.seq_len)
        elif mode == "window":
            u = uniforms(self.seed, _TAG_SHIFT, positions, 1, lane=0)[:, 0]
            shift = np.minimum((u * self.seq_len).astype(np.int64), self.seq_len - 1)
        return src, sample, self.order.global_ids(src, sample), shift

    def global_sample_ids(self, step: int) -> np.ndarray:
        """The global batch of optimizer step ``step``: ``global_batch_size`` sample ids (int64)."""
        pos = step * self.global_batch_size + np.arange(self.global_batch_size, dtype=np.int64)
        return self._ids_at(pos)[2]

    def global_window_starts(self, step: int) -> np.ndarray:
        """GPT: the token position (in its dataset's split) where each window of step ``step`` starts."""
        pos = step * self.global_batch_size + np.arange(self.global_batch_size, dtype=np.int64)
        _, sample, _, shift = self._ids_at(pos)
        return sample * self.seq_len + shift

    def rank_sample_ids(self, step: int, dp_rank: int, dp_size: int) -> np.ndarray:
        """What data-parallel rank ``dp_rank`` of ``dp_size`` reads at ``step`` (its contiguous chunk)."""
        if self.global_batch_size % dp_size:
            raise ConfigError(f"global batch {self.global_batch_size} is not divisible by dp_size={dp_size}.")
        per = self.global_batch_size // dp_size
        return self.global_sample_ids(step)[dp_rank * per : (dp_rank + 1) * per]

    # ---------------------------------------------------------------- batches

    def _collate(self, splits: list[DatasetSplit], positions: np.ndarray, src: np.ndarray, sample: np.ndarray, *,
                 tag: int, shift: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
        """The numpy arrays of these positions' samples (rows in the given order); src indexes ``splits``;
        ``shift``: GPT window shift of each row (default 0)."""
        n = len(positions)
        if self.kind == "gpt":
            out = (np.empty((n, self.seq_len), dtype=np.int64), np.empty((n, self.seq_len), dtype=np.int64))
            inp, lab = out
            if shift is None:
                shift = np.zeros(n, dtype=np.int64)
            keys = src * self.seq_len + shift
            uniq = np.unique(keys).tolist()
            if len(uniq) == 1:
                d, sh = divmod(uniq[0], self.seq_len)
                gpt_windows(splits[d].stream, sample, seq_len=self.seq_len, pad_id=self.spec.pad_id, shift=sh, out=out)
            else:
                for key in uniq:
                    sel = keys == key
                    d, sh = divmod(key, self.seq_len)
                    inp[sel], lab[sel] = gpt_windows(
                        splits[d].stream, sample[sel], seq_len=self.seq_len, pad_id=self.spec.pad_id, shift=sh)
            return {"input_ids": inp, "labels": lab}
        parts: dict[str, np.ndarray] = {}
        for d in np.unique(src).tolist():
            sel = np.flatnonzero(src == d)
            sp = splits[d]
            b = bert_batch(sp.stream, sp.table, sample[sel], positions[sel], self.spec, seed=self.seed, tag=tag)
            for k, v in b.items():
                if k not in parts:
                    parts[k] = np.empty((n,) + v.shape[1:], dtype=v.dtype)
                parts[k][sel] = v
        return parts

    def _rank_step(self, start: int) -> list[dict]:
        """This rank's micro-batches of the global batch that begins at stream position ``start``."""
        positions = start + self.dp_rank * self.per_rank + np.arange(self.per_rank, dtype=np.int64)
        sources, samples, ids, shift = self._ids_at(positions)
        # The whole step in one go (one allocation, fixed costs paid once); each micro-batch is then a
        # contiguous row block of it.
        arrays = self._collate(self.splits, positions, sources, samples, tag=_TAG_MASK, shift=shift)
        arrays["sample_ids"] = ids
        parts = {k: torch.from_numpy(v).chunk(self.grad_accum_steps) for k, v in arrays.items()}
        out = [{k: p[m] for k, p in parts.items()} for m in range(self.grad_accum_steps)]
        return out

    def next_step(self) -> list[dict]:
        """This rank's micro-batches for the next optimizer step (``grad_accum_steps`` dicts of int64 tensors)."""
        start = self.consumed_samples
        fut = self._pending.pop(start, None)
        batches = fut.result() if fut is not None else self._rank_step(start)
        self.consumed_samples = start + self.global_batch_size
        if self._pool is not None:
            depth = 2 * self.cfg.num_workers
            for i in range(depth):
                p = self.consumed_samples + i * self.global_batch_size
                if p not in self._pending:
                    self._pending[p] = self._pool.submit(self._rank_step, p)
        return batches

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            yield self.next_step()

    # ---------------------------------------------------------------- state

    def fingerprint(self) -> str:
        """Identifies the sample space (datasets, sizes, weights, format): resuming needs the same one."""
        desc = [
            {"hash": m.tokenizer_hash, "samples": s.num_samples, "tokens": s.num_tokens, "weight": round(float(w), 12)}
            for m, s, w in zip(self.manifests, self.splits, self.order.weights)
        ]
        desc.append({"format": self.kind, "seq_len": self.seq_len, "split": self.split, "shuffle": self.shuffle})
        if self.kind == "gpt" and self.shuffle and self.cfg.window_offsets != "fixed":
            desc.append({"window_offsets": self.cfg.window_offsets})  # absent when fixed, as before the option
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "consumed_samples": int(self.consumed_samples),
            "step": int(self.step),
            "epoch": int(self.epoch),
            "seed": int(self.seed),
            "global_batch_size": int(self.global_batch_size),
            "samples_per_epoch": int(self.samples_per_epoch),
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DatasetError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}: it was saved by "
                               f"another llmscale version; start a fresh run directory.")
        if int(state["seed"]) != self.seed:
            raise DatasetError(
                f"the checkpoint's data order used data.seed={state['seed']}, this run has data.seed={self.seed}: "
                f"set data.seed={state['seed']} to resume the same sample sequence.")
        if state["fingerprint"] != self.fingerprint():
            raise DatasetError(
                f"the checkpoint's loader read a different dataset, blend, seq_len, format or data.window_offsets "
                f"({state['samples_per_epoch']} samples per epoch, now {self.samples_per_epoch}): its position means "
                f"nothing here. Resume with the same data settings, or start a new run directory for the new data.")
        if int(state["global_batch_size"]) != self.global_batch_size:
            log.info("global batch size changed %d -> %d: the sample stream continues at sample %d",
                     state["global_batch_size"], self.global_batch_size, state["consumed_samples"])
        self._drop_pending()
        self.consumed_samples = int(state["consumed_samples"])

    def _drop_pending(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()

    def close(self) -> None:
        self._drop_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ---------------------------------------------------------------- evaluation

    def _val_splits(self) -> list[DatasetSplit]:
        if self._eval_splits is None:
            self._eval_splits = [
                s if self.split == "val" else
                DatasetSplit(m, "val", kind=self.kind, seq_len=self.seq_len, seed=self.seed)
                for m, s in zip(self.manifests, self.splits)
            ]
        return self._eval_splits

    @property
    def val_num_tokens(self) -> int:
        return sum(s.num_tokens for s in self._val_splits())

    @property
    def val_num_bytes(self) -> int:
        """UTF-8 bytes of the validation text (for bits per byte)."""
        return sum(int(m.data["splits"].get("val", {}).get("num_bytes", 0)) for m in self.manifests)

    def eval_batches(self, max_batches: Optional[int] = None) -> Iterator[dict]:
        """This rank's validation micro-batches, in order, without shuffling (same on every run).

        The val samples of every dataset (in blend order) are cut into global eval batches of
        ``dp_size * micro_batch_size``; rank r takes chunk r of each. Every rank yields the same number
        of micro-batches (at most ``max_batches``); rows past the end repeat sample 0 with all labels
        ignored, so summed losses count every val sample exactly once.
        """
        splits = self._val_splits()
        sizes = np.array([s.num_samples for s in splits], dtype=np.int64)
        total = int(sizes.sum())
        if total == 0:
            log.warning("no validation samples (the val split is empty or shorter than 2 tokens): skipping "
                        "evaluation. Re-run `llmscale prepare` with a larger --val-fraction to get one.")
            return
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        gb = self.dp_size * self.micro_batch_size
        n_batches = math.ceil(total / gb)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for k in range(n_batches):
            pos = k * gb + self.dp_rank * self.micro_batch_size + np.arange(self.micro_batch_size, dtype=np.int64)
            pad_rows = np.flatnonzero(pos >= total)
            pos = np.where(pos >= total, 0, pos)
            src = np.searchsorted(offsets, pos, side="right") - 1
            sample = pos - offsets[src]
            arrays = self._collate(splits, pos, src, sample, tag=_TAG_EVAL)
            ignore_rows(arrays, pad_rows)
            arrays["sample_ids"] = pos
            yield {k2: torch.from_numpy(v) for k2, v in arrays.items()}


# --------------------------------------------------------------------------- building


def _batch_error(gbs: int, dp_size: int, mbs: int) -> str:
    q = dp_size * mbs
    lo = (gbs // q) * q
    options = [v for v in (lo, lo + q) if v > 0]
    msg = (f"global_batch_size={gbs} is not divisible by dp_size*micro_batch_size={dp_size}*{mbs}={q}; "
           f"use global_batch_size {' or '.join(map(str, options))} (any multiple of {q})")
    if gbs % dp_size == 0:
        per = gbs // dp_size
        divs = [d for d in range(1, per + 1) if per % d == 0]
        msg += f", or micro_batch_size in {divs[-6:]}"
    return msg + "."


def build_loader(
    data_cfg: DataConfig,
    *,
    split: str = "train",
    dp_rank: int,
    dp_size: int,
    global_batch_size: int,
    micro_batch_size: int,
    pad_id: int = 0,
    mask_id: int = 6,
    cls_id: int = 4,
    sep_id: int = 5,
    vocab_size: Optional[int] = None,
    shuffle: bool = True,
) -> TokenLoader:
    """Open the dataset(s) of ``data_cfg`` and return this rank's loader (see the module docstring)."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ConfigError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size}).")
    if micro_batch_size < 1 or global_batch_size < 1:
        raise ConfigError(f"micro_batch_size ({micro_batch_size}) and global_batch_size ({global_batch_size}) "
                          f"must be >= 1.")
    if global_batch_size % (dp_size * micro_batch_size):
        raise ConfigError(_batch_error(global_batch_size, dp_size, micro_batch_size))
    fmt = data_cfg.format
    if fmt == "bert" and data_cfg.seq_len < 5:
        raise ConfigError(f"data.seq_len={data_cfg.seq_len} is too short for BERT ([CLS] A [SEP] B [SEP] needs >= 5).")
    entries = data_cfg.sources()
    if not entries:
        raise DatasetError("No dataset given: set data.path to a folder written by `llmscale prepare` (or data.blend).")
    manifests = [read_manifest(e.path) for e in entries]
    for e, m in zip(entries, manifests):
        if m.kind != fmt:
            raise DatasetError(
                f"{e.path} was prepared for {m.kind.upper()} (kind={m.kind}) but data.format={fmt}. Prepare it for "
                f"{fmt.upper()} with `llmscale prepare --format {fmt} --input ... --output DIR` "
                f"(or set data.format={m.kind}).")
    h0 = manifests[0].tokenizer_hash
    for e, m in zip(entries[1:], manifests[1:]):
        if m.tokenizer_hash != h0:
            raise DatasetError(
                f"The blend mixes tokenizers: {entries[0].path} has tokenizer hash {h0}, {e.path} has "
                f"{m.tokenizer_hash}. Token ids would mean different things; re-run `llmscale prepare --tokenizer "
                f"{manifests[0].tokenizer_dir()} ...` for {e.path}.")
    vocab = int(vocab_size) if vocab_size is not None else manifests[0].vocab_size
    if vocab < manifests[0].vocab_size:
        raise ConfigError(f"vocab_size={vocab} is smaller than the dataset tokenizer's {manifests[0].vocab_size}.")
    splits = []
    for e, m in zip(entries, manifests):
        if split not in m.data["splits"]:
            raise DatasetError(f"{e.path} has no {split!r} split (it has {', '.join(m.data['splits'])}).")
        sp = DatasetSplit(m, split, kind=fmt, seq_len=data_cfg.seq_len, seed=_seed64(data_cfg.seed))
        if sp.num_samples == 0:
            hint = ("re-run `llmscale prepare` with a larger --val-fraction" if split == "val" else
                    "add text to the inputs of `llmscale prepare`")
            raise DatasetError(f"The {split!r} split of {e.path} is empty ({sp.num_tokens} tokens): {hint}.")
        if fmt == "bert" and data_cfg.nsp and sp.num_documents < 2:
            raise DatasetError(
                f"data.nsp=true needs at least 2 documents in the {split!r} split of {e.path} (random next segments "
                f"come from another document); it has {sp.num_documents}. "
                f"Use `llmscale prepare --doc-split paragraph`.")
        splits.append(sp)
    total = sum(s.num_samples for s in splits)
    if total < global_batch_size:
        tokens = sum(s.num_tokens for s in splits)
        raise DatasetError(
            f"The {split!r} data has {total} samples of seq_len {data_cfg.seq_len} ({tokens} tokens), fewer than one "
            f"global batch of {global_batch_size}: every step would repeat samples. Lower the global batch size "
            f"(parallel.global_batch_size) or data.seq_len, or prepare more data.")
    spec = MaskSpec(
        seq_len=data_cfg.seq_len, vocab_size=vocab, mlm_probability=data_cfg.mlm_probability, nsp=data_cfg.nsp,
        pad_id=pad_id, mask_id=mask_id, cls_id=cls_id, sep_id=sep_id,
    )
    if fmt == "bert" and spec.random_low >= vocab:
        raise ConfigError(f"vocab_size={vocab} leaves no ordinary tokens for random replacement.")
    loader = TokenLoader(
        splits, [e.weight for e in entries], data_cfg=data_cfg, manifests=manifests, split=split, dp_rank=dp_rank,
        dp_size=dp_size, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, spec=spec,
        shuffle=shuffle,
    )
    log.info("data: %s %s split, %d samples/epoch from %d dataset(s), %d steps/epoch at global batch %d",
             fmt, split, loader.samples_per_epoch, len(splits), loader.steps_per_epoch, global_batch_size)
    return loader
