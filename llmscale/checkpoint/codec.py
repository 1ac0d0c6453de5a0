"""llmscale's own checkpoint state as JSON + safetensors: no pickle, so loading it never runs code.

``state`` is ``{name: obj.state_dict()}`` of the Stateful components (trainer counters, loader position,
...). Its structure goes to PREFIX.json; every tensor or numpy array in it goes to PREFIX.safetensors and
is replaced in the JSON by a reference. Non-finite floats, tuples and dicts with non-string keys are
encoded explicitly so they come back as they were. Anything else is refused with the fix.

What does not live here: DeepSpeed's own shards (written and read by :mod:`llmscale.engine`), RNG state
(:mod:`llmscale.rng`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmscale.errors import CheckpointError
from llmscale.files import write_json_fsynced

STATE_FORMAT = "llmscale-checkpoint-state"


def encode(obj: Any, tensors: dict[str, torch.Tensor], where: str = "state") -> Any:
    """Plain JSON for the structure, tensors/arrays replaced by references into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors, where), encode(v, tensors, f"{where}[{k!r}]")]
                              for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise CheckpointError(
        f"state_dict entry {where} is a {type(obj).__name__}, which llmscale does not save (checkpoints hold no "
        f"pickles): return plain numbers, strings, lists, dicts, tensors or numpy arrays from state_dict()."
    )


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
        return {k: decode(v, tensors) for k, v in obj.items()}
    return obj


def _pair(prefix: Path) -> tuple[Path, Path]:
    return prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".safetensors")


def save_state_files(prefix: Path, state: dict[str, Any]) -> list[Path]:
    """``state`` (name -> state_dict) as PREFIX.json + PREFIX.safetensors (tensors), both fsynced."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": STATE_FORMAT, "state": encode(state, tensors, "state")}
    js, st = _pair(prefix)
    save_file(tensors, str(st))
    write_json_fsynced(js, doc)
    return [js, st]


def load_state_files(prefix: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    js, st = _pair(prefix)
    try:
        doc = json.loads(js.read_text(encoding="utf-8"))
        tensors = load_file(str(st))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read llmscale state {js} / {st}: {e}") from e
    return decode(doc["state"], tensors)


def summary(state: dict[str, Any]) -> dict:
    """The state as plain JSON when it is small and holds no tensors (for the manifest / `ckpt list`), else {}."""
    refs: dict[str, torch.Tensor] = {}
    enc = encode(state, refs, "state")
    return enc if not refs and len(json.dumps(enc)) < 4096 else {}
