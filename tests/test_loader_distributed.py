"""The loader on real spawned ranks (gloo): ranks concatenated in rank order read exactly the
world-size-1 sequence, also after resuming a state saved on another number of ranks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_loader import make_dataset

from llmscale.config import DataConfig
from llmscale.data.loader import build_loader
from llmscale.testing import run_distributed

GBS, STEPS, RESUME_AT = 8, 3, 5


def _cfg(path, fmt):
    return DataConfig(path=str(path), seq_len=16, format=fmt, nsp=fmt == "bert", seed=7)


def _read(ld, steps):
    out = []
    for _ in range(steps):
        mbs = ld.next_step()
        out.append({k: torch.cat([m[k] for m in mbs]).numpy() for k in mbs[0]})
    return out


def _rank_reads(rank, world_size, path, fmt, resume_state):
    import torch.distributed as dist

    mbs = GBS // world_size // 2 or 1
    ld = build_loader(_cfg(path, fmt), dp_rank=rank, dp_size=world_size, global_batch_size=GBS, micro_batch_size=mbs)
    fresh = _read(ld, STEPS)
    states = [None] * world_size
    dist.all_gather_object(states, ld.state_dict())  # every rank must hold the same position
    assert all(s == states[0] for s in states), states
    resumed = build_loader(_cfg(path, fmt), dp_rank=rank, dp_size=world_size, global_batch_size=GBS,
                           micro_batch_size=mbs)
    resumed.load_state_dict(resume_state)
    return fresh, _read(resumed, STEPS)


@pytest.mark.parametrize("world_size, fmt", [(2, "gpt"), pytest.param(4, "bert", marks=pytest.mark.slow)])
def test_ranks_read_the_world_size_1_sequence_and_resume_across_sizes(tmp_path, world_size, fmt):
    make_dataset(tmp_path / "ds", kind=fmt, docs=40, doc_len=(5, 60), shard_tokens=300)
    ref_ld = build_loader(_cfg(tmp_path / "ds", fmt), dp_rank=0, dp_size=1, global_batch_size=GBS, micro_batch_size=GBS)
    ref = _read(ref_ld, RESUME_AT + STEPS)
    # the state after RESUME_AT steps of a 1-rank run, resumed on world_size ranks
    state_ld = build_loader(_cfg(tmp_path / "ds", fmt), dp_rank=0, dp_size=1, global_batch_size=GBS, micro_batch_size=4)
    _read(state_ld, RESUME_AT)
    results = run_distributed(_rank_reads, world_size, args=(str(tmp_path / "ds"), fmt, state_ld.state_dict()),
                              timeout=240)
    for which, offset in ((0, 0), (1, RESUME_AT)):
        for k in range(STEPS):
            for key in ref[0]:
                cat = np.concatenate([results[r][which][k][key] for r in range(world_size)])
                assert np.array_equal(cat, ref[offset + k][key]), (which, k, key)
