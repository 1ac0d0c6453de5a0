"""Durable files: sha256, fsync, atomic writes, and the one verifier of a folder against its manifest.

Datasets (:mod:`llmscale.data.shards`) and checkpoints (:mod:`llmscale.checkpoint.store`) both list their
files with size and sha256 in a manifest written last; :func:`verify_listed_files` checks such a list the
same way for both: no listed path may leave the folder (absolute or ``..``), every listed file exists
with its size (and sha256), and no unlisted file sits where a reader could pick it up.

What does not live here: the manifests' own schemas (each owner reads its manifest and hands this
module the file list).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_mapped(path: str | Path, size: int) -> str:
    """sha256 of ``path``, read by mapping it: the kernel's read-ahead overlaps the disk with the hash (a cold
    read costs about the hash alone), and the pages stay in the page cache for a reader that maps them next
    (``torch.load(mmap=True)``), so the file is read from the disk once. ``size``: the size it must have
    (the manifest's); another size raises OSError before anything is hashed."""
    import mmap

    with open(path, "rb") as f:
        actual = os.fstat(f.fileno()).st_size
        if actual != size:
            raise OSError(f"{path}: {actual} bytes, the manifest lists {size} (truncated or overwritten)")
        if size == 0:
            return hashlib.sha256(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return hashlib.sha256(mm).hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in ``path`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file + fsync + rename, so readers see the old file or the whole new one."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    fsync_dir(p.parent)


def write_json_fsynced(path: str | Path, data: Any) -> None:
    """JSON to ``path`` (sorted keys), flushed and fsynced; for files inside a folder renamed into place later."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def json_report(obj: Any, output: Optional[str | Path] = None) -> str:
    """``obj`` as indented JSON text (what a benchmark prints); with ``output``, also written there atomically
    (parent folders created)."""
    text = json.dumps(obj, indent=2)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output, text + "\n")
    return text


def relative_files(root: str | Path) -> list[str]:
    """Every file below ``root`` as a path relative to it, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return out


def hash_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def hash_files(root: str | Path, rels: Iterable[str], *, fsync: bool = False) -> dict[str, dict]:
    """``{rel: {"size", "sha256"}}`` of each file (fsynced first when ``fsync``); threads overlap the files
    (hashlib releases the GIL)."""
    root = Path(root)

    def one(rel: str) -> tuple[str, dict]:
        p = root / rel
        if fsync:
            fsync_file(p)
        return rel, {"size": p.stat().st_size, "sha256": sha256_file(p)}

    with ThreadPoolExecutor(hash_threads()) as pool:
        return dict(pool.map(one, list(rels)))


def escapes(rel: str) -> bool:
    """Whether a manifest path would point outside its folder."""
    return rel.startswith("/") or os.path.isabs(rel) or ".." in Path(rel).parts


def verify_listed_files(root: str | Path, files: dict[str, dict], *, checksums: bool = True,
                        shard: tuple[int, int] = (0, 1), scan: Optional[Iterable[str]] = ("",),
                        allowed: Callable[[str], bool] = lambda rel: False,
                        manifest_name: str = "manifest.json",
                        deferred: Callable[[str], bool] = lambda rel: False) -> list[str]:
    """Problems of folder ``root`` against ``files`` (``{relative path: {"size", "sha256"}}``); empty = sound.

    * a listed path that is absolute or contains ``..`` is refused (never opened);
    * a listed file must exist with its size, and (``checksums``) its sha256;
    * files present below the folders in ``scan`` (relative; ``""`` = all of ``root``) but not listed are
      reported, except ``manifest_name`` and those for which ``allowed(rel)`` is true;
    * files for which ``deferred(rel)`` is true get the size check only: their reader hashes them as it reads
      them (:func:`sha256_mapped`), before using them.
    ``shard=(i, n)`` checks every n-th listed file starting at i (ranks split the hashing); the unlisted
    scan runs on shard 0 only."""
    root = Path(root)
    problems: list[str] = []
    if shard[0] == 0 and scan is not None:
        present: set[str] = set()
        for sub in scan:
            if (root / sub).is_dir():
                present |= {os.path.normpath(os.path.join(sub, r)) for r in relative_files(root / sub)}
        for rel in sorted(present - set(files) - {manifest_name}):
            if not allowed(rel):
                problems.append(f"{root / rel}: file not listed in the manifest (planted or left by another tool); "
                                f"remove it or restore the folder from a copy")
    names = [rel for i, rel in enumerate(sorted(files)) if i % shard[1] == shard[0]]
    to_hash = []
    for rel in names:
        if escapes(rel):
            problems.append(f"{manifest_name} lists a path outside {root}: {rel!r}")
            continue
        p = root / rel
        want = files[rel]
        try:
            size = p.stat().st_size
        except OSError:
            problems.append(f"{p}: missing")
            continue
        if size != want["size"]:
            problems.append(f"{p}: size {size} bytes, the manifest says {want['size']} (truncated or overwritten)")
            continue
        if not deferred(rel):
            to_hash.append(rel)
    if checksums and to_hash:
        with ThreadPoolExecutor(hash_threads()) as pool:
            digests = dict(zip(to_hash, pool.map(lambda r: sha256_file(root / r), to_hash)))
        for rel in to_hash:
            if digests[rel] != files[rel]["sha256"]:
                problems.append(f"{root / rel}: sha256 mismatch with the manifest "
                                f"(the file is corrupted or was replaced)")
    return problems
