"""Sharded, atomic, verifiable checkpoints: save, retention, auto-resume, resharding, rollback, consolidation.

What lives where:

* :mod:`.store` — the on-disk layout (names, ``manifest.json``, ``latest``), verification against the
  manifest, discovery of a run's checkpoints, retention and clean-up; plain file work, one process;
* :mod:`.codec` — llmscale's own state as JSON + safetensors (no pickle);
* :mod:`.universal` — DeepSpeed's universal format for loading on another layout;
* :mod:`.manager` — :class:`CheckpointManager`: when to save, the collective save protocol, resume,
  load and rollback (every rank calls it together);
* :mod:`.consolidate` — single-device weights from a checkpoint of any layout (for export and eval).

What does not live here: talking to DeepSpeed (``Engine.save`` / ``Engine.load`` in :mod:`llmscale.engine`),
counting bad steps (:class:`llmscale.trainer.BadStepGuard`), the run directory's other names
(:mod:`llmscale.artifacts`).
"""
from llmscale.checkpoint.manager import CheckpointManager
from llmscale.checkpoint.store import (
    CHECKPOINTS,
    MANIFEST,
    CheckpointInfo,
    checkpoints_dir,
    latest_complete,
    layout_dict,
    list_checkpoints,
    parse_step,
    read_latest,
    read_manifest,
    resolve_checkpoint,
    step_name,
    verify_checkpoint,
)
from llmscale.checkpoint.universal import convert_to_universal, needs_universal
from llmscale.errors import CheckpointError

__all__ = [
    "CHECKPOINTS", "MANIFEST", "CheckpointError", "CheckpointInfo", "CheckpointManager", "checkpoints_dir",
    "convert_to_universal", "latest_complete", "layout_dict", "list_checkpoints", "needs_universal", "parse_step",
    "read_latest", "read_manifest", "resolve_checkpoint", "step_name", "verify_checkpoint",
]
