"""Raw text -> tokenized, sharded Arrow dataset with a manifest written last
(the library behind ``llmscale prepare``, :mod:`llmscale.jobs.prepare`).

    m = prepare_dataset(["books/"], "data/books", vocab_size=8000, format="gpt", num_proc=8)

Pipeline (one process):

* a reader thread streams documents (:mod:`llmscale.data.sources`: what a document is, how bad
  input is cleaned or skipped) and groups them into batches of about 1 MB of text, computing each
  document's UTF-8 size and split score on the way;
* the main thread encodes a whole batch with SentencePiece's own C++ thread pool
  (``num_threads=num_proc``, numpy output: no per-token Python objects; SentencePiece releases the
  GIL, so reading the next batch overlaps encoding) and hands documents to a
  :class:`~llmscale.data.shards.ShardWriter` per split. Documents longer than ``ENCODE_CHARS`` are
  encoded in pieces cut at line ends (SentencePiece's BPE gets slower per character on long inputs:
  a whole book encodes at half the speed of its 8k-character pieces); the row is their concatenation.

Train/validation is decided BY DOCUMENT from a keyed hash of the document's text (seed = key): it
does not depend on file order, ``num_proc`` or batch size, and duplicated documents land in the
same split. The continuation pieces of a document longer than ``max_doc_chars`` follow its first
piece. When ``val_fraction > 0`` and at least two rows are written, validation is never empty (if
the hash picked no document, the last one goes there, as in a split of a single text by position).

Crash safety: everything is written into ``DIR.tmp-<pid>`` beside ``DIR`` (tokenizer, shards, then
``manifest.json`` last) and renamed to ``DIR`` at the end. A run killed half-way leaves only the
temporary folder, which the next run removes (its pid is dead). A folder without ``manifest.json``
is never read as a dataset. A complete dataset at ``DIR`` is replaced only with ``overwrite=True``.

Across nodes: ``part=(i, n)`` tokenizes only the i-th of n contiguous ranges of the input files (balanced by
bytes, in the order ``resolve_inputs`` gives) into a dataset of its own, ``DIR.parts/part-I-of-N``, with the
shared tokenizer; :func:`merge_parts` then writes ``DIR`` from all n parts with one manifest (counts, skips,
sources, checksums). Because the split is decided per document and rows keep file order, the merged dataset
holds the same documents and tokens in the same order as a one-process ``prepare`` of the same inputs (the
loader serves the same batches); ``slurm/prepare.sbatch`` runs the parts as an array job.

GPT rows end with the end-of-document token. BERT rows are cut into sentences (after ``. ! ?``
followed by space, after ``。！？；…`` and at blank lines; each sentence is tokenized on its own) and
carry ``sentence_lengths`` for masked-LM / NSP pair building; they have no eos.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from llmscale.data.shards import (
    MANIFEST,
    SCHEMA_VERSION,
    Manifest,
    ShardWriter,
    read_manifest,
    token_dtype_for,
    write_manifest,
)
from llmscale.data.sources import (
    DEFAULT_DOC_CHARS,
    DEFAULT_MAX_DOC_CHARS,
    DOC_SPLITS,
    Document,
    PrepareError,
    ReadStats,
    _cut_point,
    iter_document_records,
    resolve_inputs,
)
from llmscale.files import fsync_dir
from llmscale.log import get_logger, progress

log = get_logger(__name__)

__all__ = ["prepare_dataset", "PrepareError", "split_sentences"]

FORMATS = ("gpt", "bert")
_DATASET_ENTRIES = {"train", "val", "tokenizer", MANIFEST}

# Sentence ends: . ! ? (+ closing quotes/brackets) followed by whitespace; CJK 。！？；… (+ closers);
# a blank line. The match end is where the next sentence starts.
_SENT_END = re.compile(r"""[.!?]+["'”’)\]]*\s+|[。！？；…]+[”’」』）)"]*\s*|\n[^\S\n]*\n\s*""")
_ABBREV = re.compile(r"(?:\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|vs|etc|No|Vol|Mt|Capt|Col|Gen|Lt|Rev)"
                     r"|\b[A-Za-z]|\be\.g|\bi\.e)\.$")


def split_sentences(text: str) -> list[str]:
    """Cut text into consecutive sentences whose concatenation is exactly ``text``."""
    out: list[str] = []
    start = 0
    for m in _SENT_END.finditer(text):
        end = m.end()
        if end >= len(text):
            break
        if text[m.start()] == "." and _ABBREV.search(text, max(start, m.start() - 6), m.start() + 1):
            continue  # "Mr. Smith", "e.g. this"
        out.append(text[start:end])
        start = end
    out.append(text[start:])
    return [s for s in out if s] or [text]


# --------------------------------------------------------------------------- output folder handling


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(output: Path) -> None:
    """Remove DIR.tmp-<pid> / DIR.old-<pid> left by runs that died; refuse if one is still running."""
    for p in output.parent.glob(f"{output.name}.*-*"):
        m = re.fullmatch(re.escape(output.name) + r"\.(tmp|old)-(\d+)", p.name)
        if not m or not p.is_dir():
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and _pid_alive(pid):
            raise PrepareError(
                f"{p} belongs to a running `llmscale prepare` (pid {pid}) writing {output}. Wait for it to finish "
                f"or stop it (kill {pid}) and re-run.")
        log.warning("removing %s left by an interrupted run (pid %d)", p, pid)
        shutil.rmtree(p, ignore_errors=True)


def _publish(stage: Path, output: Path, *, replace: bool) -> None:
    """Make the complete staged folder ``stage`` (manifest written) the dataset ``output``: a rename, after moving
    an old dataset aside when ``replace``; durable before returning."""
    fsync_dir(stage)
    if replace:
        old = output.parent / f"{output.name}.old-{os.getpid()}"
        os.replace(output, old)
        os.replace(stage, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, output)
    fsync_dir(output.parent)


def _check_output(output: Path, *, overwrite: bool, tokenizer_hash: Optional[str]) -> bool:
    """Whether DIR exists and will be replaced. Raises when it must not be touched."""
    if not output.exists():
        return False
    if not output.is_dir():
        raise PrepareError(f"--output {output} is a file, not a folder. Choose a folder path.")
    entries = {p.name for p in output.iterdir()}
    if not entries:
        return True
    mpath = output / MANIFEST
    data = None
    if mpath.is_file():
        try:
            data = json.loads(mpath.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            log.warning("%s is unreadable: treating %s as an incomplete dataset", mpath, output)
    if isinstance(data, dict):
        old_hash = (data.get("tokenizer") or {}).get("hash", "?")
        if overwrite:
            log.warning("--overwrite: replacing the dataset at %s (tokenizer hash %s)", output, old_hash)
            return True
        if data.get("schema_version") != SCHEMA_VERSION:
            raise PrepareError(
                f"{output} holds a dataset of schema version {data.get('schema_version')} (this llmscale writes "
                f"{SCHEMA_VERSION}). Pass --overwrite to rebuild it, or choose another --output.")
        if tokenizer_hash is not None and old_hash != tokenizer_hash:
            raise PrepareError(
                f"{output} already holds a dataset built with tokenizer hash {old_hash}, you passed {tokenizer_hash}. "
                f"Pass --overwrite to rebuild it with your tokenizer, or choose another --output.")
        raise PrepareError(
            f"{output} already holds a complete dataset (tokenizer hash {old_hash}, "
            f"{(data.get('stats') or {}).get('documents_written', '?')} documents). Pass --overwrite to rebuild it, "
            f"or choose another --output.")
    foreign = sorted(e for e in entries if e not in _DATASET_ENTRIES and not e.startswith("."))
    if foreign and not overwrite:
        raise PrepareError(
            f"--output {output} exists and holds files that are not an llmscale dataset ({', '.join(foreign[:5])}). "
            f"Choose a new or empty folder, or pass --overwrite to replace the folder.")
    log.warning("%s holds an incomplete dataset (no %s: an interrupted run); replacing it", output, MANIFEST)
    return True


# --------------------------------------------------------------------------- reading thread


ENCODE_CHARS = 8192  # SentencePiece's BPE slows down on long inputs: documents are encoded in pieces this long


def _segments(text: str, limit: int = ENCODE_CHARS) -> list[str]:
    """Cut text into consecutive pieces of at most ``limit`` characters at line (else space) ends."""
    if len(text) <= limit:
        return [text]
    out = []
    while len(text) > limit:
        cut = _cut_point(text, limit)
        out.append(text[:cut])
        text = text[cut:]
    if text:
        out.append(text)
    return out


class _Batch:
    __slots__ = ("parts", "nchars", "nbytes", "scores", "segments")

    def __init__(self) -> None:
        self.parts: list[int] = []  # Document.part: > 0 for continuation pieces of a long document
        self.nchars: list[int] = []
        self.nbytes: list[int] = []
        self.scores: list[float] = []
        self.segments: list[list[str]] = []  # per document: the texts encoded separately (BERT: sentences)


def _batches(docs: Iterator[Document], *, batch_chars: int, key: bytes, bert: bool) -> Iterator[_Batch]:
    b = _Batch()
    size = 0
    for d in docs:
        raw = d.text.encode("utf-8")
        b.parts.append(d.part)
        b.nchars.append(len(d.text))
        b.nbytes.append(len(raw))
        b.scores.append(int.from_bytes(hashlib.blake2b(raw, digest_size=8, key=key).digest(), "little") / 2.0**64)
        if bert:
            b.segments.append([seg for s in split_sentences(d.text) for seg in _segments(s)])
        else:
            b.segments.append(_segments(d.text))
        size += len(d.text)
        if size >= batch_chars:
            yield b
            b = _Batch()
            size = 0
    if b.parts:
        yield b


_DONE = object()


def _background(gen: Iterator, depth: int = 2) -> Iterator:
    """Run a generator in a thread, ``depth`` items ahead; its exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    t = threading.Thread(target=run, name="prepare-reader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


# --------------------------------------------------------------------------- main entry


def _default_num_proc() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def prepare_dataset(
    inputs: Sequence[str | os.PathLike] | str,
    output: str | os.PathLike,
    *,
    tokenizer=None,
    vocab_size: Optional[int] = None,
    model_type: str = "bpe",
    format: str = "gpt",
    seq_len: int = 512,
    val_fraction: float = 0.005,
    num_proc: Optional[int] = None,
    shard_tokens: int = 1 << 24,
    text_field: str = "text",
    seed: int = 1234,
    doc_split: str = "chunk",
    doc_chars: int = DEFAULT_DOC_CHARS,
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS,
    tokenizer_sample_bytes: Optional[int] = None,
    character_coverage: Optional[float] = None,
    overwrite: bool = False,
    batch_chars: int = 1 << 20,
    part: Optional[tuple[int, int]] = None,
    reuse: bool = False,
) -> Manifest:
    """Tokenize ``inputs`` into a dataset folder ``output`` and return its manifest.

    ``tokenizer``: a :class:`~llmscale.data.tokenizer.Tokenizer`, a tokenizer folder, or None to train
    one (``vocab_size``, ``model_type``) on the same inputs into ``output/tokenizer``. ``part=(i, n)``: only
    the i-th of n ranges of the input files, into ``output.parts/part-I-of-N`` (a tokenizer is required: every
    part must use the same one); :func:`merge_parts` joins them. ``reuse``: when ``output`` already holds a
    complete dataset of the same inputs and settings, return it instead of refusing (a re-run pipeline step or
    array task does not redo finished work).
    """
    from llmscale.data.tokenizer import DEFAULT_SAMPLE_BYTES, Tokenizer, train_tokenizer

    t0 = time.time()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if format not in FORMATS:
        raise PrepareError(f"--format {format!r} is unknown; choose gpt or bert.")
    if doc_split not in DOC_SPLITS:
        raise PrepareError(f"--doc-split {doc_split!r} is unknown; choose one of {', '.join(DOC_SPLITS)}.")
    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be in [0, 1), got {val_fraction}.")
    if seq_len < 2:
        raise PrepareError(f"--seq-len must be >= 2, got {seq_len}.")
    if shard_tokens < 1:
        raise PrepareError(f"--shard-tokens must be >= 1, got {shard_tokens}.")
    num_proc = _default_num_proc() if not num_proc or num_proc < 1 else int(num_proc)
    output = Path(output).absolute()
    files = resolve_inputs(inputs)  # missing paths fail here, before any work
    all_files = files
    if part is not None:
        index, count = part
        if not (count >= 1 and 0 <= index < count):
            raise PrepareError(f"--part {index}/{count}: give I/N with 0 <= I < N (e.g. --part 0/3).")
        if tokenizer is None:
            raise PrepareError("--part needs --tokenizer: every part must tokenize with the same tokenizer (train it "
                               "once with `llmscale tokenizer train`, then run the parts).")
        files = part_files(files, index, count)
        output = parts_dir(output) / part_name(index, count)
        reuse = True  # a re-run array task keeps a finished part

    tok = None
    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    elif vocab_size is None and model_type != "char":
        raise PrepareError("Give a tokenizer (--tokenizer DIR) or the size of one to train "
                           "(--vocab-size N, e.g. 8000).")

    if reuse and not overwrite and (output / MANIFEST).is_file():
        done = read_manifest(output)
        want = {"inputs": [str(i) for i in inputs], "format": format, "seq_len": seq_len, "val_fraction": val_fraction,
                "shard_tokens": shard_tokens, "text_field": text_field, "seed": seed, "doc_split": doc_split,
                "doc_chars": doc_chars, "max_doc_chars": max_doc_chars}
        have = {k: done.data.get("args", {}).get(k) for k in want}
        same_tok = tok is None or tok.hash == done.tokenizer_hash
        if have == want and same_tok:
            log.info("%s already holds this dataset (same inputs and settings%s): reused, nothing done", output,
                     ", same tokenizer" if tok is not None else "")
            return done
        raise PrepareError(f"--reuse: {output} holds a dataset made with other inputs or settings "
                           f"({', '.join(k for k in want if have[k] != want[k]) or 'tokenizer'}); pass --overwrite to "
                           f"rebuild it, or choose another --output.")
    output.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(output)
    replace = _check_output(output, overwrite=overwrite, tokenizer_hash=tok.hash if tok else None)
    stage = output.parent / f"{output.name}.tmp-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        if tok is None:
            log.info("no --tokenizer given: training a %s tokenizer (vocab_size=%s) on the inputs", model_type,
                     vocab_size)
            tok = train_tokenizer(files, stage / "tokenizer", vocab_size=vocab_size, model_type=model_type,
                                  sample_bytes=tokenizer_sample_bytes or DEFAULT_SAMPLE_BYTES,
                                  character_coverage=character_coverage,
                                  text_field=text_field, doc_split=doc_split, num_threads=num_proc, seed=seed)
        else:
            tok.save(stage / "tokenizer")
        manifest_data = _tokenize_into(
            stage, files, tok, format=format, seq_len=seq_len, val_fraction=val_fraction, num_proc=num_proc,
            shard_tokens=shard_tokens, text_field=text_field, seed=seed, doc_split=doc_split, doc_chars=doc_chars,
            max_doc_chars=max_doc_chars, batch_chars=batch_chars, whole=part is None,
        )
        if part is not None:
            manifest_data["part"] = {"index": part[0], "count": part[1], "all_sources": [str(f) for f in all_files]}
        manifest_data["args"] = {
            "inputs": [str(i) for i in inputs], "format": format, "seq_len": seq_len, "val_fraction": val_fraction,
            "num_proc": num_proc, "shard_tokens": shard_tokens, "text_field": text_field, "seed": seed,
            "doc_split": doc_split, "doc_chars": doc_chars, "max_doc_chars": max_doc_chars,
        }
        write_manifest(stage, manifest_data)  # last: marks the staged dataset complete
        _publish(stage, output, replace=replace)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    m = read_manifest(output)
    st = m.data["stats"]
    log.info("dataset written to %s in %.1fs: %d train / %d val documents, %d / %d tokens; %d skipped %s",
             output, time.time() - t0, m.data["splits"]["train"]["num_documents"],
             m.data["splits"]["val"]["num_documents"], m.num_tokens("train"), m.num_tokens("val"),
             st["documents_skipped"], st["skipped_reasons"] or "")
    return m


def _tokenize_into(
    stage: Path,
    files: list[Path],
    tok,
    *,
    format: str,
    seq_len: int,
    val_fraction: float,
    num_proc: int,
    shard_tokens: int,
    text_field: str,
    seed: int,
    doc_split: str,
    doc_chars: int,
    max_doc_chars: int,
    batch_chars: int,
    whole: bool = True,
) -> dict:
    """``whole=False`` (a part of the inputs): no rule that needs the whole corpus (a non-empty validation split,
    at least one training sequence); :func:`merge_parts` applies them to the merged dataset."""
    bert = format == "bert"
    dtype = token_dtype_for(tok.vocab_size)
    writers = {s: ShardWriter(stage, s, dtype=dtype, shard_tokens=shard_tokens, with_sentences=bert)
               for s in ("train", "val")}
    counts = {s: {"num_documents": 0, "num_tokens": 0, "num_bytes": 0} for s in ("train", "val")}
    eos = np.array([tok.eos_id], dtype=np.int32)
    stats = ReadStats()
    key = hashlib.sha256(f"llmscale-split-{seed}".encode()).digest()[:32]
    docs = iter_document_records(files, text_field=text_field, doc_split=doc_split, doc_chars=doc_chars,
                                 max_doc_chars=max_doc_chars, stats=stats, files=files)
    batches = _background(_batches(docs, batch_chars=batch_chars, key=key, bert=bert))
    held: Optional[tuple] = None
    n_docs = 0  # documents (not rows: a long document is several rows)
    last_split = "train"
    t_start = time.time()
    chars = 0

    def write(split: str, ids: np.ndarray, sents: Optional[list[int]], nbytes: int) -> None:
        writers[split].add(ids, sents)
        c = counts[split]
        c["num_documents"] += 1
        c["num_tokens"] += int(ids.size)
        c["num_bytes"] += nbytes

    for b in progress(batches, desc="prepare", unit="batch"):
        flat = [seg for segs in b.segments for seg in segs]
        enc = tok.encode_batch(flat, out_type="numpy", num_threads=num_proc)
        per_doc, i = [], 0
        for segs in b.segments:
            k = len(segs)
            if bert:
                parts = enc[i : i + k]
                per_doc.append((np.concatenate(parts), [int(p.size) for p in parts]))
            else:
                per_doc.append((np.concatenate((*enc[i : i + k], eos)), None))
            i += k
        for part, (ids, sl), nchars, nbytes, score in zip(b.parts, per_doc, b.nchars, b.nbytes, b.scores):
            chars += nchars
            if part == 0:
                last_split = "val" if score < val_fraction else "train"
            split = last_split
            n_docs += part == 0
            if split == "train":
                if held is not None:
                    write("train", *held)
                    held = None
                if whole and val_fraction > 0 and counts["val"]["num_documents"] == 0 and part == 0:
                    # Keep the newest train document back while val is empty: if val stays empty, it
                    # becomes val. Only whole documents: a continuation piece (part > 0) releases it.
                    held = (ids, sl, nbytes)
                    continue
            write(split, ids, sl, nbytes)
    if held is not None:
        write("val" if counts["val"]["num_documents"] == 0 and n_docs >= 2 else "train", *held)
    dt = time.time() - t_start
    shards = {s: w.close() for s, w in writers.items()}
    n_written = counts["train"]["num_documents"] + counts["val"]["num_documents"]
    log.info("read %d files, %.1f MB in %.1fs (%.1f MB/s): %d documents read, %d rows written, %d skipped %s, "
             "repaired %s, %d documents cut into pieces", stats.files, stats.bytes_read / 1e6, dt,
             stats.bytes_read / 1e6 / max(dt, 1e-9), stats.documents_read, n_written, stats.documents_skipped,
             dict(stats.skipped) or "", dict(stats.repaired) or "{}", stats.documents_split)
    if n_written == 0 and whole:
        raise PrepareError(
            f"No document to write: {stats.documents_read} read, all skipped ({dict(stats.skipped)}). Check --input "
            f"and --text-field.")
    ntrain = counts["train"]["num_tokens"]
    if whole and not bert and ntrain < seq_len + 1:
        raise PrepareError(
            f"The corpus is smaller than one training sequence: {ntrain} train tokens, but --seq-len {seq_len} needs "
            f"{seq_len + 1}. Pass --seq-len {max(2, ntrain - 1) if ntrain > 2 else 2} or less (or --val-fraction 0), "
            f"or add more text.")
    if counts["val"]["num_documents"] and not bert and counts["val"]["num_tokens"] < seq_len + 1:
        log.warning("the validation split has %d tokens, less than one sequence of %d: validation will use a short "
                    "window. Raise --val-fraction for a bigger validation split.", counts["val"]["num_tokens"],
                    seq_len + 1)
    if whole and val_fraction > 0 and counts["val"]["num_documents"] == 0:
        log.warning("no validation split: %d document(s) written, none picked for validation. Give more documents "
                    "(e.g. --doc-split paragraph) or raise --val-fraction.", n_docs)
    return {
        "kind": format,
        "tokenizer": {"hash": tok.hash, "vocab_size": tok.vocab_size, "path": "tokenizer",
                      "model_type": tok.model_type},
        "token_dtype": np.dtype(dtype).name,
        "seq_len": seq_len,
        "eos_appended": not bert,
        "splits": {s: {**counts[s], "shards": [x.to_dict() for x in shards[s]]} for s in ("train", "val")},
        "stats": {
            "documents_read": stats.documents_read,
            "documents_written": n_written,
            "documents_skipped": stats.documents_skipped,
            "skipped_reasons": dict(stats.skipped),
            "documents_repaired": dict(stats.repaired),
            "documents_split": stats.documents_split,
            "files": stats.files,
            "bytes_read": stats.bytes_read,
            "chars_written": chars,
            "seconds": round(dt, 3),
        },
        "sources": [{"path": str(f), "bytes": f.stat().st_size} for f in files],
    }


# --------------------------------------------------------------------------- parts (across nodes) and their merge


def parts_dir(output: str | os.PathLike) -> Path:
    """Where the parts of dataset ``output`` go: ``output.parts``."""
    output = Path(output).absolute()
    return output.parent / f"{output.name}.parts"


def part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


def part_files(files: list[Path], index: int, count: int) -> list[Path]:
    """The i-th of ``count`` contiguous ranges of ``files``, balanced by bytes: a file belongs to the part in
    which the middle of its bytes falls. Every file is in exactly one part; a part may be empty."""
    sizes = [max(f.stat().st_size, 1) for f in files]
    total = float(sum(sizes))
    out, before = [], 0
    for f, n in zip(files, sizes):
        if min(int((before + n / 2) / total * count), count - 1) == index:
            out.append(f)
        before += n
    return out


_SAME_ACROSS_PARTS = ("kind", "token_dtype", "seq_len", "eos_appended")
_SAME_ARGS = ("format", "seq_len", "val_fraction", "shard_tokens", "text_field", "seed", "doc_split", "doc_chars",
              "max_doc_chars")


def merge_parts(output: str | os.PathLike, *, overwrite: bool = False) -> Manifest:
    """Write dataset ``output`` from the complete parts in ``output.parts`` (all n of them, same tokenizer and
    settings): their shards, renumbered in part order (hard links, else copies; the parts are removed once the
    merged manifest is written), one manifest with the summed counts and read statistics and every source. The
    rules that need the whole corpus (training split at least one sequence; a validation split, when asked for)
    are checked here. Re-running after an interruption starts again from the parts."""
    t0 = time.time()
    output = Path(output).absolute()
    pdir = parts_dir(output)
    if not pdir.is_dir():
        if (output / MANIFEST).is_file():
            log.info("%s is already merged (no %s left)", output, pdir.name)
            return read_manifest(output)
        raise PrepareError(f"no parts to merge: {pdir} does not exist. Run `llmscale prepare ... --output {output} "
                           f"--part I/N` for every I first (slurm/prepare.sbatch as an array job does).")
    found = sorted(p for p in pdir.iterdir() if re.fullmatch(r"part-\d{5}-of-\d{5}", p.name))
    counts = {int(p.name.split("-of-")[1]) for p in found}
    if len(counts) != 1:
        raise PrepareError(f"{pdir} holds parts of different splits ({sorted(counts)}): remove the stale ones and "
                           f"re-run the parts.")
    count = counts.pop()
    missing = [part_name(i, count) for i in range(count) if not (pdir / part_name(i, count) / MANIFEST).is_file()]
    if missing:
        raise PrepareError(f"{pdir}: {len(missing)} of {count} parts are missing or incomplete "
                           f"({', '.join(missing[:5])}): run those parts (or re-submit the array) before merging.")
    parts = [read_manifest(pdir / part_name(i, count)) for i in range(count)]
    first = parts[0].data
    for m in parts[1:]:
        d = m.data
        diff = [k for k in _SAME_ACROSS_PARTS if d.get(k) != first.get(k)]
        diff += [f"args.{k}" for k in _SAME_ARGS if d["args"].get(k) != first["args"].get(k)]
        if d["tokenizer"]["hash"] != first["tokenizer"]["hash"]:
            diff.append("tokenizer")
        if d.get("part", {}).get("all_sources") != first.get("part", {}).get("all_sources"):
            diff.append("inputs")
        if diff:
            raise PrepareError(f"{m.root} was made with other settings than {parts[0].root} ({', '.join(diff)}): "
                               f"re-run every part with the same command.")
    _clean_stale(output)
    replace = _check_output(output, overwrite=overwrite, tokenizer_hash=first["tokenizer"]["hash"])
    stage = output.parent / f"{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        shutil.copytree(parts[0].tokenizer_dir(), stage / "tokenizer")
        splits = {}
        for split in ("train", "val"):
            (stage / split).mkdir()
            shards, totals = [], {"num_documents": 0, "num_tokens": 0, "num_bytes": 0}
            for m in parts:
                sp = m.data["splits"][split]
                for k in totals:
                    totals[k] += int(sp[k])
                for sh in m.shards(split):
                    rel = f"{split}/shard-{len(shards):05d}.arrow"
                    try:
                        os.link(m.root / sh.path, stage / rel)
                    except OSError:
                        shutil.copy2(m.root / sh.path, stage / rel)
                    shards.append({**sh.to_dict(), "path": rel})
            splits[split] = {**totals, "shards": shards}
        data = {k: first[k] for k in ("kind", "tokenizer", "token_dtype", "seq_len", "eos_appended")}
        stats: dict = {"documents_read": 0, "documents_written": 0, "documents_skipped": 0, "skipped_reasons": {},
                       "documents_repaired": {}, "documents_split": 0, "files": 0, "bytes_read": 0,
                       "chars_written": 0, "seconds": 0.0}
        for m in parts:
            st = m.data["stats"]
            for k, v in st.items():
                if isinstance(v, dict):
                    for kk, vv in v.items():
                        stats[k][kk] = stats[k].get(kk, 0) + vv
                elif k in stats:
                    stats[k] += v
        if stats["documents_written"] == 0:
            raise PrepareError(f"No document to write: {stats['documents_read']} read, all skipped "
                               f"({stats['skipped_reasons']}). Check --input and --text-field.")
        val_fraction = float(first["args"]["val_fraction"])
        if val_fraction > 0 and splits["val"]["num_documents"] == 0:
            raise PrepareError("no document of the whole corpus was picked for validation; a one-process `llmscale "
                               "prepare` would move the last document there. Raise --val-fraction, give more "
                               "documents (e.g. --doc-split paragraph), or prepare in one process.")
        if first["kind"] == "gpt" and splits["train"]["num_tokens"] < int(first["seq_len"]) + 1:
            raise PrepareError(f"The corpus is smaller than one training sequence: {splits['train']['num_tokens']} "
                               f"train tokens, --seq-len {first['seq_len']} needs {int(first['seq_len']) + 1}.")
        data.update(splits=splits, stats=stats,
                    sources=[s for m in parts for s in m.data["sources"]],
                    args={**first["args"], "num_proc": None},
                    merged_from={"parts": count, "seconds_per_part": [m.data["stats"]["seconds"] for m in parts]})
        write_manifest(stage, data)  # last: marks the merged dataset complete
        _publish(stage, output, replace=replace)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(pdir, ignore_errors=True)
    m = read_manifest(output)
    log.info("merged %d parts into %s in %.1fs: %d train / %d val documents, %d / %d tokens", count, output,
             time.time() - t0, splits["train"]["num_documents"], splits["val"]["num_documents"],
             m.num_tokens("train"), m.num_tokens("val"))
    return m
