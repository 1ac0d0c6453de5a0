"""Data loader for the lm-evaluation-harness tasks in this folder (``custom_dataset: !function local_data.load_json``).

The harness hands ``dataset_kwargs`` to ``datasets.load_dataset``, which reads relative ``data_files`` from the
current directory; this loader reads them from this folder instead, so a task here runs from any working
directory and from a clean clone, offline (the ``json`` reader ships with ``datasets``; nothing is fetched).

What does not live here: the tasks themselves (the YAML files beside this one), the model adapter
(:mod:`llmscale.harness`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _resolve(files: Any) -> Any:
    """``data_files`` (a path, a list of paths, or a split -> path(s) dict) with relative paths made absolute
    against this folder."""
    if isinstance(files, dict):
        return {split: _resolve(v) for split, v in files.items()}
    if isinstance(files, (list, tuple)):
        return [_resolve(v) for v in files]
    p = Path(str(files)).expanduser()
    return str(p if p.is_absolute() else HERE / p)


def load_json(data_files: Any, **_metadata: Any) -> Any:
    """What ``datasets.load_dataset("json", data_files=...)`` gives (a DatasetDict: one split per key of
    ``data_files``, or "train" for a plain path), with relative paths read from this folder. It builds each split
    with ``Dataset.from_json``, which reads the files and nothing else (``load_dataset`` also sends a usage ping to
    the network unless HF_HUB_OFFLINE is set). The harness also passes its task metadata (model arguments and
    the like) as keywords; they are not needed here."""
    import datasets

    files = _resolve(data_files)
    splits = files if isinstance(files, dict) else {"train": files}
    return datasets.DatasetDict({split: datasets.Dataset.from_json(paths) for split, paths in splits.items()})
