"""Reading DeepSpeed's pickle files without running code: torch's restricted unpickler and one allowlist.

DeepSpeed 0.19.8 writes its checkpoint files with ``torch.save`` (pickle) and reads them with
``torch.load(weights_only=False)``: full pickle, so a file that a writer of the run directory forged (and
listed in a rewritten manifest) would run code on every rank of the next job. Here every such load goes
through ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers and calls nothing
but the globals of :data:`ALLOWED_GLOBALS`: the few DeepSpeed classes that llmscale's checkpoints hold
(on every layout: ZeRO 0-3, tensor and pipeline parallel, offload, universal). The allowlist is written
down once, here; ``tests/test_safe_load.py`` fails when a save starts needing more.

How each load is routed (no global patch of torch in a training process):

* resume / rollback / fine-tune of a same-layout checkpoint: DeepSpeed's own extension point, its
  checkpoint engine (``engine.checkpoint_engine.load``), replaced by :func:`restricted_load` for the
  engine's lifetime (:func:`llmscale.engine.build_engine`);
* universal (resharding) loads, which DeepSpeed reads with a bare ``torch.load`` in
  ``deepspeed.checkpoint.universal_checkpoint`` and ``deepspeed.runtime.zero.stage3``: those modules'
  ``torch`` name points, during the load only, at a view of torch whose ``load`` is restricted
  (:func:`restricted_torch_in`);
* the universal conversion (``ds_to_universal``, many bare ``torch.load`` calls, worker processes): it runs
  in a process of its own (:mod:`llmscale.checkpoint.convert_worker`) where ``torch.load`` is restricted
  for the whole process and its forked workers;
* consolidation for export / fine-tune init / eval: :func:`restricted_load` directly.

Before any of that, :func:`scan_checkpoint` (called by ``verify_checkpoint`` on every rank's share of the
files, gathered like the checksums) lists every global a checkpoint's pickles ask for outside the
allowlist, so a forged checkpoint is refused by all ranks before any rank loads anything.

A file the user trusts (a checkpoint of another tool that needs more) loads with full pickle when
``LLMSCALE_TRUST_PICKLE=1`` is set: knowingly, for that run.

What does not live here: the checksums and the manifest (:mod:`llmscale.checkpoint.store`), when a
checkpoint is loaded (:mod:`llmscale.checkpoint.manager`).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from llmscale.errors import CheckpointError

_TORCH_LOAD = torch.load  # the real one, kept before restrict_process() replaces it in a conversion process

TRUST_ENV = "LLMSCALE_TRUST_PICKLE"
REFUSED = "asks the unpickler for"  # in every refusal message (the manager stops instead of falling back)

# What llmscale's checkpoints ask for beyond torch's own safe set (tensors, storages, plain containers),
# found by scanning saves of every layout; each entry is a plain data holder whose rebuild runs no code.
ALLOWED_GLOBALS: tuple[str, ...] = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # the (static) loss scaler of fp32/bf16 runs
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # fp16 runs
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # the ZeRO stage, an Enum
    "deepspeed.utils.tensor_fragment.fragment_address",  # a dataclass (numel, start) per parameter fragment
)

# DeepSpeed modules that read checkpoint files with a bare torch.load on the universal (resharding) path
UNIVERSAL_LOADERS: tuple[str, ...] = ("deepspeed.checkpoint.universal_checkpoint", "deepspeed.runtime.zero.stage3")


def trusted() -> bool:
    """True when the user set ``LLMSCALE_TRUST_PICKLE=1`` (full pickle for this run's checkpoint loads)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def allowed_objects() -> list[Any]:
    return [_resolve(n) for n in ALLOWED_GLOBALS]


def _fix(path: Path) -> str:
    return (f"If {path} is a file you trust (a checkpoint of another tool, saved with more than llmscale's "
            f"checkpoints hold), load it knowingly with {TRUST_ENV}=1 (full pickle: it can run code); a run resumed "
            f"that way writes its next checkpoint with llmscale's own files, which load without the flag.")


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """The globals a ``torch.save`` file's pickle asks for outside torch's safe set and :data:`ALLOWED_GLOBALS`
    (reads the pickle opcodes only; nothing is built). A file that is not a torch zip archive is refused."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    p = Path(path)
    if not zipfile.is_zipfile(p):
        return ["<not a torch.save zip archive: a raw pickle>"]
    try:
        found = get_unsafe_globals_in_checkpoint(str(p))
    except Exception as e:  # a damaged archive, or opcodes the scanner refuses
        return [f"<unreadable pickle: {type(e).__name__}: {e}>"]
    allowed = set(ALLOWED_GLOBALS)
    return sorted(g for g in found if g not in allowed)


def scan_checkpoint(ckpt: str | os.PathLike, rels: Sequence[str]) -> list[str]:
    """Problems (one per file) for the pickle files among ``rels`` (paths relative to ``ckpt``) that ask for
    globals outside the allowlist; empty when all are clean or :func:`trusted`."""
    if trusted():
        return []
    problems = []
    for rel in rels:
        if not rel.endswith((".pt", ".pth", ".bin")):
            continue
        p = Path(ckpt) / rel
        bad = unsafe_globals(p)
        if bad:
            problems.append(f"{p} {REFUSED} {', '.join(bad[:5])}, outside the allowlist of what "
                            f"llmscale's checkpoints need (llmscale.checkpoint.safe_load): refused before any rank "
                            f"loads anything. {_fix(p)}")
    return problems


_GLOBAL_IN_ERROR = re.compile(r"(?:GLOBAL|global) ([\w.]+)")


def restricted_load(path: Any, map_location: Any = None, *, name: Optional[str] = None, **kwargs: Any) -> Any:
    """``torch.load`` with the restricted unpickler and :data:`ALLOWED_GLOBALS` (full pickle when
    :func:`trusted`). A file that asks for anything else raises :class:`CheckpointError` naming the global and
    the file. ``path``: a path or a file object (then ``name`` names it in errors)."""
    kwargs.pop("weights_only", None)
    if trusted():
        return _TORCH_LOAD(path, map_location=map_location, weights_only=False, **kwargs)
    with torch.serialization.safe_globals(allowed_objects()):
        try:
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:
            m = _GLOBAL_IN_ERROR.search(str(e))
            what = m.group(1) if m else str(e).splitlines()[0][:200]
            shown = name or str(path)
            raise CheckpointError(f"{shown} {REFUSED} {what}, outside the allowlist of what llmscale's "
                                  f"checkpoints need (llmscale.checkpoint.safe_load): refused, nothing was run. "
                                  f"{_fix(Path(shown))}") from None


class _RestrictedTorch:
    """torch as seen by one DeepSpeed module during a load: every attribute is torch's, except ``load``."""

    def __init__(self, torch_module: Any) -> None:
        self._torch = torch_module

    def __getattr__(self, name: str) -> Any:
        return restricted_load if name == "load" else getattr(self._torch, name)


@contextlib.contextmanager
def restricted_torch_in(module_names: Sequence[str] = UNIVERSAL_LOADERS) -> Iterator[None]:
    """For the duration, the named modules' global ``torch`` is a view whose ``load`` is :func:`restricted_load`
    (the modules are imported if needed; nothing else in the process changes)."""
    swapped = []
    try:
        for name in module_names:
            mod = importlib.import_module(name)
            real = mod.__dict__.get("torch")
            if real is None or isinstance(real, _RestrictedTorch):
                continue
            mod.torch = _RestrictedTorch(real)
            swapped.append((mod, real))
        yield
    finally:
        for mod, real in swapped:
            mod.torch = real


def restrict_checkpoint_engine(checkpoint_engine: Any) -> None:
    """DeepSpeed's checkpoint engine (its extension point for reading and writing checkpoint files) loads through
    :func:`restricted_load` from now on; saving is unchanged."""
    checkpoint_engine.load = lambda path, map_location=None: restricted_load(path, map_location=map_location)


def restrict_process() -> None:
    """``torch.load`` restricted for this whole process (and processes it forks): only for a process that exists
    to run DeepSpeed's conversion (:mod:`llmscale.checkpoint.convert_worker`)."""
    torch.load = restricted_load

