"""Reading raw text: local files, folders and globs of txt / jsonl / json / parquet / csv / tsv.

    for source, text in iter_documents(["books/", "poems/*.json"], text_field="paragraphs"):
        ...

What a *document* is
--------------------
* ``.txt`` (and any explicit file with an unknown extension): read as a byte stream, never a whole
  file or a whole line at once, so one 100 MB line costs a few MB of memory. (Not through the
  ``datasets`` "text" builder: it makes a row per line or holds a whole file per row, and counts
  neither invalid bytes nor empty documents.) ``doc_split`` says how
  a file is cut into documents:

  - ``chunk`` (default): consecutive paragraphs (separated by blank lines) grouped into documents of
    about ``doc_chars`` characters. Books keep pages of context together, and a single-file corpus
    such as Tiny Shakespeare still has enough documents for a train/validation split by document.
  - ``file``: the whole file is one document.
  - ``paragraph``: every blank-line-separated paragraph is a document.
  - ``line``: every non-empty line is a document (one-sentence-per-line corpora).

  The blank lines *between* documents are separators (the end-of-document token replaces them); the
  text inside a document is kept exactly as read.
* ``.jsonl`` / ``.json`` (JSON lines, or one top-level array of objects), ``.parquet``, ``.csv``,
  ``.tsv``: one record is one document, read through Hugging Face ``datasets`` in streaming mode
  (no cache copy, no hub access; note that ``datasets`` imports torch for streaming, a few seconds
  once per process). ``text_field`` names the column; a dotted path reaches into nested
  objects; a field holding a list of strings (the chinese-poetry ``paragraphs``) is joined with
  newlines. Records without the field are skipped and counted.
* ``.gz`` compression is accepted on every format.

Cleaning (each counted, never silent)
-------------------------------------
* CRLF line ends become ``\\n`` (Gutenberg and the Chinese novels use CRLF; a lone ``\\r`` is kept).
  Lossless tokenization applies to the text after this step.
* Invalid UTF-8 bytes become U+FFFD and NUL characters are removed; the document is kept and counted
  under ``repaired``. A document where more than 10 % of the characters (and at least 32) were such
  garbage is skipped as ``binary_or_wrong_encoding`` (it is almost surely not text).
* Empty and whitespace-only documents and files are skipped as ``empty``.
* A document longer than ``max_doc_chars`` is cut into consecutive pieces at a line (else space)
  boundary near the limit; every piece is written as its own row (counted as ``documents_split``).
"""
from __future__ import annotations

import codecs
import glob as _glob
import gzip
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from llmscale.errors import PrepareError
from llmscale.log import get_logger

log = get_logger(__name__)

TEXT_EXTS = (".txt", ".text")
JSON_EXTS = (".jsonl", ".json", ".ndjson")
PARQUET_EXTS = (".parquet",)
CSV_EXTS = (".csv", ".tsv")
DOC_SPLITS = ("chunk", "file", "paragraph", "line")
DEFAULT_DOC_CHARS = 32768
DEFAULT_MAX_DOC_CHARS = 1 << 20  # 1 Mi characters (~250k tokens): bounds memory per document, far above any seq_len
_BLOCK = 1 << 20  # bytes read at a time from text files
_GARBAGE = re.compile("[\udc80-\udcff\x00]")  # surrogate-escaped invalid bytes, NUL
_SURR = re.compile("[\udc80-\udcff]")




@dataclass
class ReadStats:
    """What reading saw: documents read, skipped (with reasons) and repaired."""

    documents_read: int = 0
    documents_split: int = 0
    files: int = 0
    bytes_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)

    @property
    def documents_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass
class Document:
    source: str  # the file it came from
    text: str
    part: int = 0  # > 0 for the continuation pieces of a document longer than max_doc_chars


def file_kind(path: Path) -> Optional[str]:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for kind, exts in (("text", TEXT_EXTS), ("json", JSON_EXTS), ("parquet", PARQUET_EXTS), ("csv", CSV_EXTS)):
        if name.endswith(exts):
            return kind
    return None


def resolve_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by ``inputs`` (files, folders searched recursively, globs), sorted per input.

    A missing path or a glob/folder with nothing readable raises :class:`PrepareError` naming it."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise PrepareError("No input given: pass one or more files, folders or globs with --input.")
    out: list[Path] = []
    for raw in inputs:
        s = str(raw)
        if any(c in s for c in "*?[") and not Path(s).exists():  # an existing name like "x [sic].txt" is a path
            matches = sorted(Path(m) for m in _glob.glob(s, recursive=True) if Path(m).is_file())
            if not matches:
                raise PrepareError(f"Input glob {s!r} matches no file. "
                                   f"Check the pattern (quote it so the shell leaves it alone).")
            out.extend(matches)
            continue
        p = Path(s)
        if not p.exists():
            raise PrepareError(f"Input path {s} does not exist. Check the path given to --input.")
        if p.is_dir():
            found, ignored = [], Counter()
            for f in sorted(p.rglob("*")):
                if not f.is_file() or any(part.startswith(".") for part in f.relative_to(p).parts):
                    continue
                if file_kind(f) is None:
                    ignored[f.suffix.lower() or "(none)"] += 1
                else:
                    found.append(f)
            if ignored:
                log.warning("%s: ignored %d files with unsupported extensions (%s)", p, sum(ignored.values()),
                            ", ".join(f"{k}: {v}" for k, v in ignored.most_common()))
            if not found:
                raise PrepareError(
                    f"Input folder {p} holds no .txt/.jsonl/.json/.parquet/.csv/.tsv file (optionally .gz). "
                    f"Point --input at the files themselves.")
            out.extend(found)
        else:
            out.append(p)
    return out


# --------------------------------------------------------------------------- cleaning


def _clean(text: str, stats: ReadStats) -> Optional[str]:
    """Repair decoding garbage; None when the document must be skipped (reason counted)."""
    if "\r\n" in text:
        text = text.replace("\r\n", "\n")
    if _GARBAGE.search(text) is not None:
        n_bad = len(_GARBAGE.findall(text))
        if n_bad > 0.1 * len(text) and n_bad >= 32:
            stats.skipped["binary_or_wrong_encoding"] += 1
            return None
        if "\x00" in text:
            stats.repaired["nul_removed"] += 1
            text = text.replace("\x00", "")
        if _SURR.search(text) is not None:
            stats.repaired["invalid_utf8_replaced"] += 1
            text = _SURR.sub("\ufffd", text)
    if not text.strip():
        stats.skipped["empty"] += 1
        return None
    return text


def _cut_point(text: str, limit: int) -> int:
    """Where to cut ``text`` (longer than limit): after the last newline, else space, before limit."""
    for sep in ("\n", " "):
        i = text.rfind(sep, limit // 2, limit)
        if i >= 0:
            return i + 1
    return limit


def _emit(source: str, text: str, stats: ReadStats, max_doc_chars: int) -> Iterator[Document]:
    """One whole document -> cleaned pieces (almost always exactly one)."""
    stats.documents_read += 1
    if not text:
        stats.skipped["empty"] += 1
        return
    if len(text) > max_doc_chars:
        stats.documents_split += 1
    part = 0
    while text:
        cut = _cut_point(text, max_doc_chars) if len(text) > max_doc_chars else len(text)
        piece, text = text[:cut], text[cut:]
        clean = _clean(piece, stats)
        if clean is not None:
            yield Document(source, clean, part)
            part += 1


# --------------------------------------------------------------------------- text files


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _text_blocks(path: Path, stats: ReadStats) -> Iterator[str]:
    """Decoded, CRLF-normalised text in blocks of about 1 MiB that end at a line end (except a line
    longer than a block, which arrives in several blocks), so memory stays bounded."""
    dec = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    carry = ""
    with _open_binary(path) as f:
        while True:
            block = f.read(_BLOCK)
            final = not block
            stats.bytes_read += len(block)
            text = carry + dec.decode(block, final=final)
            carry = ""
            if final:
                if text:
                    yield text.replace("\r\n", "\n")
                return
            if text.endswith("\r"):  # a CRLF may straddle the block boundary
                text, carry = text[:-1], "\r"
            cut = text.rfind("\n") + 1
            if cut == 0 and len(text) < _BLOCK:
                carry = text + carry
                continue
            if 0 < cut < len(text) and len(text) - cut < _BLOCK:
                text, carry = text[:cut], text[cut:] + carry
            if "\r\n" in text:
                text = text.replace("\r\n", "\n")
            yield text


_BLANK_LINE = re.compile(r"^[^\S\n]*\n", re.M)  # a whitespace-only line
_BLANK_RUN = re.compile(r"(?:[^\S\n]*\n)+")
_TRAILING_BLANKS = re.compile(r"(?<=\n)(?:[^\S\n]*\n)+\Z")


def _text_documents(path: Path, *, doc_split: str, doc_chars: int, max_doc_chars: int,
                    stats: ReadStats) -> Iterator[Document]:
    source = str(path)
    target = {"chunk": doc_chars, "paragraph": 1, "line": 1, "file": None}[doc_split]
    parts: list[str] = []  # text of the current document
    size = 0
    piece = 0  # pieces already emitted of the current document (documents over max_doc_chars)
    line_start = True  # the next block starts at the start of a line
    before = stats.documents_read

    def end_document() -> Iterator[Document]:
        nonlocal parts, size, piece
        text = "".join(parts)
        parts, size = [], 0
        if doc_split != "file":  # blank lines after the last paragraph separate documents
            text = _TRAILING_BLANKS.sub("", text)
        if piece == 0:
            if text:
                yield from _emit(source, text, stats, max_doc_chars)
        else:  # the last piece of a long document
            clean = _clean(text, stats) if text else None
            if clean is not None:
                yield Document(source, clean, piece)
            piece = 0

    def emit_pieces() -> Iterator[Document]:
        nonlocal parts, size, piece
        text = "".join(parts)
        while len(text) >= max_doc_chars:
            cut = _cut_point(text, max_doc_chars) if len(text) > max_doc_chars else len(text)
            if piece == 0:
                stats.documents_read += 1
                stats.documents_split += 1
            clean = _clean(text[:cut], stats)
            if clean is not None:
                yield Document(source, clean, piece)
            piece += 1
            text = text[cut:]
        parts, size = ([text], len(text)) if text else ([], 0)

    for bt in _text_blocks(path, stats):
        n = len(bt)
        pos = 0
        if doc_split == "line":
            while pos < n:
                nl = bt.find("\n", pos)
                end = n if nl < 0 else nl + 1
                parts.append(bt[pos:end])
                size += end - pos
                pos = end
                if nl >= 0:
                    if piece or "".join(parts).strip():
                        yield from end_document()
                    else:  # blank lines separate documents
                        parts, size = [], 0
                elif size >= max_doc_chars:
                    yield from emit_pieces()
            line_start = bt.endswith("\n")
            continue
        while pos < n:
            if size == 0 and piece == 0 and target is not None and line_start:
                m = _BLANK_RUN.match(bt, pos)  # blank lines between documents
                if m is not None:
                    pos = m.end()
                    continue
            m = None
            if target is not None:
                start = pos + max(target - size, 0)
                if start < n:
                    m = _BLANK_LINE.search(bt, start)
                    # a match at `pos` itself continues the previous block's last line only if that block
                    # did not end at a line end
                    if m is not None and m.start() == pos and not line_start:
                        m = _BLANK_LINE.search(bt, pos + 1)
            if m is None:
                parts.append(bt[pos:])
                size += n - pos
                pos = n
                if size >= max_doc_chars:
                    yield from emit_pieces()
            else:
                if m.start() > pos:
                    parts.append(bt[pos : m.start()])
                    size += m.start() - pos
                yield from end_document()
                pos = m.start()
                line_start = True
        line_start = bt.endswith("\n")
    if parts:
        yield from end_document()
    if stats.documents_read == before:  # nothing but whitespace
        stats.documents_read += 1
        stats.skipped["empty_file"] += 1


# --------------------------------------------------------------------------- tables (json, parquet, csv)


def _get_field(record: dict, path: list[str]):
    v = record
    for k in path:
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    return v


def _as_text(value) -> Optional[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    return None


def _table_documents(path: Path, kind: str, *, text_field: str, max_doc_chars: int,
                     stats: ReadStats) -> Iterator[Document]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    name = path.name.lower().removesuffix(".gz")
    kwargs = {}
    if kind == "csv" and name.endswith(".tsv"):
        kwargs = {"delimiter": "\t", "quoting": 3}  # csv.QUOTE_NONE: TSV corpora (SST-2) contain bare quotes
    fpath = text_field.split(".")
    top = fpath[0]
    source = str(path)
    try:
        stats.bytes_read += path.stat().st_size
        ds = datasets.load_dataset(kind, data_files=[str(path)], split="train", streaming=True, **kwargs)
        missing_reason = f"missing_field:{text_field}"
        # Arrow batches, not Python dicts per row: ten times faster on many small records.
        for tbl in ds.with_format("arrow").iter(batch_size=4096):
            if top not in tbl.column_names:
                stats.documents_read += tbl.num_rows
                stats.skipped[missing_reason] += tbl.num_rows
                log.warning("%s: no field %r in its records (fields: %s); %d records skipped", path, text_field,
                            ", ".join(tbl.column_names), tbl.num_rows)
                continue
            col = tbl.column(top)
            values = col.to_pylist()
            if "json" in str(col.type):  # datasets' Json feature (objects of varying shape): JSON text per row
                values = [None if v is None else json.loads(v) for v in values]
            for value in values:
                if len(fpath) > 1:
                    value = _get_field(value, fpath[1:]) if isinstance(value, dict) else None
                text = value if isinstance(value, str) else _as_text(value)
                if text is not None and 0 < len(text) <= max_doc_chars:  # the common case, inline
                    stats.documents_read += 1
                    text = _clean(text, stats)
                    if text is not None:
                        yield Document(source, text)
                elif value is None:
                    stats.documents_read += 1
                    stats.skipped[missing_reason] += 1
                elif text is None:
                    stats.documents_read += 1
                    stats.skipped["not_text"] += 1
                else:
                    yield from _emit(source, text, stats, max_doc_chars)
    except PrepareError:
        raise
    except Exception as e:  # pyarrow / pandas / json errors: name the file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PrepareError(
            f"Cannot read {path} as {kind} ({type(e).__name__}: {msg[:300]}). Fix or remove the file, or pass "
            f"the right --text-field; .json must be JSON lines or one top-level array of objects."
        ) from e


# --------------------------------------------------------------------------- public


def iter_document_records(
    inputs: Sequence[str | os.PathLike] | str,
    *,
    text_field: str = "text",
    doc_split: str = "chunk",
    doc_chars: int = DEFAULT_DOC_CHARS,
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS,
    stats: Optional[ReadStats] = None,
    files: Optional[Iterable[Path]] = None,
) -> Iterator[Document]:
    """Every document of every input as a :class:`Document` (see the module doc for the rules)."""
    if doc_split not in DOC_SPLITS:
        raise PrepareError(f"doc_split={doc_split!r} is unknown; choose one of {', '.join(DOC_SPLITS)}.")
    if max_doc_chars < 1024:
        raise PrepareError(f"max_doc_chars must be >= 1024, got {max_doc_chars}.")
    stats = stats if stats is not None else ReadStats()
    for path in (list(files) if files is not None else resolve_inputs(inputs)):
        kind = file_kind(path) or "text"
        stats.files += 1
        before = stats.documents_read
        if path.stat().st_size == 0:
            stats.documents_read += 1
            stats.skipped["empty_file"] += 1
            log.info("%s: empty file, skipped", path)
            continue
        if kind == "text":
            yield from _text_documents(path, doc_split=doc_split, doc_chars=doc_chars, max_doc_chars=max_doc_chars,
                                       stats=stats)
        else:
            yield from _table_documents(path, kind, text_field=text_field, max_doc_chars=max_doc_chars, stats=stats)
        log.debug("%s: %d documents", path, stats.documents_read - before)


def iter_documents(
    inputs: Sequence[str | os.PathLike] | str,
    *,
    text_field: str = "text",
    doc_split: str = "chunk",
    doc_chars: int = DEFAULT_DOC_CHARS,
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS,
    stats: Optional[ReadStats] = None,
) -> Iterator[tuple[str, str]]:
    """``(source, text)`` for every document, exactly as ``llmscale prepare`` sees them."""
    for d in iter_document_records(inputs, text_field=text_field, doc_split=doc_split, doc_chars=doc_chars,
                                   max_doc_chars=max_doc_chars, stats=stats):
        yield d.source, d.text
