"""The on-disk layout of a run's checkpoints: names, manifest, verification, discovery, retention.

A run directory holds::

    RUN_DIR/checkpoints/latest                    "step-000200" (switched with write-temp + os.replace)
    RUN_DIR/checkpoints/best.json                 fine-tuning: the best validation's step, metric, value, path
    RUN_DIR/checkpoints/step-000200/manifest.json written LAST: every file's size and sha256, layout, step
    RUN_DIR/checkpoints/step-000200/model/...     DeepSpeed's per-rank model + optimizer shards (tag dir)
    RUN_DIR/checkpoints/step-000200/state/rank-00000.json|.safetensors   stateful objects of each rank
    RUN_DIR/checkpoints/step-000200/state/rng-rank-00000.json|.safetensors RNG of each rank (llmscale.rng)
    RUN_DIR/checkpoints/step-000200/config.yaml   the resolved run config
    RUN_DIR/checkpoints/step-000200/universal/... (only after a layout change or `llmscale ckpt convert`)

A folder without a manifest, or whose files do not match it, is never loaded. Everything here is plain
file work on one process; what runs on every rank (saving, resuming) is :mod:`.manager`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llmscale.errors import CheckpointError
from llmscale.files import verify_listed_files
from llmscale.log import get_logger

log = get_logger(__name__)

FORMAT_NAME = "llmscale-checkpoint"
FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
LATEST = "latest"
BEST = "best.json"
ENGINE_DIR = "model"
UNIVERSAL_DIR = "universal"
STATE_DIR = "state"
CONFIG_FILE = "config.yaml"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
CORRUPT_SUFFIX = ".corrupt"
_STEP_RE = re.compile(r"^step-(\d{6,})$")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def parse_step(name: str) -> Optional[int]:
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    complete: bool  # has a readable manifest
    manifest: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


def layout_dict(layout: Any) -> dict[str, int]:
    """An engine's :class:`llmscale.parallel.Layout` as the manifest records it."""
    return {"dp": int(layout.dp), "tp": int(layout.tp), "pp": int(layout.pp), "zero_stage": int(layout.zero_stage),
            "world_size": int(layout.dp * layout.tp * layout.pp)}


def children(p: Path) -> list[Path]:
    try:
        return list(p.iterdir())
    except OSError:
        return []


def checkpoints_dir(run_or_ckpt_dir: str | Path) -> Path:
    """RUN_DIR -> RUN_DIR/checkpoints; a checkpoints folder is returned as is."""
    p = Path(run_or_ckpt_dir)
    if p.name == CHECKPOINTS or (p / LATEST).is_file() or any(parse_step(c.name) is not None for c in children(p)):
        return p
    return p / CHECKPOINTS


CRASH_ENV = "LLMSCALE_TEST_CRASH_AT"


def crash_point(phase: str, step: int, rank: int) -> None:
    """Test hook: ``LLMSCALE_TEST_CRASH_AT=PHASE:STEP[:RANK[:raise]]`` makes the process ``os._exit(137)`` (like a
    SIGKILL) at that named point of a save (see :mod:`llmscale.checkpoint.manager`); with ``raise``, raise an
    OSError there (a rank failing, e.g. its disk, while the others go on); with ``hang``, never return."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != phase or int(parts[1]) != step or (len(parts) > 2 and parts[2] and int(parts[2]) != rank):
        return
    if len(parts) > 3 and parts[3] == "raise":
        raise OSError(f"{CRASH_ENV}={spec}: simulated write failure on rank {rank} (test hook)")
    if len(parts) > 3 and parts[3] == "hang":
        log.error("%s=%s: hanging now (test hook)", CRASH_ENV, spec)
        time.sleep(1e9)
    log.error("%s=%s: crashing now (test hook)", CRASH_ENV, spec)
    os._exit(137)


def build_manifest(*, name: str, step: int, layout: dict, world_size: int, tokenizer_hash: Optional[str],
                   stateful: list[str], param_names: dict[str, str], state_summary: dict,
                   files: dict[str, dict]) -> dict:
    """The manifest of a checkpoint whose files (``{relative path: {"size", "sha256"}}``) are all written."""
    import datetime

    try:
        import deepspeed

        ds_version: Optional[str] = deepspeed.__version__
    except Exception:  # noqa: BLE001 - informational only
        ds_version = None
    import torch

    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "name": name, "step": step,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "layout": layout, "world_size": world_size, "engine_dir": ENGINE_DIR, "universal": None,
        "tokenizer_hash": tokenizer_hash, "stateful": stateful,
        "param_names": param_names,  # DeepSpeed parameter name -> single-device name (pipeline stages rename them)
        "state_summary": state_summary,  # for `ckpt list`; tensors stay in state/
        "versions": {"torch": torch.__version__, "deepspeed": ds_version},
        "total_bytes": sum(v["size"] for v in files.values()), "files": files,
    }


def read_manifest(ckpt: str | Path) -> dict:
    p = Path(ckpt) / MANIFEST
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} has no {MANIFEST}: it is not a complete checkpoint (a save was interrupted "
                              f"or the file was removed).") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p} is unreadable ({e}): the checkpoint is damaged.") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME or not isinstance(data.get("files"), dict):
        fmt = data.get("format") if isinstance(data, dict) else None
        raise CheckpointError(f"{p} is not an llmscale checkpoint manifest (format {fmt!r}).")
    return data


def list_checkpoints(run_or_ckpt_dir: str | Path) -> list[CheckpointInfo]:
    """Step folders, oldest first; ``complete`` = a manifest that parses (contents not hashed: see verify)."""
    d = checkpoints_dir(run_or_ckpt_dir)
    out = []
    for c in children(d):
        step = parse_step(c.name)
        if step is None or not c.is_dir():
            continue
        try:
            out.append(CheckpointInfo(c, step, True, read_manifest(c)))
        except CheckpointError:
            out.append(CheckpointInfo(c, step, False, {}))
    return sorted(out, key=lambda i: i.step)


def latest_complete(run_or_ckpt_dir: str | Path) -> Optional[CheckpointInfo]:
    done = [i for i in list_checkpoints(run_or_ckpt_dir) if i.complete]
    return done[-1] if done else None


def read_latest(run_or_ckpt_dir: str | Path) -> Optional[str]:
    """The name in ``latest`` if it is a well-formed step name, else None (garbage is reported, not used)."""
    p = checkpoints_dir(run_or_ckpt_dir) / LATEST
    try:
        text = p.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    if parse_step(text) is None:
        log.warning("%s holds %r, not a checkpoint name: ignored (the newest complete checkpoint is found by "
                    "scanning).", p, text[:80])
        return None
    return text


def resolve_checkpoint(path: str | Path) -> Optional[Path]:
    """A checkpoint folder for PATH: itself (it has an llmscale checkpoint manifest), or the newest complete
    one of a run directory / checkpoints folder; None when PATH holds none."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        try:
            read_manifest(p)
            return p
        except CheckpointError:
            return None
    if p.name == CHECKPOINTS or (p / CHECKPOINTS).is_dir():
        info = latest_complete(p)
        return info.path if info else None
    return None


def verify_checkpoint(ckpt: str | Path, *, checksums: bool = True, shard: tuple[int, int] = (0, 1),
                      deferred: Callable[[str], bool] = lambda rel: False) -> list[str]:
    """Problems found in a checkpoint folder (empty list = good). Checks the manifest, that every listed
    file exists with its size (and sha256 when ``checksums``), that no unlisted file could be loaded, and that
    no pickle asks for a global outside the allowlist (:func:`llmscale.checkpoint.safe_load.scan_checkpoint`).
    ``shard=(i, n)`` checks only every n-th file starting at i (ranks split the hashing). ``deferred(rel)``: files
    whose checksum the loader checks as it reads them (:class:`llmscale.checkpoint.loading.VerifiedReader`); here
    only their size."""
    ckpt = Path(ckpt)
    try:
        m = read_manifest(ckpt)
    except CheckpointError as e:
        return [str(e)]

    def allowed(rel: str) -> bool:  # work folders of a running conversion, a universal folder not yet listed
        return rel.startswith(TMP_PREFIX) or (rel.startswith(UNIVERSAL_DIR + "/") and not m.get("universal"))

    problems = verify_listed_files(ckpt, m["files"], checksums=checksums, shard=shard, allowed=allowed,
                                   manifest_name=MANIFEST, deferred=deferred)
    if problems:
        return problems
    from llmscale.checkpoint.safe_load import scan_checkpoint  # the pickles: only allowlisted globals

    return scan_checkpoint(ckpt, [rel for i, rel in enumerate(sorted(m["files"])) if i % shard[1] == shard[0]])


def remove_folder(path: Path, trash_name: str) -> None:
    """Remove a checkpoint folder in one atomic step (rename to ``trash_name`` beside it, then delete), so
    no half-deleted folder ever carries a step name."""
    trash = path.with_name(trash_name)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def retention_victims(ckpt_dir: Path, *, keep_last: int, keep_every: int) -> list[CheckpointInfo]:
    """Complete checkpoints that retention removes: all but the newest ``keep_last`` and every
    ``keep_every``-th step; the newest is never among them."""
    complete = [i for i in list_checkpoints(ckpt_dir) if i.complete]
    if not complete:
        return []
    keep = {i.step for i in complete[-max(keep_last, 1):]}
    keep.add(complete[-1].step)
    if keep_every:
        keep |= {i.step for i in complete if i.step % keep_every == 0}
    best = read_best(ckpt_dir)
    if best is not None:
        keep.add(int(best["step"]))  # the best checkpoint is never removed
    return [i for i in complete if i.step not in keep]


def read_best(run_or_ckpt_dir: str | Path) -> Optional[dict]:
    """The ``best`` pointer of a run (``{"step", "name", "metric", "value", "path"}``), None without one."""
    p = checkpoints_dir(run_or_ckpt_dir) / BEST
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or parse_step(str(data.get("name", ""))) is None:
        log.warning("%s is not a best-checkpoint pointer: ignored.", p)
        return None
    return data


def clean_stale(ckpt_dir: Path) -> None:
    """Remove what interrupted work leaves: folders of saves that never completed (.tmp-*), unfinished
    deletions (.trash-*), and the temporary files of an atomic write cut short (.latest.tmp-PID, ...)."""
    for c in children(ckpt_dir):
        if c.name.startswith((TMP_PREFIX, TRASH_PREFIX)) and c.is_dir():
            log.info("removing %s (left by an interrupted save or clean-up)", c)
            shutil.rmtree(c, ignore_errors=True)
        elif c.name.startswith(".") and ".tmp-" in c.name and c.is_file():
            log.info("removing %s (left by an interrupted write)", c)
            c.unlink(missing_ok=True)


def set_aside_corrupt(info: CheckpointInfo) -> None:
    """Rename a damaged checkpoint to ``step-N.corrupt-<time>`` (kept for inspection, never picked again)."""
    aside = info.path.with_name(info.name + CORRUPT_SUFFIX + f"-{int(time.time())}")
    try:
        os.replace(info.path, aside)
        log.error("moved it to %s (inspect or delete it)", aside)
    except OSError as e:
        log.error("could not move it aside: %s", e)
