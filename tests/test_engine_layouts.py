"""Layout and batch validation (pure, no processes): every layout DeepSpeed cannot run is refused with
its reason and a layout that would work; the batch triad is solved from any two of its members; the
generated DeepSpeed config carries every setting."""
from __future__ import annotations

import pytest

from llmscale.config import ConfigError, RunConfig, from_dict
from llmscale.engine import build_deepspeed_config, resolve_precision
from llmscale.parallel import BatchPlan, Layout, LayoutError, check_layout, solve_batch


def cfg(parallel=None, model=None, deepspeed=None, train=None, seq_len=32) -> RunConfig:
    raw = {
        "data": {"seq_len": seq_len},
        "model": {"n_layers": 4, "d_model": 64, "n_heads": 4, "vocab_size": 100, "max_seq_len": 64, **(model or {})},
        "parallel": parallel or {},
        "deepspeed": deepspeed or {},
        "train": train or {},
    }
    return from_dict(RunConfig, raw)


# --------------------------------------------------------------------------- batch triad


@pytest.mark.parametrize(
    "given, world, expect",
    [
        ({"micro_batch_size": 4, "grad_accum_steps": 2}, 4, (4, 2, 32, 4)),
        ({"micro_batch_size": 4, "global_batch_size": 32}, 4, (4, 2, 32, 4)),
        ({"grad_accum_steps": 2, "global_batch_size": 32}, 4, (4, 2, 32, 4)),
        ({"micro_batch_size": 4, "grad_accum_steps": 2, "global_batch_size": 32}, 4, (4, 2, 32, 4)),
        ({"micro_batch_size": 2, "global_batch_tokens": 32 * 16}, 2, (2, 4, 16, 2)),
        ({"global_batch_size": 16}, 2, (8, 1, 16, 2)),  # one given: accumulation defaults to 1
        ({"micro_batch_size": 3}, 2, (3, 1, 6, 2)),
        ({}, 1, (8, 1, 8, 1)),  # none given: micro-batch 8
        # tp x pp shrink the data-parallel size: dp = 8 / (2*2) = 2
        ({"micro_batch_size": 2, "global_batch_size": 16, "tensor_parallel": 2, "pipeline_parallel": 2}, 8,
         (2, 4, 16, 2)),
    ],
)
def test_solve_batch_triad(given, world, expect):
    plan = solve_batch(cfg(given).parallel, world_size=world, seq_len=32)
    assert (plan.micro_batch_size, plan.grad_accum_steps, plan.global_batch_size, plan.dp_size) == expect
    assert plan.global_batch_size == plan.micro_batch_size * plan.grad_accum_steps * plan.dp_size


def test_triad_inconsistent_three_values():
    with pytest.raises(LayoutError, match=r"global_batch_size=30 but micro_batch_size\*grad_accum_steps\*data_parallel"
                                          r" = 4\*2\*4 = 32"):
        solve_batch(cfg({"micro_batch_size": 4, "grad_accum_steps": 2, "global_batch_size": 30}).parallel, world_size=4,
                    seq_len=32)


def test_global_batch_not_divisible_by_micro_times_dp():
    with pytest.raises(LayoutError, match=r"global_batch_size=10 is not divisible by micro_batch_size\*data_parallel"
                                          r" = 2\*4 = 8.*Use parallel\.global_batch_size=8"):
        solve_batch(cfg({"micro_batch_size": 2, "global_batch_size": 10}).parallel, world_size=4, seq_len=32)


def test_global_batch_not_divisible_suggests_micro_batch():
    # 24 / dp 4 = 6 per rank; micro-batch 4 does not divide 6 but 3 does
    with pytest.raises(LayoutError, match=r"Use parallel\.micro_batch_size=3"):
        solve_batch(cfg({"micro_batch_size": 4, "global_batch_size": 24}).parallel, world_size=4, seq_len=32)


def test_global_batch_not_divisible_by_accumulation_times_dp():
    with pytest.raises(LayoutError,
                       match=r"not divisible by grad_accum_steps\*data_parallel = 3\*2 = 6.*grad_accum_steps=2"):
        solve_batch(cfg({"grad_accum_steps": 3, "global_batch_size": 8}).parallel, world_size=2, seq_len=32)


def test_global_batch_tokens_not_multiple_of_seq_len():
    with pytest.raises(LayoutError, match=r"global_batch_tokens=1000 is not a multiple of data\.seq_len=32; "
                                          r"use parallel\.global_batch_tokens=992 or 1024"):
        solve_batch(cfg({"global_batch_tokens": 1000, "micro_batch_size": 1}).parallel, world_size=1, seq_len=32)


def test_world_not_divisible_by_tp_times_pp():
    with pytest.raises(LayoutError,
                       match=r"world size 6 is not divisible by tensor_parallel\*pipeline_parallel = 2\*2 = 4"
                             r".*Use e\.g\. parallel\.tensor_parallel=2 parallel\.pipeline_parallel=1"):
        solve_batch(cfg({"tensor_parallel": 2, "pipeline_parallel": 2}).parallel, world_size=6, seq_len=32)


def test_size_and_tokens_together_is_a_config_error():
    with pytest.raises(ConfigError, match="global_batch_size or parallel.global_batch_tokens, not both"):
        cfg({"global_batch_size": 8, "global_batch_tokens": 256})


# --------------------------------------------------------------------------- layouts


def test_pipeline_with_zero2_refused_with_alternative():
    for stage in (2, 3):
        with pytest.raises(LayoutError, match=rf"zero_stage={stage} cannot be combined with pipeline_parallel=2"
                                              r".*Use parallel\.zero_stage=1"):
            check_layout(cfg({"pipeline_parallel": 2, "zero_stage": stage, "micro_batch_size": 1}), 2)


def test_heads_not_divisible_by_tp():
    c = cfg({"tensor_parallel": 4, "micro_batch_size": 1}, model={"n_heads": 6, "d_model": 48})
    with pytest.raises(LayoutError,
                       match=r"tensor_parallel=4 does not divide model\.n_heads=6.*Use parallel\.tensor_parallel=2"):
        check_layout(c, 4)


def test_kv_heads_not_divisible_by_tp():
    c = cfg({"tensor_parallel": 4, "micro_batch_size": 1}, model={"n_heads": 8, "n_kv_heads": 2})
    with pytest.raises(LayoutError, match=r"does not divide model\.n_kv_heads=2.*Use parallel\.tensor_parallel=2"):
        check_layout(c, 4)


def test_d_ff_not_divisible_by_tp():
    c = cfg({"tensor_parallel": 2, "micro_batch_size": 1}, model={"d_ff": 171})
    with pytest.raises(LayoutError,
                       match=r"model\.d_ff=171.*Use parallel\.tensor_parallel=1 \(no tensor parallelism\)"):
        check_layout(c, 2)


def test_tp_with_zero3_refused():
    with pytest.raises(LayoutError, match=r"zero_stage=3 with tensor_parallel>1.*zero_stage=2 or 1"):
        check_layout(cfg({"tensor_parallel": 2, "zero_stage": 3, "micro_batch_size": 1}), 2)


def test_more_stages_than_layers():
    with pytest.raises(LayoutError, match=r"pipeline_parallel=8 exceeds model\.n_layers=4.*pipeline_parallel<=4"):
        check_layout(cfg({"pipeline_parallel": 8, "micro_batch_size": 1}), 8)


def test_lstm_cannot_be_split():
    c = cfg({"tensor_parallel": 2, "micro_batch_size": 1}, model={"family": "lstm"})
    with pytest.raises(LayoutError, match="model.family=lstm has no tensor- or pipeline-parallel split"):
        check_layout(c, 2)


def test_check_layout_runs_batch_check_too():
    with pytest.raises(LayoutError, match="global_batch_size=10"):
        check_layout(cfg({"micro_batch_size": 2, "global_batch_size": 10}), 4)


def test_layout_coordinates_follow_deepspeed_topology():
    lay = check_layout(cfg({"tensor_parallel": 2, "pipeline_parallel": 2, "zero_stage": 1, "micro_batch_size": 1}), 8)
    assert (lay.dp, lay.tp, lay.pp) == (2, 2, 2)
    # PipeModelDataParallelTopology: axes pipe, data, model (model fastest)
    coords = [(r.pp_rank, r.dp_rank, r.tp_rank) for r in map(lay.for_rank, range(8))]
    assert coords == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert all(lay.rank_of(dp_rank=d, tp_rank=t, pp_rank=p) == r for r, (p, d, t) in enumerate(coords))


def test_layout_error_is_a_user_error():
    from llmscale.errors import UserError

    assert issubclass(LayoutError, UserError)  # cli.py prints UserErrors without a traceback
    assert issubclass(LayoutError, ValueError)


# --------------------------------------------------------------------------- DeepSpeed config


def test_deepspeed_config_generated_from_ours():
    c = cfg({"zero_stage": 2, "offload_optimizer": True, "micro_batch_size": 2, "grad_accum_steps": 3},
            deepspeed={"overlap_comm": True, "reduce_bucket_size": 1000, "communication_data_type": "fp32",
                       "wall_clock_breakdown": True, "steps_per_print": 7})
    plan = solve_batch(c.parallel, world_size=2, seq_len=32)
    ds = build_deepspeed_config(c, plan)
    assert ds["train_batch_size"] == 12 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["overlap_comm"] is True and ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["communication_data_type"] == "fp32" and ds["wall_clock_breakdown"] is True and ds["steps_per_print"] == 7
    assert ds["gradient_clipping"] == c.optim.grad_clip
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False  # auto on CPU -> fp32
    # every typed extra key that was set is present somewhere in the generated config
    flat = {**ds, **ds["zero_optimization"]}
    for key, value in vars(c.deepspeed).items():
        if value is not None:
            assert flat[key] == value, key


def test_deepspeed_config_precision_and_zero0_clipping():
    c = cfg({"micro_batch_size": 1}, train={"precision": "bf16"})
    ds = build_deepspeed_config(c, solve_batch(c.parallel, world_size=1, seq_len=32))
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == c.optim.grad_clip
    c = cfg({"micro_batch_size": 1}, train={"precision": "fp32"})
    ds = build_deepspeed_config(c, solve_batch(c.parallel, world_size=1, seq_len=32))
    assert ds["gradient_clipping"] == 0.0  # ZeRO-0 fp32: llmscale's optimizer clips (see build_deepspeed_config)
    assert resolve_precision("auto") in ("fp32", "bf16")


def test_stage3_only_keys_refused_on_other_stages():
    c = cfg({"zero_stage": 1, "micro_batch_size": 1}, deepspeed={"stage3_prefetch_bucket_size": 10})
    with pytest.raises(LayoutError, match=r"deepspeed\.stage3_prefetch_bucket_size is set but parallel\.zero_stage=1"):
        build_deepspeed_config(c, solve_batch(c.parallel, world_size=1, seq_len=32))


def test_pipeline_partition_in_config():
    c = cfg({"pipeline_parallel": 2, "pipeline_partition": "uniform", "micro_batch_size": 1})
    ds = build_deepspeed_config(c, solve_batch(c.parallel, world_size=2, seq_len=32))
    assert ds["pipeline"]["partition_method"] == "uniform"
    assert isinstance(check_layout(c, 2), Layout)
    assert isinstance(solve_batch(c.parallel, world_size=2, seq_len=32), BatchPlan)


def test_wall_clock_breakdown_with_pipeline_refused():
    c = cfg({"pipeline_parallel": 2, "micro_batch_size": 1}, deepspeed={"wall_clock_breakdown": True})
    with pytest.raises(LayoutError, match=r"wall_clock_breakdown=true fails with pipeline_parallel>1"
                                          r".*Set deepspeed\.wall_clock_breakdown=false"):
        build_deepspeed_config(c, solve_batch(c.parallel, world_size=2, seq_len=32))
