"""Fine-tuning data: the public face (readers, label map, encoders) and the loader that batches features.

    from llmscale.data.finetune import (read_classification, LabelMap, encode_classification,
                                        read_sft, encode_sft, FinetuneLoader)
    train = encode_classification(read_classification(...), tok, labels, max_len=128, family="bert")
    loader = FinetuneLoader(train, dp_rank=r, dp_size=W, global_batch_size=32, micro_batch_size=8, seed=1,
                            pad_id=tok.pad_id)
    micro_batches = loader.next_step()          # this rank's grad_accum_steps dicts of int64 tensors

Readers and encoders live in :mod:`llmscale.data.classify_data` (classification),
:mod:`llmscale.data.sft_data` (prompt/response SFT) and :mod:`llmscale.data.records` (files).

The loader has the contract of the pretraining loader (:mod:`llmscale.data.loader`):

- Order. The global sample stream is one permutation of the ``N`` feature rows per epoch (epoch ``e``
  permuted by ``Generator(PCG64(SeedSequence([seed, tag, e])))``; the identity with ``shuffle=False``),
  epochs back to back. Step ``k`` takes ``stream[k*B : (k+1)*B]``; data-parallel rank ``r`` of ``W``
  takes its contiguous ``B/W`` of them, cut into ``grad_accum_steps`` micro-batches of
  ``micro_batch_size``. Nothing depends on ``W``; nothing is dropped: a global batch may hold the
  last rows of epoch ``e`` and the first of ``e + 1``. ``steps_per_epoch = ceil(N / B)``.
- Position. ``state_dict()`` is one counter (``consumed_samples``) plus checks, so a resume is exact
  mid-epoch on any number of ranks (and continues the same stream under another global batch size).
- Dynamic padding. Each micro-batch is padded to its own longest row.
- Evaluation. ``eval_batches()`` serves every row of the evaluation features (``eval_features``, or
  the loader's own) exactly once over the ranks, in a fixed seeded permutation (``shuffle=False``: in
  file order): global eval batches of ``dp_size * micro_batch_size`` rows, rank ``r`` taking chunk ``r``;
  rows past the end (the last, uneven batch) repeat a row with every label -100 and ``sample_ids`` -1, so
  they count nowhere. Every rank yields the same number of micro-batches. ``max_batches`` cuts a pass
  short: thanks to the permutation that is a uniform sample of the evaluation rows, the same each time.

Micro-batch keys (all int64 tensors):

- classification: ``input_ids`` (B, T), ``attention_mask`` (B, T) 1 = token / 0 = pad,
  ``token_type_ids`` (B, T) (BERT only), ``labels`` (B,) class ids (-100: ignore), ``sample_ids`` (B,);
- SFT: ``input_ids`` (B, T), ``attention_mask`` (B, T), ``labels`` (B, T) pre-shifted next-token
  targets (``labels[:, t]`` is the target of position t, -100 on prompt, last and pad positions),
  ``sample_ids`` (B,), and with packing ``position_ids`` (B, T) (restart at 0 per example, 0 on pads)
  and ``doc_ids`` (B, T) (example index within the row, -1 on pads).

``sample_ids`` are feature-row indices (for packed SFT a row of several examples; see
``SFTFeatures.row_examples``), -1 for evaluation pad rows.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from typing import Optional, Union

import numpy as np
import torch

from llmscale.data.classify_data import (
    IGNORE,
    ClassificationFeatures,
    Example,
    LabelMap,
    encode_classification,
    read_classification,
)
from llmscale.data.sft_data import SFTExample, SFTFeatures, encode_sft, pack_rows, read_sft
from llmscale.errors import ConfigError, FinetuneDataError
from llmscale.log import get_logger

__all__ = [
    "IGNORE", "ClassificationFeatures", "Example", "FinetuneLoader", "LabelMap", "SFTExample", "SFTFeatures",
    "encode_classification", "encode_sft", "pack_rows", "read_classification", "read_sft",
]

log = get_logger(__name__)

STATE_VERSION = 1
_TAG_PERM = 0x46545045  # "FTPE": independent of the pretraining loader's streams
_TAG_EVAL = 0x46544556  # "FTEV": the fixed evaluation order
Features = Union[ClassificationFeatures, SFTFeatures]
Collate = Callable[..., dict]  # collate(features, rows, pad_id=...) -> dict of numpy arrays


def _default_collate(features: Features, rows: np.ndarray, *, pad_id: int) -> dict:
    return features.collate(rows, pad_id=pad_id)


class FinetuneLoader:
    """This rank's micro-batches of a global order over in-memory fine-tuning features; resumable."""

    def __init__(
        self,
        features: Features,
        *,
        dp_rank: int,
        dp_size: int,
        global_batch_size: int,
        micro_batch_size: int,
        seed: int,
        shuffle: bool = True,
        pad_id: int,
        collate: Optional[Collate] = None,
        eval_features: Optional[Features] = None,
    ) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size}).")
        if micro_batch_size < 1 or global_batch_size < 1:
            raise ConfigError(f"micro_batch_size ({micro_batch_size}) and global_batch_size ({global_batch_size}) "
                              f"must be >= 1.")
        if global_batch_size % (dp_size * micro_batch_size):
            q = dp_size * micro_batch_size
            raise ConfigError(f"global_batch_size={global_batch_size} is not divisible by dp_size*micro_batch_size="
                              f"{dp_size}*{micro_batch_size}={q}; use a multiple of {q}, e.g. "
                              f"{max(q, global_batch_size // q * q)}.")
        if len(features) == 0:
            raise FinetuneDataError(
                f"no examples to batch: all {features.num_examples} were skipped or dropped (blank texts: "
                f"{features.num_empty}). Check the text/response fields and max_len.")
        self.features = features
        self.eval_features = eval_features
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.per_rank = global_batch_size // dp_size
        self.grad_accum_steps = self.per_rank // micro_batch_size
        self.seed = int(seed) % (1 << 64)
        self.shuffle = shuffle
        self.pad_id = int(pad_id)
        self.collate = collate or _default_collate
        self.samples_per_epoch = len(features)
        self.steps_per_epoch = math.ceil(self.samples_per_epoch / global_batch_size)
        self.consumed_samples = 0
        self._perms: dict[int, np.ndarray] = {}
        self._fingerprint: Optional[str] = None
        if self.samples_per_epoch < global_batch_size:
            log.warning("%d examples are fewer than one global batch of %d: every step holds some of them more "
                        "than once (from consecutive epochs)", self.samples_per_epoch, global_batch_size)

    # ---------------------------------------------------------------- order

    @property
    def step(self) -> int:
        return self.consumed_samples // self.global_batch_size

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.samples_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, _TAG_PERM, epoch])))
            perm = rng.permutation(self.samples_per_epoch)
            if len(self._perms) >= 2:  # a step spans at most a few epochs; keep the newest
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def samples_at(self, positions: np.ndarray) -> np.ndarray:
        """Feature-row index of each global stream position."""
        positions = np.asarray(positions, dtype=np.int64)
        epoch, local = np.divmod(positions, self.samples_per_epoch)
        if not self.shuffle:
            return local
        out = np.empty_like(local)
        for e in np.unique(epoch).tolist():
            sel = epoch == e
            out[sel] = self._permutation(e)[local[sel]]
        return out

    def global_sample_ids(self, step: int) -> np.ndarray:
        """The global batch of optimizer step ``step`` (with the current global batch size)."""
        return self.samples_at(step * self.global_batch_size + np.arange(self.global_batch_size, dtype=np.int64))

    def rank_sample_ids(self, step: int, dp_rank: int, dp_size: int) -> np.ndarray:
        """What rank ``dp_rank`` of ``dp_size`` reads at ``step``: its contiguous chunk of the global batch."""
        per = self.global_batch_size // dp_size
        return self.global_sample_ids(step)[dp_rank * per : (dp_rank + 1) * per]

    # ---------------------------------------------------------------- batches

    def _batch(self, features: Features, rows: np.ndarray) -> dict:
        return self.collate(features, rows, pad_id=self.pad_id)

    def next_step(self) -> list[dict]:
        """This rank's ``grad_accum_steps`` micro-batches of the next global batch (dicts of int64 tensors)."""
        start = self.consumed_samples + self.dp_rank * self.per_rank
        ids = self.samples_at(start + np.arange(self.per_rank, dtype=np.int64))
        out = []
        for m in range(self.grad_accum_steps):
            rows = ids[m * self.micro_batch_size : (m + 1) * self.micro_batch_size]
            batch = self._batch(self.features, rows)
            batch["sample_ids"] = rows.copy()
            out.append({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in batch.items()})
        self.consumed_samples += self.global_batch_size
        return out

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            yield self.next_step()

    def eval_batches(self, max_batches: Optional[int] = None) -> Iterator[dict]:
        """This rank's evaluation micro-batches: every row once over the ranks (see the module docstring)."""
        feats = self.eval_features if self.eval_features is not None else self.features
        n = len(feats)
        if n == 0:
            log.warning("no evaluation examples (all were skipped or dropped): skipping evaluation")
            return
        gb = self.dp_size * self.micro_batch_size
        n_batches = math.ceil(n / gb) if max_batches is None else min(math.ceil(n / gb), max_batches)
        # A fixed permutation (the same at every evaluation and on any number of ranks): a whole pass is
        # unchanged by it, and a pass cut short by max_batches is a uniform sample, not the first rows of a
        # file (files sorted by label, like IMDb's folders, would otherwise give a one-class "validation").
        order = self._eval_order(n)
        if n_batches * gb < n and self.dp_rank == 0:
            log.info("evaluating a fixed random sample of %d of the %d evaluation examples (max_batches=%d)",
                     n_batches * gb, n, max_batches)
        for k in range(n_batches):
            pos = k * gb + self.dp_rank * self.micro_batch_size + np.arange(self.micro_batch_size, dtype=np.int64)
            pad = pos >= n
            rows = order[np.where(pad, 0, pos)]
            batch = self._batch(feats, rows)
            if pad.any():
                batch["labels"][pad] = IGNORE  # (B,) class ids or (B, T) token targets: the row counts nowhere
            batch["sample_ids"] = np.where(pad, -1, rows)
            yield {k2: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k2, v in batch.items()}

    def _eval_order(self, n: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, _TAG_EVAL, n])))
        return rng.permutation(n).astype(np.int64)

    # ---------------------------------------------------------------- state

    def fingerprint(self) -> str:
        """Identifies the rows being ordered (their tokens and labels): resuming needs the same ones."""
        if self._fingerprint is None:
            desc = [self.features.fingerprint(), self.shuffle]
            self._fingerprint = hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]
        return self._fingerprint

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
            raise FinetuneDataError(f"fine-tune loader state version {state.get('version')!r} is not {STATE_VERSION}: "
                                    f"it was saved by another llmscale version; start a fresh run directory.")
        if int(state["seed"]) != self.seed:
            raise FinetuneDataError(f"the checkpoint's data order used seed {state['seed']}, this run has seed "
                                    f"{self.seed}: set the data seed to {state['seed']} to resume the same order.")
        if state["fingerprint"] != self.fingerprint():
            raise FinetuneDataError(
                f"the checkpoint's loader ordered other data ({state['samples_per_epoch']} rows per epoch, now "
                f"{self.samples_per_epoch}; different files, tokenizer, max_len, packing or shuffle): its position "
                f"means nothing here. Resume with the same data settings, or start a new run directory.")
        if int(state["global_batch_size"]) != self.global_batch_size:
            log.info("global batch size changed %d -> %d: the sample stream continues at sample %d",
                     state["global_batch_size"], self.global_batch_size, state["consumed_samples"])
        self.consumed_samples = int(state["consumed_samples"])

    def close(self) -> None:
        """Nothing to release (the features are in memory); kept for the pretraining loader's interface."""
