"""Resharding: DeepSpeed's universal (layout-free) checkpoint format, and when a load needs it.

:func:`convert_to_universal` runs ``deepspeed.checkpoint.ds_to_universal`` on CKPT/model into
CKPT/universal (one process) and lists the new files, with checksums, in the checkpoint's manifest.
:func:`universal_view` presents that folder under the parameter names of the engine that loads it
(pipeline stages name parameters by layer index, a plain model by module path; both map to the
single-device names recorded in the manifest at save).

What does not live here: the decision to convert during a resume (:mod:`.manager`) and reading the
merged weights for export (:mod:`.consolidate`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmscale.checkpoint.store import (
    ENGINE_DIR,
    MANIFEST,
    TMP_PREFIX,
    UNIVERSAL_DIR,
    layout_dict,
    read_manifest,
    verify_checkpoint,
)
from llmscale.errors import CheckpointError
from llmscale.files import atomic_write_text, fsync_dir, hash_files, relative_files
from llmscale.log import get_logger

log = get_logger(__name__)


def needs_universal(saved: dict, current: dict) -> bool:
    """Whether a checkpoint saved with layout ``saved`` must go through the universal format to load on
    ``current``: a different tensor/pipeline degree, or a different data-parallel size / ZeRO stage
    while the optimizer state is partitioned."""
    if saved["tp"] != current["tp"] or saved["pp"] != current["pp"]:
        return True
    zero = max(saved["zero_stage"], current["zero_stage"])
    return zero > 0 and (saved["dp"] != current["dp"] or saved["zero_stage"] != current["zero_stage"])


def convert_to_universal(ckpt: str | Path, *, workers: int = 1) -> Path:
    """Run DeepSpeed's ds_to_universal on CKPT/model into CKPT/universal, then add the new files to the
    manifest (atomically). One process only (rank 0, or the `llmscale ckpt convert` command)."""
    import torch

    ckpt = Path(ckpt)
    problems = verify_checkpoint(ckpt)
    if problems:
        raise CheckpointError(f"refusing to convert {ckpt}: " + "; ".join(problems[:5]))
    m = read_manifest(ckpt)
    final = ckpt / UNIVERSAL_DIR
    if m.get("universal") and final.is_dir():
        return final
    tmp = ckpt / (TMP_PREFIX + UNIVERSAL_DIR)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    # DeepSpeed's converter, in a process whose torch.load is restricted (llmscale.checkpoint.safe_load)
    cmd = [sys.executable, "-m", "llmscale.checkpoint.convert_worker", "--input_folder", str(ckpt / ENGINE_DIR),
           "--output_folder", str(tmp), "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"DeepSpeed's universal conversion of {ckpt} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}\n"
            f"Re-run it by hand: {' '.join(cmd)}")
    (ckpt / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer; llmscale uses explicit folders
    os.replace(tmp, final)
    fsync_dir(ckpt)
    m["files"].update({f"{UNIVERSAL_DIR}/{k}": v
                       for k, v in hash_files(final, relative_files(final), fsync=True).items()})
    m["universal"] = UNIVERSAL_DIR
    atomic_write_text(ckpt / MANIFEST, json.dumps(m, indent=1, sort_keys=True))
    log.info("converted %s to the universal format in %.1fs", ckpt.name, time.perf_counter() - t0)
    return final


def universal_view(ckpt: Path, *, saved_names: dict[str, str], target_names: dict[str, str], rank: int) -> Path:
    """CKPT/universal as an engine with parameter names ``target_names`` (DeepSpeed name -> single-device
    name) reads it; ``saved_names`` is the same map of the engine that saved. Returns CKPT/universal itself
    when the names agree, else a folder of symlinks (no copy) that the caller removes after loading.
    Collective: rank 0 builds it, every rank waits for it."""
    from llmscale import dist as ldist

    src = ckpt / UNIVERSAL_DIR
    if not target_names or all((src / "zero" / k).is_dir() for k in target_names):
        return src
    view = ckpt / (TMP_PREFIX + "universal-view")
    if rank == 0:
        shutil.rmtree(view, ignore_errors=True)
        (view / "zero").mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file():
                os.symlink(f.resolve(), view / f.name)
        by_full: dict[str, Path] = {}
        for d in sorted((src / "zero").iterdir()):
            if d.is_dir():
                by_full.setdefault(saved_names.get(d.name, d.name), d)
            else:
                os.symlink(d.resolve(), view / "zero" / d.name)
        for ds_name, full in target_names.items():
            if full in by_full and not (view / "zero" / ds_name).exists():
                os.symlink(by_full[full].resolve(), view / "zero" / ds_name)
    ldist.barrier()
    return view


def load_through_universal(ckpt: Path, m: dict, engine: Any, *, rank: int) -> dict:
    """Load checkpoint ``ckpt`` (manifest ``m``) into an engine of another layout: rank 0 converts it (once;
    the result is kept and listed in the manifest), every rank loads the universal folder under its own
    parameter names. Returns DeepSpeed's client state. Collective."""
    from llmscale import dist as ldist

    saved, current = m["layout"], layout_dict(engine.layout)
    log.warning("layout changed (saved dp=%d tp=%d pp=%d zero=%d, now dp=%d tp=%d pp=%d zero=%d): loading %s "
                "through DeepSpeed's universal checkpoint", saved["dp"], saved["tp"], saved["pp"],
                saved["zero_stage"], current["dp"], current["tp"], current["pp"], current["zero_stage"], ckpt.name)
    err = None
    if rank == 0:
        try:
            convert_to_universal(ckpt)
        except CheckpointError as e:
            err = str(e)
    err = ldist.broadcast_object(err)
    if err:
        raise CheckpointError(err)
    view = universal_view(ckpt, saved_names=m.get("param_names") or {}, target_names=engine.param_names, rank=rank)
    try:
        return engine.load(view, universal=True)
    finally:
        ldist.barrier()
        if rank == 0 and view.name != UNIVERSAL_DIR:
            shutil.rmtree(view, ignore_errors=True)
