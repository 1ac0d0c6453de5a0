"""Fine-tuning records from local files: table rows (TSV, CSV, JSONL) and folder-per-label text files.

What a path may name (every reader of :mod:`llmscale.data.classify_data` and :mod:`llmscale.data.sft_data`):

- ``data/train.tsv``, ``data/train.csv``, ``data/train.jsonl`` (also ``.json`` lines, and any of them
  ``.gz``-compressed): one record per row. TSV and CSV start with a header row naming the columns.
  ``.tsv`` is read with ``csv.QUOTE_NONE`` (GLUE TSVs such as SST-2 hold bare ``"`` characters that
  are text, not quoting); ``.csv`` uses the standard CSV quoting (``"a, b"``, doubled ``""``).
- ``archive.zip::member/path.tsv``: one member of a zip archive, read in place (never extracted).
- ``ROOT/`` (a folder) or ``archive.tar.gz`` / ``.tgz`` / ``.tar``: folder-per-label text files,
  ``ROOT/{split}/{label}/*.txt`` (the IMDb ``aclImdb`` layout); ``split=None`` on a folder reads
  ``ROOT/{label}/*.txt``. Each ``.txt`` file is one record whose label is its folder's name. Other
  files (``aclImdb/train/urls_pos.txt`` beside the label folders, deeper folders) are not records.
  An archive is streamed once with :mod:`tarfile`; its label folders are found at the archive's top
  level or under one top-level folder (``aclImdb/``), or exactly where ``archive.tar.gz::inner/root``
  says. Records come in sorted member-name order, so the order never depends on the archive's.

Every record carries its ``source``: ``file:line`` for rows (``archive.zip::member:line`` inside a
zip), the member or file path for folder records; error messages name it.

What does not live here: what a record means (fields, labels, templates): the classification and SFT
readers.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import sys
import tarfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Optional, Union

from llmscale.errors import FinetuneDataError

PathLike = Union[str, os.PathLike]
TABLE_FORMATS = ("tsv", "csv", "jsonl")
FORMATS = TABLE_FORMATS + ("folder",)
MEMBER_SEP = "::"
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")


def split_member(spec: PathLike) -> tuple[Path, Optional[str]]:
    """``"a.zip::x/y.tsv"`` -> (Path("a.zip"), "x/y.tsv"); a plain path -> (path, None)."""
    s = os.fspath(spec)
    if MEMBER_SEP in s:
        outer, inner = s.split(MEMBER_SEP, 1)
        return Path(outer), inner.strip("/") or None
    return Path(s), None


def as_paths(paths: PathLike | Sequence[PathLike]) -> list[PathLike]:
    """One path or a list of them, as a non-empty list."""
    if isinstance(paths, (str, os.PathLike)):
        return [paths]
    out = list(paths)
    if not out:
        raise FinetuneDataError("No data files given: pass at least one path.")
    return out


def _is_tar(path: Path) -> bool:
    return path.name.lower().endswith(_TAR_SUFFIXES)


def detect_format(spec: PathLike) -> str:
    """The format a path names by its suffix (or being a folder / tar archive); raises when it names none."""
    outer, inner = split_member(spec)
    if outer.is_dir() or _is_tar(outer):
        return "folder"
    name = (inner if inner is not None and outer.name.lower().endswith(".zip") else outer.name).lower()
    name = name.removesuffix(".gz")
    for suffix, fmt in ((".tsv", "tsv"), (".csv", "csv"), (".jsonl", "jsonl"), (".json", "jsonl")):
        if name.endswith(suffix):
            return fmt
    raise FinetuneDataError(
        f"{spec}: cannot tell its format from the name. Name the file .tsv, .csv or .jsonl (a folder or .tar.gz for "
        f"folder-per-label text files), or pass format= one of {', '.join(FORMATS)}.")


def _missing(path: Path, what: str = "file") -> FinetuneDataError:
    near = ""
    if path.parent.is_dir():
        names = sorted(p.name for p in path.parent.iterdir())[:12]
        near = f" ({path.parent} holds: {', '.join(names) or 'nothing'})"
    return FinetuneDataError(f"{path}: no such {what}{near}. Check the path in the fine-tune data settings.")


@contextmanager
def open_text(spec: PathLike) -> Iterator[IO[str]]:
    """A text stream (UTF-8, a BOM dropped, newlines untranslated) of a file or of a zip member."""
    outer, inner = split_member(spec)
    if not outer.is_file():
        raise _missing(outer)
    if outer.name.lower().endswith(".zip"):
        try:
            zf = zipfile.ZipFile(outer)
        except zipfile.BadZipFile as e:
            raise FinetuneDataError(f"{outer}: not a readable zip archive ({e}). Check the file (`unzip -l {outer}`)."
                                    ) from None
        with zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            if inner is None or inner not in names:
                what = "names no member" if inner is None else f"has no member {inner!r}"
                raise FinetuneDataError(
                    f"{outer} {what}: name one as {outer}{MEMBER_SEP}MEMBER, e.g. {outer}{MEMBER_SEP}"
                    f"{names[0] if names else 'train.tsv'} (members: {', '.join(names[:20])}).")
            with zf.open(inner) as raw:
                yield io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        return
    if inner is not None:
        raise FinetuneDataError(f"{spec}: only .zip archives take {MEMBER_SEP}MEMBER (and .tar.gz folders an inner "
                                f"root); {outer} is neither.")
    raw = gzip.open(outer, "rb") if outer.name.lower().endswith(".gz") else open(outer, "rb")
    with raw:
        yield io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def _not_utf8(spec: PathLike, line: int, e: UnicodeDecodeError) -> FinetuneDataError:
    return FinetuneDataError(f"{spec}:{line}: not UTF-8 text ({e.reason} at byte {e.start} of a block). Re-encode "
                             f"the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8`).")


def iter_rows(spec: PathLike, fmt: str) -> Iterator[tuple[dict, str]]:
    """``(record, "file:line")`` for every row of a TSV/CSV (header keys) or JSONL (the object) file.

    Blank lines are not records. Raises :class:`FinetuneDataError` for an empty file, a row whose field
    count differs from the header's, a line that is not a JSON object, or bytes that are not UTF-8.
    """
    if fmt not in TABLE_FORMATS:
        raise FinetuneDataError(f"format={fmt!r} is not a table format ({', '.join(TABLE_FORMATS)}).")
    line = 0
    try:
        with open_text(spec) as f:
            if fmt == "jsonl":
                yield from _jsonl_rows(f, spec)
                return
            csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents in one cell
            kw = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
            reader = csv.reader(f, **kw)
            header: Optional[list[str]] = None
            while True:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    raise FinetuneDataError(f"{spec}:{start}: not valid {fmt.upper()} ({e}). Fix the quoting of "
                                            f"that row.") from None
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip() and header is not None):
                    continue
                if header is None:
                    header = [h.strip() for h in row]
                    continue
                if len(row) != len(header):
                    hint = ("a tab inside a text, or a missing value" if fmt == "tsv" else
                            "an unquoted comma inside a text, or an unbalanced quote")
                    raise FinetuneDataError(
                        f"{spec}:{start}: {len(row)} fields, but the header row has {len(header)} "
                        f"({', '.join(header)}). Each row needs one value per column ({hint}?); fix or remove "
                        f"that row.")
                yield dict(zip(header, row)), f"{spec}:{start}"
            if header is None:
                raise FinetuneDataError(f"{spec}: the file is empty (a {fmt.upper()} file needs a header row naming "
                                        f"its columns, then one row per example).")
    except UnicodeDecodeError as e:
        raise _not_utf8(spec, line + 1, e) from None


def _jsonl_rows(f: IO[str], spec: PathLike) -> Iterator[tuple[dict, str]]:
    n = 0
    for n, text in enumerate(f, start=1):
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise FinetuneDataError(
                f"{spec}:{n}: not valid JSON ({e.msg} at column {e.colno}). Each line of a .jsonl file must be one "
                f"JSON object, e.g. {{\"text\": \"...\", \"label\": \"pos\"}}; fix or remove that line.") from None
        if not isinstance(rec, dict):
            raise FinetuneDataError(f"{spec}:{n}: a JSON {type(rec).__name__}, not an object. Each line of a .jsonl "
                                    f"file must be one JSON object with the configured fields.")
        yield rec, f"{spec}:{n}"
    if n == 0:
        raise FinetuneDataError(f"{spec}: the file is empty (a .jsonl file needs one JSON object per line).")


def get_field(record: dict, field: str, source: str, *, option: str) -> object:
    """``record[field]`` (dots reach into nested objects: ``"meta.label"``), or a clear error naming the
    fields the record has and the ``option`` that chooses the field."""
    value: object = record
    for key in field.split("."):
        if not isinstance(value, dict) or key not in value:
            have = ", ".join(map(repr, record)) or "none"
            raise FinetuneDataError(
                f"{source}: no field {field!r} (its fields: {have}). Set {option} to the name of the column that "
                f"holds it.")
        value = value[key]
    return value


# --------------------------------------------------------------------------- folder per label


def iter_folder(spec: PathLike, *, split: Optional[str]) -> Iterator[tuple[str, str, str]]:
    """``(text, label, source)`` for every ``[split/]LABEL/*.txt`` under a folder or inside a tar archive,
    in sorted path order."""
    outer, inner = split_member(spec)
    if not outer.exists():
        raise _missing(outer, "folder or archive")
    if outer.is_dir():
        if inner is not None:
            outer = outer / inner
        yield from _dir_records(outer, split)
    else:
        yield from _tar_records(outer, inner, split)


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(source, 1, e) from None


def _dir_records(root: Path, split: Optional[str]) -> Iterator[tuple[str, str, str]]:
    base = root / split if split else root
    if not base.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise FinetuneDataError(
            f"{base}: no such folder ({root} has the folders: {', '.join(have) or 'none'}). Folder-per-label data is "
            f"ROOT/SPLIT/LABEL/*.txt: pass split= one of those, or split=None when the label folders are in {root}.")
    files = sorted((p.relative_to(base).as_posix(), p) for d in base.iterdir() if d.is_dir()
                   for p in d.iterdir() if p.suffix == ".txt" and p.is_file())
    if not files:
        raise FinetuneDataError(f"{base}: no LABEL/*.txt files (expected one folder per label holding one .txt file "
                                f"per example, e.g. {base}/pos/1.txt).")
    for rel, p in files:
        yield _decode(p.read_bytes(), str(p)), rel.split("/", 1)[0], str(p)


def _tar_records(path: Path, inner: Optional[str], split: Optional[str]) -> Iterator[tuple[str, str, str]]:
    want = ([split] if split else [])
    depth = len(want) + 2  # [split,] label, file
    found: dict[str, list[tuple[str, bytes]]] = {}  # candidate root -> (member name, bytes)
    try:
        with tarfile.open(path, mode="r|*") as tf:  # streaming: one pass, no seeks
            for m in tf:
                if not m.isfile():
                    continue
                name = m.name.removeprefix("./")
                parts = name.split("/")
                roots = [inner] if inner is not None else ["", parts[0]]
                for root in dict.fromkeys(roots):
                    rel = parts[len(root.split("/")):] if root else parts
                    if root and "/".join(parts[: len(root.split("/"))]) != root:
                        continue
                    if len(rel) == depth and rel[: len(want)] == want and rel[-1].endswith(".txt"):
                        f = tf.extractfile(m)
                        found.setdefault(root, []).append((name, f.read() if f is not None else b""))
                        break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise FinetuneDataError(f"{path}: cannot read it as a tar archive ({type(e).__name__}: {e}). Check the file "
                                f"(`tar tzf {path} | head`), or pass a folder.") from None
    layout = "/".join(want + ["LABEL", "*.txt"])
    if not found:
        where = f"under {inner}/" if inner else "at the top level or under its top-level folder"
        raise FinetuneDataError(
            f"{path}: no {layout} members {where}. Pass the right split= (e.g. train), or name the folder holding "
            f"the split folders as {path}{MEMBER_SEP}INNER/ROOT.")
    if len(found) > 1:
        roots = sorted(r or "(top level)" for r in found)
        raise FinetuneDataError(f"{path}: {layout} members under several roots ({', '.join(roots)}): name one as "
                                f"{path}{MEMBER_SEP}ROOT.")
    members = sorted(next(iter(found.values())))
    for name, data in members:
        source = f"{path}{MEMBER_SEP}{name}"
        yield _decode(data, source), name.split("/")[-2], source
