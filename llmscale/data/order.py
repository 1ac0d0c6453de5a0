"""Which sample ids every data-parallel rank reads at every step (the library behind ``llmscale data order``,
:mod:`llmscale.jobs.data_order`).

    sample_order("data/mine", world_size=4, global_batch=16, steps=2, start_step=10)

returns ``{"steps": [{"step": 10, "ranks": [[ids of rank 0], [ids of rank 1], ...]}, ...]}``. The ids
are the loader's sample ids (GPT: window index in the split; BERT: segment-pair index). For GPT each
step also has ``"starts"``: per rank, the token position where each window begins (``id * seq_len``
plus its random offset, see ``data.window_offsets``). Another ``world_size`` gives the same
global sequence, cut differently.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from llmscale.config import DataConfig


def sample_order(
    path: str | Path,
    *,
    world_size: int,
    global_batch: int,
    steps: int,
    start_step: int = 0,
    seed: Optional[int] = None,
    seq_len: Optional[int] = None,
    split: str = "train",
    shuffle: bool = True,
    window_offsets: Optional[str] = None,
) -> dict:
    """The sample ids of every rank at steps ``start_step .. start_step + steps - 1`` (``seed``, ``seq_len``:
    the run's data.seed and data.seq_len, default DataConfig's)."""
    from llmscale.data.loader import build_loader
    from llmscale.data.shards import read_manifest
    from llmscale.errors import ConfigError

    if world_size < 1 or global_batch < 1 or steps < 0 or start_step < 0:
        raise ConfigError("--world-size and --global-batch must be >= 1, --steps and --start-step >= 0.")
    if global_batch % world_size:
        raise ConfigError(
            f"--global-batch {global_batch} is not divisible by --world-size {world_size}; use a multiple "
            f"of {world_size} such as {max(1, global_batch // world_size) * world_size}.")
    path = str(path)
    kind = read_manifest(path).kind
    cfg = DataConfig(path=path, format=kind, seq_len=DataConfig.seq_len if seq_len is None else seq_len,
                     seed=DataConfig.seed if seed is None else seed,
                     window_offsets=window_offsets or DataConfig.window_offsets)
    cfg.validate()
    per = global_batch // world_size
    loader = build_loader(
        cfg, split=split, dp_rank=0, dp_size=world_size, global_batch_size=global_batch,
        micro_batch_size=per, shuffle=shuffle,
    )
    out = []
    for step in range(start_step, start_step + steps):
        ids = loader.global_sample_ids(step)
        row = {"step": step, "ranks": [ids[r * per : (r + 1) * per].tolist() for r in range(world_size)]}
        if kind == "gpt":
            starts = loader.global_window_starts(step)
            row["starts"] = [starts[r * per : (r + 1) * per].tolist() for r in range(world_size)]
        out.append(row)
    return {"steps": out}
