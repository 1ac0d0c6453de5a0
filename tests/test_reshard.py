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


# ------------------------------------------------------------------ the real trainer: TP 2 -> 1, PP 2 -> 1, export

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpt_data(tiny_gpt_dataset):
    """conftest's tiny GPT dataset (vocab 512, seq_len 64, 5% val, paragraphs); training only reads it."""
    return tiny_gpt_dataset


def _train(data: Path, run_dir: Path, steps: int, *, nproc: int = 1, final: bool = False, **extra):
    from llmscale.testing import run_cli

    o = {"run_dir": run_dir, "data.path": data, "data.seq_len": 64, "model.preset": "gpt-tiny", "model.bias": "true",
         "model.max_seq_len": 64, "model.dropout": 0.0, "optim.warmup_steps": 2, "optim.schedule": "constant",
         "parallel.zero_stage": 1, "parallel.micro_batch_size": 4, "parallel.global_batch_size": 8,
         "train.steps": steps, "train.log_every": 1, "train.eval_every": 0, "train.eval_batches": 1,
         "train.tensorboard": "false", "checkpoint.every_steps": 2, **extra}
    args = ["train", str(ROOT / "configs" / "quickstart.yaml"), *[f"{k}={v}" for k, v in o.items()]]
    return run_cli(args + ([] if final else ["--no-final-weights"]), nproc=nproc, timeout=600)


def _losses(run_dir: Path) -> dict[int, float]:
    import json

    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in recs if r.get("kind") == "train"}


@pytest.fixture(scope="module")
def reference(gpt_data, tmp_path_factory) -> dict[int, float]:
    run = tmp_path_factory.mktemp("reshard-ref") / "run"
    _train(gpt_data, run, 6)
    return _losses(run)


@pytest.mark.slow
@pytest.mark.parametrize("degree", ["tensor_parallel", "pipeline_parallel"])
def test_trainer_resumes_tp_or_pp_2_on_1_and_exports_consolidated(gpt_data, reference, tmp_path, degree):
    import torch

    from llmscale.artifacts import load_model
    from llmscale.testing import run_cli

    run = tmp_path / "run"
    _train(gpt_data, run, 4, nproc=2, final=True, **{f"parallel.{degree}": 2})
    ck4 = run / "checkpoints" / "step-000004"
    assert read_manifest(ck4)["layout"][{"tensor_parallel": "tp", "pipeline_parallel": "pp"}[degree]] == 2
    # export consolidates the 2-way checkpoint into one model folder equal to the engine's own consolidation
    run_cli(["export", str(ck4), str(tmp_path / "hf")])
    model = load_model(tmp_path / "hf").model
    want = torch.load(run / "final" / "model.pt", weights_only=True)
    got = model.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=0, atol=0, msg=k)
    # the same command on 1 process (tp=pp=1) continues from step 4 through the universal format
    _train(gpt_data, run, 6, nproc=1)
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert losses[step] == pytest.approx(reference[step], rel=2e-4), (step, losses[step], reference[step])
    assert read_manifest(run / "checkpoints" / "step-000006")["layout"]["tp"] == 1


# ------------------------------------------------------------------ every direction, chained through the real trainer
#
# Each chain trains 2 steps per leg on a new layout, resuming from the previous leg's checkpoint. The loss of every
# step must follow the uninterrupted 1-process run (the data order and the Adam state came through), and the
# checkpoints of every layout must export to the same weights at the same step.

Z = "parallel.zero_stage"
TP, PP, MB = "parallel.tensor_parallel", "parallel.pipeline_parallel", "parallel.micro_batch_size"
CHAINS = {
    # ZeRO-1: TP 1->2, TP2 -> PP2, PP2 -> TP2xPP2, TP2xPP2 -> DP4
    "zero1": [(1, {Z: 1}), (2, {Z: 1, TP: 2}), (2, {Z: 1, PP: 2}), (4, {Z: 1, TP: 2, PP: 2}), (4, {Z: 1, MB: 2})],
    # ZeRO-0 (llmscale's own conversion and load): PP 1->2, PP2 -> 1, TP 1->2, ZeRO-0 TP2 -> ZeRO-1 DP2
    "zero0": [(1, {Z: 0}), (2, {Z: 0, PP: 2}), (1, {Z: 0}), (2, {Z: 0, TP: 2}), (2, {Z: 1})],
    # ZeRO-2 DP 1->2, ZeRO-2 DP2 -> ZeRO-3 DP1, ZeRO-3 DP 1->2, ZeRO-3 DP2 -> ZeRO-0 DP1
    "zero23": [(1, {Z: 2}), (2, {Z: 2}), (1, {Z: 3}), (2, {Z: 3}), (1, {Z: 0})],
}
RESHARD_TOLERANCE = 2e-4  # relative, per step: float sums in another order on another layout


@pytest.fixture(scope="module")
def long_reference(gpt_data, tmp_path_factory) -> dict[int, float]:
    run = tmp_path_factory.mktemp("reshard-ref10") / "run"
    _train(gpt_data, run, 10)
    return _losses(run)


@pytest.fixture(scope="module")
def chains(gpt_data, long_reference, tmp_path_factory) -> dict[str, Path]:
    """Every chain of CHAINS run to step 10 (2 steps a leg); returns its run directory."""
    out = {}
    for name, legs in CHAINS.items():
        run = tmp_path_factory.mktemp(f"chain-{name}") / "run"
        for i, (nproc, over) in enumerate(legs):
            _train(gpt_data, run, 2 * (i + 1), nproc=nproc, **{"checkpoint.keep_last": 10, **over})
        out[name] = run
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHAINS))
def test_reshard_chain_follows_the_uninterrupted_run(chains, long_reference, name):
    run = chains[name]
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 11))  # every step once: each leg resumed where the last one saved
    for step in range(1, 11):
        assert losses[step] == pytest.approx(long_reference[step], rel=RESHARD_TOLERANCE), (
            name, step, losses[step], long_reference[step])
    for i, (_nproc, over) in enumerate(CHAINS[name]):
        lay = read_manifest(run / "checkpoints" / f"step-{2 * (i + 1):06d}")["layout"]
        assert (lay["zero_stage"], lay["tp"], lay["pp"]) == (over[Z], over.get(TP, 1), over.get(PP, 1))


@pytest.mark.slow
@pytest.mark.parametrize("step", [4, 6, 8])
def test_every_layout_exports_the_same_weights(chains, tmp_path, step):
    """At one step the three chains sit on three different layouts (ZeRO-3 and ZeRO-0 tensor/pipeline parallel
    among them): `llmscale export` of each gives the same model."""
    import torch

    from llmscale.artifacts import load_model
    from llmscale.testing import run_cli

    got = {}
    for name, run in chains.items():
        run_cli(["export", str(run / "checkpoints" / f"step-{step:06d}"), str(tmp_path / name)])
        got[name] = load_model(tmp_path / name).model.state_dict()
    first, *rest = sorted(got)
    for other in rest:
        assert set(got[other]) == set(got[first])
        for k in got[first]:
            torch.testing.assert_close(got[other][k].float(), got[first][k].float(), rtol=1e-4, atol=1e-5,
                                       msg=f"{other} vs {first} at step {step}: {k}")
