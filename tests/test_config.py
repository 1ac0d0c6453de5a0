import pytest

from llmscale.config import ConfigError, RunConfig, describe, from_dict, load_config, parse_overrides, save_resolved


def test_overrides_types_and_nesting(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: {path: d, seq_len: 64}\nmodel: {max_seq_len: 128}\n")
    cfg = load_config(RunConfig, p, ["optim.lr=3e-4", "data.seq_len=32", "train.tensorboard=false"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.seq_len == 32 and cfg.data.path == "d"
    assert cfg.train.tensorboard is False


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["optim.lrr=1"], "Did you mean 'lr'"),
        (["data.seq_len=abc"], "data.seq_len must be an integer"),
        (["data.format=t5"], "Choose one of: gpt, bert"),
        (["train.steps=0"], "train.steps must be >= 1"),
        (["data.seq_len=4096"], "exceeds model.max_seq_len"),
        (["model.d_model=100", "model.n_heads=3"], "not divisible"),
        (["optim.min_lr=1", "optim.lr=0.1"], "optim.min_lr"),
        (["parallel.zero_stage=4"], "0, 1, 2 or 3"),
        (["nonsense"], "key=value"),
        (["model.preset=gpt9"], "unknown"),
        (["data.format=bert", "model.family=bert", "data.nsp=true"], "data.nsp=true needs model.nsp_head=true"),
        (["checkpoint.export_every=5"], "Unknown config key 'checkpoint.export_every'"),
    ],
)
def test_bad_configs_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(RunConfig, None, overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(RunConfig, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(RunConfig, lst)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(RunConfig, None, ["data.blend=[{path: a, weight: 2}, {path: b}]", "data.seed=7"])
    out = save_resolved(cfg, tmp_path / "config.yaml")
    again = load_config(RunConfig, out)
    assert again == cfg
    assert again.data.sources()[0].weight == 2.0


def test_every_field_is_documented():
    rows = describe(RunConfig)
    assert len(rows) > 50
    undocumented = [key for key, _, _, text in rows if not text]
    assert undocumented == []


def test_parse_overrides_conflict():
    with pytest.raises(ConfigError, match="conflicts"):
        parse_overrides(["a=1", "a.b=2"])
    assert from_dict(RunConfig, {}).train.steps == 1000
