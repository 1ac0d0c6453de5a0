"""Resuming on another layout: a ZeRO-1 checkpoint written on DP=2 resumes on DP=1 and back on DP=2 through
DeepSpeed's universal checkpoint (converted automatically because the manifest's layout differs). With the
global batch unchanged the data order continues exactly and the loss follows the uninterrupted run."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _ckpt_common as C  # noqa: E402

from llmscale.checkpoint import list_checkpoints, read_manifest, verify_checkpoint  # noqa: E402
from llmscale.testing import run_distributed  # noqa: E402


@pytest.mark.slow
def test_zero1_dp2_to_dp1_to_dp2(tmp_path):
    kw = {"every_steps": 2, "keep_last": 5, "dropout": 0.0}  # no dropout: masks depend on the rank count
    ref = run_distributed(C.train, 2, args=(str(tmp_path / "ref"), 6), kwargs=kw, timeout=600)
    run = str(tmp_path / "run")
    a = run_distributed(C.train, 2, args=(run, 2), kwargs=kw, timeout=600)
    b = run_distributed(C.train, 1, args=(run, 4), kwargs=kw, timeout=600)  # DP=1
    ckpts = Path(run) / "checkpoints"
    assert read_manifest(ckpts / "step-000002")["universal"] == "universal"  # converted on the layout change
    assert verify_checkpoint(ckpts / "step-000002") == []  # and the manifest lists (and checks) the new files
    c = run_distributed(C.train, 2, args=(run, 6), kwargs=kw, timeout=600)  # DP=2 again
    assert b[0]["resumed"] == 2 and c[0]["resumed"] == 4
    assert read_manifest(ckpts / "step-000004")["layout"]["dp"] == 1
    assert [i.step for i in list_checkpoints(run)] == [2, 4, 6]

    # data order: every global batch exactly once, in the uninterrupted order (rank 0 reads the first half)
    ref_ids = ref[0]["sample_ids"] + ref[1]["sample_ids"]
    got = a[0]["sample_ids"] + a[1]["sample_ids"] + b[0]["sample_ids"] + c[0]["sample_ids"] + c[1]["sample_ids"]
    assert sorted(got) == sorted(ref_ids) == list(range(6 * C.GLOBAL_BATCH))
    assert b[0]["sample_ids"] == list(range(2 * C.GLOBAL_BATCH, 4 * C.GLOBAL_BATCH))
    # loss continuity: weights and Adam moments came through the conversion (a fresh optimizer would differ)
    losses = {**a[0]["losses"], **b[0]["losses"], **c[0]["losses"]}
    for step in range(1, 7):
        assert losses[step] == pytest.approx(ref[0]["losses"][step], rel=1e-5, abs=1e-6), step
