"""Layout-free weights from a training checkpoint of any layout, without starting DeepSpeed.

* data parallel only (ZeRO 0-2): the full weights are DeepSpeed's ``model/mp_rank_00_model_states.pt``
  ("module"), read with the restricted unpickler (:mod:`llmscale.checkpoint.safe_load`);
* tensor/pipeline parallel or ZeRO-3: the checkpoint is converted to DeepSpeed's universal format (merged
  fp32 parameters, one folder per parameter) and the DeepSpeed names are mapped back to the single-device
  model's names with the map the engine stored in the checkpoint (``llmscale_param_names``).

Every file is checked against the manifest before anything is read. What does not live here: choosing
which kind of source a path is (:func:`llmscale.artifacts.load_model`), writing transformers folders
(:mod:`llmscale.models.hf`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmscale.checkpoint.store import CONFIG_FILE, ENGINE_DIR, read_manifest, verify_checkpoint
from llmscale.checkpoint.universal import convert_to_universal
from llmscale.errors import CheckpointError
from llmscale.log import get_logger

log = get_logger(__name__)


def _load_tensors(path: Path) -> Any:
    from llmscale.checkpoint.safe_load import restricted_load

    return restricted_load(path, map_location="cpu")


def consolidated_state_dict(ckpt: Path, m: dict) -> dict[str, torch.Tensor]:
    """``{single-device parameter name: fp32 tensor}`` of verified checkpoint ``ckpt`` (manifest ``m``);
    tied weights appear once."""
    lay = m["layout"]
    if lay["tp"] == 1 and lay["pp"] == 1 and lay["zero_stage"] < 3:
        sd = _load_tensors(ckpt / ENGINE_DIR / "mp_rank_00_model_states.pt")
        return {k: v.detach().float() for k, v in sd["module"].items()}
    uni = convert_to_universal(ckpt)
    # the model-states file: mp_rank_00_... (ZeRO 0-2), zero_pp_rank_0_mp_rank_00_... (ZeRO-3)
    candidates = [uni / "mp_rank_00_model_states.pt", *sorted(uni.glob("zero_pp_rank_0_mp_rank_*_model_states.pt"))]
    metas = [f for f in candidates if f.is_file()]
    meta = _load_tensors(metas[0]) if metas else {}
    info = meta.get("universal_checkpoint_info", {}) if isinstance(meta, dict) else {}
    names: dict[str, str] = info.get("llmscale_param_names") or {}
    shapes: dict[str, Any] = {}
    for group in (meta.get("param_shapes") or []) if isinstance(meta, dict) else []:
        shapes.update(group)
    out: dict[str, torch.Tensor] = {}
    for d in sorted((uni / "zero").iterdir()):
        f = d / "fp32.pt"
        if not f.is_file():
            continue
        param = _load_tensors(f)
        t = param["param"] if isinstance(param, dict) else param
        shape = shapes.get(d.name)
        if shape is not None and t.dim() == 1 and len(shape) > 1 and t.numel() == torch.Size(shape).numel():
            t = t.view(shape)  # ZeRO-3 keeps every parameter flat
        out.setdefault(names.get(d.name, d.name), t.detach().float())
    return out


def load_checkpoint_model(ckpt: str | Path) -> tuple[Any, Any]:
    """``(model in eval mode, run config)`` rebuilt from checkpoint folder ``ckpt`` (its config.yaml: a
    RunConfig, or a FinetuneConfig whose classifier is rebuilt) with the consolidated weights. Refuses a
    damaged checkpoint and weights that do not fit the config's model."""
    from llmscale.config import RunConfig, from_dict, read_yaml
    from llmscale.models import build_model

    ckpt = Path(ckpt)
    problems = verify_checkpoint(ckpt)
    if problems:
        raise CheckpointError(f"{ckpt} is damaged, refusing to load it: " + "; ".join(problems[:5]))
    m = read_manifest(ckpt)
    if not (ckpt / CONFIG_FILE).is_file():
        raise CheckpointError(f"{ckpt} has no {CONFIG_FILE} (it was not written by `llmscale train`): cannot rebuild "
                              f"the model.")
    raw = read_yaml(ckpt / CONFIG_FILE)
    if "task" in raw:  # a fine-tuning run: the classifier its config describes
        from llmscale.config_finetune import FinetuneConfig, build_finetuned_model

        cfg = from_dict(FinetuneConfig, raw)
        model = build_finetuned_model(cfg)
    else:
        cfg = from_dict(RunConfig, raw)
        model = build_model(cfg.model, vocab_size=cfg.model.vocab_size)
    sd = consolidated_state_dict(ckpt, m)
    # tied weights are stored once; their aliases are the same Parameter in the model
    missing, unexpected = model.load_state_dict(sd, strict=False)
    shared: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    aliases = {n for names in shared.values() if len(names) > 1 for n in names if any(o in sd for o in names)}
    buffers = {n for n, _ in model.named_buffers()}
    real_missing = [k for k in missing if k not in aliases and k not in buffers]
    if real_missing or unexpected:
        raise CheckpointError(f"{ckpt}: the consolidated weights do not match the model of its {CONFIG_FILE} "
                              f"(missing {real_missing[:5]}, unexpected {list(unexpected)[:5]}).")
    lay = m["layout"]
    log.info("consolidated %s (layout dp=%d tp=%d pp=%d zero=%d, step %d)", ckpt, lay["dp"], lay["tp"], lay["pp"],
             lay["zero_stage"], m["step"])
    return model.eval(), cfg
