"""Resharding: DeepSpeed's universal (layout-free) checkpoint format, and when a load needs it.

:func:`convert_to_universal` runs ``deepspeed.checkpoint.ds_to_universal`` on CKPT/model into
CKPT/universal (one process) and lists the new files, with checksums, in the checkpoint's manifest.
:func:`universal_view` presents that folder under the parameter names of the engine that loads it
(pipeline stages name parameters by layer index, a plain model by module path; both map to the
single-device names recorded in the manifest at save).

A ZeRO-0 checkpoint holds no ZeRO optimizer shards, which DeepSpeed's converter needs: llmscale converts it
itself (:func:`zero0_to_universal`: weights from the model states, Adam moments from torch's optimizer state,
whose positions the engine recorded by name), and loads a universal folder into a ZeRO-0 engine itself
(:func:`read_universal_param`, used by :meth:`llmscale.engine.Engine.load`).

What does not live here: the decision to convert during a resume (:mod:`.manager`) and reading the
merged weights for export (:mod:`.consolidate`).
"""
from __future__ import annotations

import json
import math
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
    if m["layout"]["zero_stage"] == 0 and not any((ckpt / ENGINE_DIR).glob("*_optim_states.pt")):
        t0 = time.perf_counter()
        try:
            zero0_to_universal(ckpt / ENGINE_DIR, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return _adopt(ckpt, m, tmp, final, t0)
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
    return _adopt(ckpt, m, tmp, final, t0)


def _normalize_optimizer_state(folder: Path) -> None:
    """zero/optimizer_state.pt readable by every ZeRO stage: DeepSpeed's converter writes the stage-1/2 form
    (top-level ``param_groups``) from a ZeRO-1/2 checkpoint and the stage-3 form (``optimizer_state_dict`` with
    the step) from a ZeRO-3 one, and each stage's loader reads only its own (ZeRO-2 -> ZeRO-3 raised KeyError)."""
    import torch

    from llmscale.checkpoint.safe_load import restricted_load

    f = folder / "zero" / "optimizer_state.pt"
    if not f.is_file():
        return
    sd = restricted_load(f, map_location="cpu")
    changed = False
    inner = sd.get("optimizer_state_dict")
    if "param_groups" not in sd and isinstance(inner, dict) and "param_groups" in inner:
        sd["param_groups"] = inner["param_groups"]
        changed = True
    if not isinstance(inner, dict) or "state" not in inner:
        steps = sorted(folder.glob("zero/*/step.pt"))
        step = restricted_load(steps[0], map_location="cpu") if steps else torch.tensor(0.0)
        sd["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": sd.get("param_groups", [])}
        changed = True
    if "ds_version" not in sd:
        import deepspeed

        sd["ds_version"] = deepspeed.__version__
        changed = True
    if changed:
        torch.save(sd, f)


def _adopt(ckpt: Path, m: dict, tmp: Path, final: Path, t0: float) -> Path:
    """The converted folder ``tmp`` becomes CKPT/universal, its files listed (with checksums) in the manifest."""
    _normalize_optimizer_state(tmp)
    os.replace(tmp, final)
    fsync_dir(ckpt)
    m["files"].update({f"{UNIVERSAL_DIR}/{k}": v
                       for k, v in hash_files(final, relative_files(final), fsync=True).items()})
    m["universal"] = UNIVERSAL_DIR
    atomic_write_text(ckpt / MANIFEST, json.dumps(m, indent=1, sort_keys=True))
    log.info("converted %s to the universal format in %.1fs", ckpt.name, time.perf_counter() - t0)
    return final


def _model_state_aliases(src: Path, zero_stage: int) -> dict[str, Path]:
    """DeepSpeed finds a universal folder's model-states file under its engine's own naming: ZeRO-3 engines look
    for ``zero_pp_rank_0_mp_rank_XX_model_states.pt``, the others for ``mp_rank_XX_model_states.pt``; a folder
    converted from the other kind has only the other name (ZeRO-2 -> ZeRO-3 failed in DeepSpeed's loader)."""
    plain = sorted(src.glob("mp_rank_*_model_states.pt"))
    z3 = sorted(src.glob("zero_pp_rank_0_mp_rank_*_model_states.pt"))
    if zero_stage == 3 and plain and not z3:
        return {f"zero_pp_rank_0_{f.name}": f for f in plain}
    if zero_stage < 3 and z3 and not plain:
        return {f.name[len("zero_pp_rank_0_"):]: f for f in z3}
    return {}


def universal_view(ckpt: Path, *, saved_names: dict[str, str], target_names: dict[str, str], rank: int,
                   wait: Any = None, zero_stage: int = 1) -> Path:
    """CKPT/universal as an engine with parameter names ``target_names`` (DeepSpeed name -> single-device
    name) and ZeRO stage ``zero_stage`` reads it; ``saved_names`` is the same map of the engine that saved.
    Returns CKPT/universal itself when the names agree, else a folder of symlinks (no copy) that the caller
    removes after loading. Collective: rank 0 builds it, every rank waits for it."""
    from llmscale import dist as ldist

    src = ckpt / UNIVERSAL_DIR
    aliases = _model_state_aliases(src, zero_stage)
    if not aliases and (not target_names or all((src / "zero" / k).is_dir() for k in target_names)):
        return src
    view = ckpt / (TMP_PREFIX + "universal-view")
    if rank == 0:
        shutil.rmtree(view, ignore_errors=True)
        (view / "zero").mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file():
                os.symlink(f.resolve(), view / f.name)
        for name, f in aliases.items():
            os.symlink(f.resolve(), view / name)
        by_full: dict[str, Path] = {}
        for d in sorted((src / "zero").iterdir()):
            if d.is_dir():
                by_full.setdefault(saved_names.get(d.name, d.name), d)
            else:
                os.symlink(d.resolve(), view / "zero" / d.name)
        for ds_name, full in target_names.items():
            if full in by_full and not (view / "zero" / ds_name).exists():
                os.symlink(by_full[full].resolve(), view / "zero" / ds_name)
        for d in by_full.values():  # names the target keeps as saved
            if not (view / "zero" / d.name).exists():
                os.symlink(d.resolve(), view / "zero" / d.name)
    with (wait or _unbounded)(f"rank 0 building the universal view of {ckpt.name}"):
        ldist.barrier()
    return view


def _unbounded(what: str):
    import contextlib

    return contextlib.nullcontext()


def load_through_universal(ckpt: Path, m: dict, engine: Any, *, rank: int, wait: Any = None) -> dict:
    """Load checkpoint ``ckpt`` (manifest ``m``) into an engine of another layout: rank 0 converts it (once;
    the result is kept and listed in the manifest), every rank loads the universal folder under its own
    parameter names. Returns DeepSpeed's client state. Collective; ``wait(what)`` bounds each wait for the
    other ranks (:func:`llmscale.dist.deadline`)."""
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
    wait = wait or _unbounded
    with wait(f"rank 0 converting {ckpt.name} to the universal format (for a large checkpoint, convert it "
              f"beforehand with `llmscale ckpt convert {ckpt}`)"):
        err = ldist.broadcast_object(err)
    if err:
        raise CheckpointError(err)
    view = universal_view(ckpt, saved_names=m.get("param_names") or {}, target_names=engine.param_names, rank=rank,
                          wait=wait, zero_stage=engine.layout.zero_stage)
    try:
        with wait(f"loading {ckpt.name} through the universal format (DeepSpeed's load, collectives inside)"):
            return engine.load(view, universal=True)
    finally:
        with wait(f"every rank done reading the universal view of {ckpt.name}"):
            ldist.barrier()
        if rank == 0 and view.name != UNIVERSAL_DIR:
            shutil.rmtree(view, ignore_errors=True)


# ------------------------------------------------------------------ ZeRO-0: llmscale's own conversion and load

_STATES = ("fp32", "exp_avg", "exp_avg_sq")


def _layer_weights(src: Path, tp_rank: int, names: dict[str, str]) -> dict[str, Any]:
    """A pipeline checkpoint's weights of one tensor-parallel rank, by DeepSpeed name: layer_II-model_TT files
    hold each layer's state under its local names ("attn.q_proj.weight"); the layer's parameters are "II.local"
    or, for a tied layer, "tied_modules.KEY.local"."""
    from llmscale.checkpoint.safe_load import restricted_load

    out: dict[str, Any] = {}
    tied = [n for n in names if n.startswith("tied_modules.")]
    for f in sorted(src.glob(f"layer_*-model_{tp_rank:02d}-model_states.pt")):
        idx = int(f.name.split("-")[0].split("_")[1])
        for local, t in restricted_load(f, map_location="cpu").items():
            name = f"{idx}.{local}"
            if name not in names:
                hits = [n for n in tied if n.endswith("." + local)]
                if len(hits) != 1:
                    continue  # a buffer
                name = hits[0]
            out.setdefault(name, t)
    return out


def zero0_to_universal(src: str | Path, out: str | Path) -> None:
    """Write DeepSpeed's universal layout (``zero/NAME/{fp32,exp_avg,exp_avg_sq,step}.pt``,
    ``zero/optimizer_state.pt``, the model-states files) from the ZeRO-0 DeepSpeed folder ``src`` of any
    tensor/pipeline layout. Folders are named by single-device parameter name; tensor-parallel slices are
    joined along the split the engine recorded (column: dim 0, row: dim 1)."""
    import torch
    from deepspeed.checkpoint.constants import CAT_DIM, PARAM

    from llmscale.checkpoint.safe_load import restricted_load

    src, out = Path(src), Path(out)
    files = sorted(src.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{src} holds no mp_rank_*_model_states.pt: not a DeepSpeed ZeRO-0 checkpoint.")
    slices: dict[str, dict[int, dict[str, Any]]] = {}
    kinds: dict[str, str] = {}
    step, first = None, None
    for f in files:
        sd = restricted_load(f, map_location="cpu")
        info = sd.get("universal_checkpoint_info") or {}
        order = info.get("llmscale_optimizer_params")
        if order is None:
            raise CheckpointError(
                f"{f} does not record its optimizer's parameter order (written by an llmscale before ZeRO-0 "
                f"checkpoints could change layout): resume it on its own layout, or start a new run from its "
                f"weights with `llmscale export` and model.init_from (the Adam moments restart).")
        names: dict[str, str] = info["llmscale_param_names"]
        kinds.update(info["llmscale_tp_kinds"])
        tp = int(info["llmscale_tp_rank"])
        weights = sd["module"] if sd.get("module") is not None else _layer_weights(src, tp, names)
        opt = sd["optimizer"]
        if not isinstance(opt, dict) or "state" not in opt or len(opt["param_groups"]) != len(order):
            raise CheckpointError(f"{f}: the optimizer state is not torch's AdamW state (a ZeRO-0 fp16 run keeps "
                                  f"its own master weights); it cannot change layout.")
        first = first or (sd, opt)
        for gi, group in enumerate(order):
            for j, ds_name in enumerate(group):
                full = names.get(ds_name, ds_name)
                if tp in slices.get(full, {}):
                    continue  # a tied copy on another pipeline stage
                st = opt["state"].get(opt["param_groups"][gi]["params"][j], {})
                entry = {"fp32": weights[ds_name].float()}
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in st:
                        entry[k] = st[k].float()
                if "step" in st:
                    step = float(st["step"])
                slices.setdefault(full, {})[tp] = entry
    (out / "zero").mkdir(parents=True)
    for full, by_rank in slices.items():
        kind = kinds.get(full, "replicated")
        parts = [by_rank[r] for r in sorted(by_rank)]
        d = out / "zero" / full
        d.mkdir()
        for key in _STATES:
            if key not in parts[0]:
                continue
            dim = 1 if kind == "row" else 0  # recorded on one slice too: a tp=1 checkpoint may grow to tp=2
            t = parts[0][key] if kind == "replicated" else torch.cat([p[key] for p in parts], dim=dim)
            torch.save({PARAM: t.contiguous(), CAT_DIM: dim}, d / f"{key}.pt")
        if step is not None:
            torch.save(torch.tensor(step), d / "step.pt")
    sd, opt = first
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
    clip = float((sd.get("ds_config") or {}).get("gradient_clipping", 0.0))
    torch.save({"dynamic_loss_scale": False, "overflow": False, "clip_grad": clip, "ds_version": sd["ds_version"],
                "param_groups": groups,
                "optimizer_state_dict": {"state": {0: {"step": step or 0.0}}, "param_groups": groups}},
               out / "zero" / "optimizer_state.pt")
    for f in files:
        shutil.copy2(f, out / f.name)


def read_universal_param(folder: Path, *, kind: str, rank: int, size: int, shape: tuple) -> dict[str, Any]:
    """One parameter of a universal folder as a tensor-parallel rank holds it: ``{"fp32", "exp_avg",
    "exp_avg_sq": tensor of ``shape``, "step": float}`` (the moments and step when saved). ``kind``
    (column/row/replicated) says which dimension the rank's slice is cut from."""
    from deepspeed.checkpoint.constants import CAT_DIM, PARAM

    from llmscale.checkpoint.safe_load import restricted_load

    if not (folder / "fp32.pt").is_file():
        raise CheckpointError(f"universal checkpoint has no {folder.name}/fp32.pt: it was saved from another model.")
    out: dict[str, Any] = {}
    for key in _STATES:
        f = folder / f"{key}.pt"
        if not f.is_file():
            continue
        d = restricted_load(f, map_location="cpu")
        t = d[PARAM] if isinstance(d, dict) else d
        full = list(shape)
        if kind in ("column", "row") and len(full) > (0 if kind == "column" else 1):
            full[0 if kind == "column" else 1] *= size
        if t.dim() == 1 and len(full) > 1 and t.numel() == math.prod(full):
            t = t.view(full)  # converted from ZeRO-3, which keeps every parameter flat
        if tuple(t.shape) != tuple(shape):
            dim = 0 if kind == "column" else 1
            if kind == "replicated" or t.dim() <= dim or t.shape[dim] != shape[dim] * size:
                raise CheckpointError(f"{folder.name}/{key}.pt has shape {tuple(t.shape)}; a {kind} parameter of "
                                      f"shape {tuple(shape)} on {size} tensor-parallel ranks cannot come from it.")
            saved_dim = d.get(CAT_DIM, dim) if isinstance(d, dict) else dim
            if saved_dim != dim:
                raise CheckpointError(f"{folder.name}/{key}.pt was joined along dim {saved_dim}, this model splits "
                                      f"it along dim {dim}: the checkpoint was converted from wrong split records.")
            t = t.chunk(size, dim=dim)[rank]
        out[key] = t
    if (folder / "step.pt").is_file():
        st = restricted_load(folder / "step.pt", map_location="cpu")
        out["step"] = float(st)
    return out
