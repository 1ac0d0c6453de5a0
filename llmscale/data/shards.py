"""The on-disk token dataset: sharded Arrow IPC files plus a manifest written last.

Layout of a dataset folder::

    DIR/manifest.json              written last, atomically: without it the folder is not a dataset
    DIR/tokenizer/                 the tokenizer the tokens were made with (its hash is in the manifest)
    DIR/train/shard-00000.arrow    Arrow IPC *file* format, one record batch per shard
    DIR/val/shard-00000.arrow

Each shard has one row per document. Column ``input_ids`` is ``list<uint16|uint32>`` (uint16 when
the vocabulary fits); GPT datasets end every document with the end-of-document token. BERT
datasets add ``sentence_lengths: list<int32>`` (token counts of the document's sentences, summing
to the row's length) so that the loader can build segment pairs for masked LM and NSP.

Reading memory-maps the shard: ``ShardView.tokens`` and ``ShardView.doc_offsets`` are zero-copy
numpy views of the file's pages.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from llmscale.errors import DatasetError
from llmscale.files import atomic_write_text, fsync_dir, sha256_file, verify_listed_files

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FORMAT_NAME = "llmscale-token-dataset"
SPLITS = ("train", "val")




def token_dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _arrow_type(dtype: np.dtype) -> pa.DataType:
    return {np.dtype(np.uint16): pa.uint16(), np.dtype(np.uint32): pa.uint32()}[np.dtype(dtype)]


@dataclass
class ShardInfo:
    path: str  # relative to the dataset folder
    num_documents: int
    num_tokens: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class ShardWriter:
    """Accumulates documents and writes a shard each time ``shard_tokens`` tokens are reached.

    Shards are written under a temporary name and renamed when complete. Memory use is bounded
    by one shard's tokens.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        dtype: np.dtype,
        shard_tokens: int = 1 << 24,
        with_sentences: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.root = Path(root)
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.with_sentences = with_sentences
        (self.root / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[ShardInfo] = []
        self._docs: list[np.ndarray] = []
        self._sents: list[np.ndarray] = []
        self._ntok = 0

    def add(self, ids: np.ndarray, sentence_lengths: Optional[Iterable[int]] = None) -> None:
        ids = np.asarray(ids)
        if ids.size == 0:
            raise ValueError("empty documents are skipped by the caller, never written")
        if self.with_sentences:
            sl = np.asarray(list(sentence_lengths or []), dtype=np.int32)
            if int(sl.sum()) != ids.size or (sl <= 0).any():
                raise ValueError("sentence_lengths must be positive and sum to the document length")
            self._sents.append(sl)
        self._docs.append(ids.astype(self.dtype, copy=False))
        self._ntok += ids.size
        if self._ntok >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._docs:
            return
        idx = len(self.shards)
        rel = f"{self.split}/shard-{idx:05d}.arrow"
        final = self.root / rel
        tmp = final.with_name(final.name + ".tmp")
        lengths = np.fromiter((d.size for d in self._docs), dtype=np.int64, count=len(self._docs))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        if int(lengths.sum()) > np.iinfo(np.int32).max:
            raise ValueError("a shard may hold at most 2**31-1 tokens; lower shard_tokens")
        np.cumsum(lengths, out=offsets[1:])
        values = pa.array(np.concatenate(self._docs), type=_arrow_type(self.dtype))
        cols = {"input_ids": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)}
        if self.with_sentences:
            slen = [len(s) for s in self._sents]
            soff = np.zeros(len(slen) + 1, dtype=np.int32)
            np.cumsum(slen, out=soff[1:])
            cols["sentence_lengths"] = pa.ListArray.from_arrays(
                pa.array(soff, pa.int32()), pa.array(np.concatenate(self._sents), pa.int32())
            )
        batch = pa.RecordBatch.from_pydict(cols)
        with pa.OSFile(str(tmp), "wb") as sink:
            with pa.ipc.new_file(sink, batch.schema) as writer:
                writer.write_batch(batch)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, final)
        self.shards.append(
            ShardInfo(rel, len(self._docs), int(lengths.sum()), final.stat().st_size, digest)
        )
        self._docs, self._sents, self._ntok = [], [], 0

    def close(self) -> list[ShardInfo]:
        self.flush()
        fsync_dir(self.root / self.split)
        return self.shards


@dataclass
class ShardView:
    """A memory-mapped shard: zero-copy numpy views over the file."""

    path: Path
    tokens: np.ndarray  # all tokens of the shard, documents back to back
    doc_offsets: np.ndarray  # int32, len = num_documents + 1
    sentence_lengths: Optional[np.ndarray] = None  # int32 flat, BERT only
    sentence_offsets: Optional[np.ndarray] = None  # int32 per document into sentence_lengths
    _keep: list = field(default_factory=list, repr=False)  # keeps the mmap alive

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[i] : self.doc_offsets[i + 1]]


def open_shard(path: str | Path) -> ShardView:
    p = Path(path)
    try:
        source = pa.memory_map(str(p), "r")
        reader = pa.ipc.open_file(source)
        if reader.num_record_batches != 1:
            raise DatasetError(f"{p}: expected one record batch per shard, found {reader.num_record_batches}.")
        batch = reader.get_batch(0)
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(
            f"Shard {p} cannot be read ({e}). The dataset is damaged: run `llmscale data verify {p.parent.parent}` "
            f"and re-run `llmscale prepare` into a fresh folder."
        ) from None
    ids = batch.column("input_ids")
    tokens = ids.values.to_numpy(zero_copy_only=True)
    offsets = ids.offsets.to_numpy(zero_copy_only=True)
    view = ShardView(p, tokens, offsets, _keep=[source, reader, batch])
    if "sentence_lengths" in batch.schema.names:
        sl = batch.column("sentence_lengths")
        view.sentence_lengths = sl.values.to_numpy(zero_copy_only=True)
        view.sentence_offsets = sl.offsets.to_numpy(zero_copy_only=True)
    return view


# --------------------------------------------------------------------------- manifest


@dataclass
class Manifest:
    root: Path
    data: dict

    @property
    def kind(self) -> str:
        return self.data["kind"]

    @property
    def vocab_size(self) -> int:
        return int(self.data["tokenizer"]["vocab_size"])

    @property
    def tokenizer_hash(self) -> str:
        return self.data["tokenizer"]["hash"]

    @property
    def token_dtype(self) -> np.dtype:
        return np.dtype(self.data["token_dtype"])

    def tokenizer_dir(self) -> Path:
        return self.root / self.data["tokenizer"].get("path", "tokenizer")

    def shards(self, split: str) -> list[ShardInfo]:
        sp = self.data["splits"].get(split)
        if sp is None:
            return []
        return [ShardInfo(**s) for s in sp["shards"]]

    def num_tokens(self, split: str) -> int:
        sp = self.data["splits"].get(split)
        return int(sp["num_tokens"]) if sp else 0


def write_manifest(root: str | Path, data: dict) -> Path:
    """Write ``manifest.json`` last and atomically: it marks the dataset complete."""
    root = Path(root)
    data = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "created_unix": time.time(), **data}
    atomic_write_text(root / MANIFEST, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return root / MANIFEST


def read_manifest(root: str | Path) -> Manifest:
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"Dataset folder {root} does not exist. "
                           f"Build one with `llmscale prepare --input ... --output {root}`.")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise DatasetError(
            f"{root} has no {MANIFEST}: it is not a complete llmscale dataset (an interrupted `llmscale prepare` "
            f"leaves no manifest). Re-run `llmscale prepare --output {root} ...`; it restarts cleanly."
        )
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{mpath} is not valid JSON ({e}). Re-run `llmscale prepare` into {root}.") from None
    if data.get("format") != FORMAT_NAME:
        raise DatasetError(f"{mpath} is not an llmscale dataset manifest (format={data.get('format')!r}).")
    ver = data.get("schema_version")
    if ver != SCHEMA_VERSION:
        raise DatasetError(
            f"{root} uses dataset schema version {ver}, this llmscale reads version {SCHEMA_VERSION}. "
            f"Re-run `llmscale prepare` with this version of llmscale."
        )
    return Manifest(root, data)


def verify_dataset(root: str | Path, *, checksums: bool = True) -> list[str]:
    """Problems found (empty list = sound): listed paths outside the folder, missing shards, wrong sizes,
    checksum mismatches, and unlisted files in the split folders (see :func:`llmscale.files.verify_listed_files`)."""
    m = read_manifest(root)
    files = {s.path: {"size": s.bytes, "sha256": s.sha256} for split in m.data["splits"] for s in m.shards(split)}
    return verify_listed_files(m.root, files, checksums=checksums, scan=[sp for sp in SPLITS if sp in m.data["splits"]],
                               manifest_name=MANIFEST)
