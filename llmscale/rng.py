"""Capture and restore every random number generator a rank uses, without pickle.

A rank's RNG state is: Python's ``random``, NumPy's global ``RandomState``, torch's CPU generator and
(when present) every CUDA device's generator. :func:`capture_rng_state` returns it as a JSON-able
dict plus a dict of tensors; :func:`save_rng_state` writes those as ``NAME.json`` +
``NAME.safetensors``; :func:`load_rng_state` reads them back (no code can run on load: JSON and
safetensors only hold data) and :func:`restore_rng_state` puts them back in place.

    save_rng_state(ckpt / "state" / f"rng-rank{rank:05d}")
    ...
    restore_rng_state(*load_rng_state(ckpt / "state" / f"rng-rank{rank:05d}"))

Restoring the state captured after step N makes dropout and masking of steps N+1... identical to a
run that was never interrupted.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmscale.errors import RNGStateError

RNG_FORMAT = "llmscale-rng-v1"




def capture_rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, tensors): everything needed to continue each generator exactly where it is."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    meta: dict[str, Any] = {
        "format": RNG_FORMAT,
        "python": {"version": py_version, "gauss_next": py_gauss},
        "numpy": {"name": np_name, "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "cached_gaussian": float(np_cached)},
        "cuda_devices": 0,
    }
    tensors: dict[str, torch.Tensor] = {
        # Python's Mersenne Twister state: 624 words + position, each < 2**32 -> int64 holds them exactly.
        "python_state": torch.tensor(list(py_internal), dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.uint32).astype(np.int64)),
        "torch_cpu": torch.get_rng_state().clone(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states = torch.cuda.get_rng_state_all()
        meta["cuda_devices"] = len(states)
        for i, s in enumerate(states):
            tensors[f"torch_cuda_{i}"] = s.clone()
    return meta, tensors


def restore_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Put back a state from :func:`capture_rng_state` (CUDA states only where devices match)."""
    if meta.get("format") != RNG_FORMAT:
        raise RNGStateError(f"RNG state has format {meta.get('format')!r}, expected {RNG_FORMAT!r}.")
    py = meta["python"]
    internal = tuple(int(v) for v in tensors["python_state"].tolist())
    gauss = py["gauss_next"]
    random.setstate((int(py["version"]), internal, None if gauss is None else float(gauss)))
    n = meta["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"])))
    torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
    ndev = int(meta.get("cuda_devices", 0))
    if ndev and torch.cuda.is_available():
        have = torch.cuda.device_count()
        states = [tensors[f"torch_cuda_{i}"].to(torch.uint8) for i in range(ndev)]
        if have == ndev:
            torch.cuda.set_rng_state_all(states)
        else:  # a different machine shape: give each visible device the state of the same index (or the first)
            for d in range(have):
                torch.cuda.set_rng_state(states[d if d < ndev else 0], device=d)


def save_rng_state(prefix: str | Path) -> list[Path]:
    """Write this process's RNG state to PREFIX.json and PREFIX.safetensors; returns both paths."""
    from safetensors.torch import save_file

    prefix = Path(prefix)
    meta, tensors = capture_rng_state()
    st = prefix.with_name(prefix.name + ".safetensors")
    js = prefix.with_name(prefix.name + ".json")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(st))
    with open(js, "w", encoding="utf-8") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    return [js, st]


def load_rng_state(prefix: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read PREFIX.json + PREFIX.safetensors (data only; nothing is executed)."""
    from safetensors.torch import load_file

    prefix = Path(prefix)
    js = prefix.with_name(prefix.name + ".json")
    st = prefix.with_name(prefix.name + ".safetensors")
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
        tensors = load_file(str(st))
    except (OSError, ValueError) as e:
        raise RNGStateError(f"Cannot read RNG state {prefix}.json/.safetensors: {e}") from e
    return meta, tensors
