"""What a launcher passes besides the ranks: ``accelerate launch --config_file F`` puts its settings in
``ACCELERATE_*`` variables (and, for DeepSpeed, maybe the path of a DeepSpeed JSON file); this module reads them
into llmscale config keys, so that the config files users already have work as they expect.

Rules (:func:`merge_launcher_settings`, applied by :func:`llmscale.config.load_config` to run and fine-tune configs):

* a setting the llmscale config (YAML + overrides) leaves unset is taken from the launcher;
* a setting both give with different values refuses the run before anything is built, naming both values and
  where each came from;
* a launcher setting llmscale has no equivalent for is refused, naming it (e.g. parameter offload), or, where
  llmscale does the same thing its own way, logged once with what llmscale does (zero3_init_flag,
  zero3_save_16bit_model): nothing is ignored silently;
* ``auto`` in a DeepSpeed file means "llmscale decides": batch sizes are solved by llmscale's plan with
  dp = world / (tp * pp), exactly as without accelerate.

accelerate always sets ``ACCELERATE_MIXED_PRECISION`` (``no`` unless the file or ``--mixed_precision`` says
otherwise), so ``no`` counts as unset; ``fp16`` and ``bf16`` are choices.

What does not live here: the ranks and world (:mod:`llmscale.dist`), the config tree (:mod:`llmscale.config`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from llmscale.errors import ConfigError
from llmscale.log import get_logger

log = get_logger(__name__)

_TRUE = {"true", "1", "yes"}
_PRECISION = {"fp16": "fp16", "bf16": "bf16", "no": None, "fp32": "fp32"}
# DeepSpeed keys that map to DeepSpeedExtra fields (deepspeed.*) or need nothing
_DS_EXTRA = {"steps_per_print": "deepspeed.steps_per_print", "wall_clock_breakdown": "deepspeed.wall_clock_breakdown",
             "communication_data_type": "deepspeed.communication_data_type"}
_ZERO_EXTRA = {"overlap_comm": "deepspeed.overlap_comm", "contiguous_gradients": "deepspeed.contiguous_gradients",
               "reduce_bucket_size": "deepspeed.reduce_bucket_size",
               "allgather_bucket_size": "deepspeed.allgather_bucket_size",
               "stage3_prefetch_bucket_size": "deepspeed.stage3_prefetch_bucket_size",
               "stage3_param_persistence_threshold": "deepspeed.stage3_param_persistence_threshold"}
# keys llmscale decides itself whatever the file says (set to "auto" or left out in files made for trainers)
_NOTED = {"zero_allow_untested_optimizer", "stage3_gather_16bit_weights_on_model_save", "reduce_scatter",
          "allgather_partitions", "sub_group_size", "stage3_max_live_parameters", "stage3_max_reuse_distance",
          "round_robin_gradients"}


def _auto(v: Any) -> bool:
    return isinstance(v, str) and v.strip().lower() == "auto"


def _get(raw: Mapping, dotted: str) -> Any:
    cur: Any = raw
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _set(raw: dict, dotted: str, value: Any) -> None:
    cur = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value


def _offload(device: Any, what: str, source: str) -> Optional[bool]:
    d = str(device).strip().lower()
    if d in ("none", "", "null"):
        return False
    if d == "cpu":
        if what == "param":
            raise ConfigError(f"{source}: offload_param device=cpu (ZeRO-3 parameter offload) is not something "
                              f"llmscale does; set it to none (llmscale offers parallel.offload_optimizer: the "
                              f"optimizer state on the CPU).")
        return True
    raise ConfigError(f"{source}: offload_{what} device={d!r}: llmscale offloads to the CPU only "
                      f"(parallel.offload_optimizer); set it to cpu or none.")


def _from_deepspeed_file(path: str, out: dict[str, tuple[Any, str]], notes: list[str]) -> None:
    p = Path(path)
    try:
        ds = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"accelerate's deepspeed_config_file {path} cannot be read as JSON ({e}).") from None
    src = f"deepspeed_config_file {path}"

    def put(key: str, value: Any, where: str) -> None:
        if value is None or _auto(value):
            return
        out[key] = (value, f"{src}: {where}")

    unknown = []
    for k, v in ds.items():
        if k == "train_micro_batch_size_per_gpu":
            put("parallel.micro_batch_size", v, k)
        elif k == "gradient_accumulation_steps":
            put("parallel.grad_accum_steps", v, k)
        elif k == "train_batch_size":
            put("parallel.global_batch_size", v, k)
        elif k == "gradient_clipping":
            put("optim.grad_clip", v, k)
        elif k in ("bf16", "fp16"):
            if isinstance(v, Mapping) and not _auto(v.get("enabled")) and v.get("enabled") in (True, "true"):
                put("train.precision", k, f"{k}.enabled")
        elif k == "zero_optimization":
            for zk, zv in (v or {}).items():
                if zk == "stage":
                    put("parallel.zero_stage", zv, "zero_optimization.stage")
                elif zk == "offload_optimizer":
                    if isinstance(zv, Mapping) and "device" in zv:
                        put("parallel.offload_optimizer", _offload(zv["device"], "optimizer", src),
                            "zero_optimization.offload_optimizer.device")
                elif zk == "offload_param":
                    if isinstance(zv, Mapping) and "device" in zv:
                        _offload(zv["device"], "param", src)
                elif zk in _ZERO_EXTRA:
                    put(_ZERO_EXTRA[zk], zv, f"zero_optimization.{zk}")
                elif zk in _NOTED:
                    notes.append(f"{src}: zero_optimization.{zk} is decided by llmscale's own DeepSpeed config")
                else:
                    unknown.append(f"zero_optimization.{zk}")
        elif k == "optimizer":
            typ = str((v or {}).get("type", "AdamW"))
            if typ.lower() not in ("adam", "adamw"):
                raise ConfigError(f"{src}: optimizer type {typ!r}: llmscale trains with AdamW (optim.*); remove the "
                                  f"optimizer section or set its type to AdamW.")
            params = (v or {}).get("params") or {}
            for pk, key in (("lr", "optim.lr"), ("eps", "optim.eps"), ("weight_decay", "optim.weight_decay")):
                if pk in params:
                    put(key, params[pk], f"optimizer.params.{pk}")
            betas = params.get("betas")
            if betas is not None and not _auto(betas):
                put("optim.beta1", betas[0], "optimizer.params.betas[0]")
                put("optim.beta2", betas[1], "optimizer.params.betas[1]")
        elif k == "scheduler":
            params = (v or {}).get("params") or {}
            concrete = {pk: pv for pk, pv in params.items() if not _auto(pv)}
            if concrete:
                raise ConfigError(f"{src}: scheduler {v.get('type')} with {concrete}: llmscale's schedule is "
                                  f"optim.schedule / optim.warmup_steps / optim.min_lr; set these params to \"auto\" "
                                  f"or remove the scheduler section, and give the schedule in the llmscale config.")
            notes.append(f"{src}: scheduler (all \"auto\") follows llmscale's optim.schedule")
        elif k in _DS_EXTRA:
            put(_DS_EXTRA[k], v, k)
        elif k in _NOTED:
            notes.append(f"{src}: {k} is decided by llmscale's own DeepSpeed config")
        else:
            unknown.append(k)
    if unknown:
        raise ConfigError(f"{src}: {', '.join(sorted(unknown))} have no llmscale equivalent and would be ignored. "
                          f"Remove them, or use the typed keys of the llmscale config (`llmscale config show`).")


def launcher_settings(env: Optional[Mapping[str, str]] = None) -> tuple[dict[str, tuple[Any, str]], list[str]]:
    """``({llmscale dotted key: (value, where it came from)}, notes)`` from accelerate's variables in ``env``
    (default: this process's environment). Empty outside ``accelerate launch``."""
    env = os.environ if env is None else env
    out: dict[str, tuple[Any, str]] = {}
    notes: list[str] = []
    if not any(k.startswith("ACCELERATE_") for k in env):
        return out, notes
    src = "accelerate"
    mp = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if mp not in _PRECISION:
        raise ConfigError(f"accelerate mixed_precision={mp!r}: llmscale trains in fp32, bf16 or fp16 "
                          f"(train.precision); fp8 is not supported.")
    if _PRECISION[mp]:
        out["train.precision"] = (_PRECISION[mp], f"{src}: mixed_precision={mp}")
    backend = env.get("ACCELERATE_DYNAMO_BACKEND", "NO").strip().upper()
    if backend not in ("NO", ""):
        if backend != "INDUCTOR":
            raise ConfigError(f"accelerate dynamo_backend={backend}: llmscale compiles with torch.compile's default "
                              f"(inductor) when train.compile=true; set dynamo_backend to no or inductor.")
        out["train.compile"] = (True, f"{src}: dynamo_backend={backend}")
    if env.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE:
        raise ConfigError("accelerate distributed_type FSDP: llmscale shards with DeepSpeed ZeRO (parallel.zero_stage "
                          "3 is the equivalent); use distributed_type DEEPSPEED or MULTI_GPU.")
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE:
        src = "accelerate (DeepSpeed plugin)"
        if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
            out["parallel.zero_stage"] = (int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"]), f"{src}: zero_stage")
        gas = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
        if gas and not _auto(gas):
            out["parallel.grad_accum_steps"] = (int(gas), f"{src}: gradient_accumulation_steps")
        clip = env.get("ACCELERATE_GRADIENT_CLIPPING")
        if clip and not _auto(clip) and clip.lower() != "none":
            out["optim.grad_clip"] = (float(clip), f"{src}: gradient_clipping")
        if env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"):
            out["parallel.offload_optimizer"] = (
                _offload(env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"], "optimizer", src),
                f"{src}: offload_optimizer_device={env['ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE']}")
        if env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
            _offload(env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"], "param", src)
        if env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "").lower() in _TRUE:
            notes.append(f"{src}: zero3_init_flag=true: llmscale builds the model on every rank and ZeRO-3 "
                         f"partitions it when the engine is built (no zero.Init)")
        if env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "").lower() in _TRUE:
            notes.append(f"{src}: zero3_save_16bit_model=true: llmscale writes the consolidated weights to "
                         f"RUN_DIR/final/model.pt (fp32) and exports with `llmscale export`")
        if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            file_values: dict[str, tuple[Any, str]] = {}
            _from_deepspeed_file(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"], file_values, notes)
            for k, (v, where) in file_values.items():
                if k in out and not _same(k, out[k][0], v):
                    raise ConfigError(f"{k}: {out[k][1]} gives {out[k][0]!r}, {where} gives {v!r}. accelerate's own "
                                      f"settings and its DeepSpeed file disagree: make them agree.")
                out[k] = (v, where)
    return out, notes


def _same(key: str, a: Any, b: Any) -> bool:
    try:
        if isinstance(a, bool) or isinstance(b, bool):
            return bool(a) == (str(b).lower() in _TRUE if isinstance(b, str) else bool(b))
        if isinstance(a, (int, float)) or isinstance(b, (int, float)):
            return float(a) == float(b)
    except (TypeError, ValueError):
        pass
    return str(a).strip().lower() == str(b).strip().lower()


def merge_launcher_settings(raw: dict, env: Optional[Mapping[str, str]] = None) -> dict:
    """``raw`` (the llmscale config as given: YAML + overrides) completed with the launcher's settings: taken
    where ``raw`` leaves a key unset, refused where both set it differently. Returns a new mapping."""
    settings, notes = launcher_settings(env)
    if not settings and not notes:
        return raw
    out = json.loads(json.dumps(raw))  # a deep copy of plain data
    taken = []
    for key, (value, where) in settings.items():
        mine = _get(raw, key)
        if key == "train.precision" and mine == "auto":
            mine = None  # "auto" is llmscale's unset
        if mine is None:
            _set(out, key, value)
            taken.append(f"{key}={value} ({where})")
        elif not _same(key, mine, value):
            raise ConfigError(f"{key}: the llmscale config says {mine!r}, {where} says {value!r}. Both launcher and "
                              f"config set it and they disagree: remove it from one of them or make them agree "
                              f"(nothing is chosen silently).")
    for line in taken:
        log.info("from the launcher: %s", line)
    for line in notes:
        log.warning("launcher setting not used as such: %s", line)
    return out
