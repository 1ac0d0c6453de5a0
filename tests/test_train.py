"""`llmscale train` for real: the CLI under torchrun (2 gloo ranks on the CPU) on tiny prepared datasets.

Checks the outputs a user relies on (metrics.jsonl with every field, TensorBoard events, config.yaml,
final weights, a falling loss), the tokenizer/vocab refusals before any training, BERT with NSP, the plot,
the quickstart, and that every shipped config validates.
"""
import json
import math
from pathlib import Path

import pytest
import yaml

from llmscale.config import RunConfig, load_config
from llmscale.testing import metrics_records, run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith(("finetune_", "eval_")))
FINETUNE_CONFIGS = sorted((ROOT / "configs").glob("finetune_*.yaml"))

TRAIN_FIELDS = {
    "kind", "step", "time", "loss", "lr", "grad_norm", "tokens_seen", "samples_seen", "tokens_per_s", "step_time_s",
    "data_time_s", "forward_time_s", "backward_time_s", "optimizer_time_s", "comm_time_s", "mfu",
    "tflops_per_device", "rss_gb",
}
VAL_FIELDS = {"kind", "step", "val_loss", "val_ppl", "val_bpb", "val_tokens"}


_records = metrics_records


@pytest.fixture(scope="module")
def gpt_data(tiny_gpt_dataset):
    """conftest's tiny GPT dataset (vocab 512, seq_len 64, 5% val, paragraphs); training only reads it."""
    return tiny_gpt_dataset


@pytest.fixture(scope="module")
def other_tok_data(tmp_path_factory, corpus_path):
    """A GPT dataset with a different tokenizer (another vocabulary size) on the first 200 kB of the corpus."""
    from llmscale.data.prepare import prepare_dataset

    d = tmp_path_factory.mktemp("otherdata")
    src = d / "part.txt"
    src.write_text(corpus_path.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    prepare_dataset([src], d / "ds", vocab_size=400, format="gpt", seq_len=64, val_fraction=0.05,
                    doc_split="paragraph", num_proc=1)
    return d / "ds"


def _gpt_overrides(data: Path, run_dir: Path, **extra) -> list[str]:
    o = {
        "run_dir": run_dir, "data.path": data, "data.seq_len": 64, "model.preset": "gpt-tiny", "model.max_seq_len": 64,
        "optim.lr": 3e-3, "optim.min_lr": 3e-4, "optim.warmup_steps": 10, "parallel.zero_stage": 1,
        "parallel.micro_batch_size": 8, "parallel.global_batch_size": 16, "train.steps": 40, "train.log_every": 5,
        "train.eval_every": 20, "train.eval_batches": 4,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


@pytest.mark.slow
def test_train_gpt_two_processes(gpt_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(["train", str(ROOT / "configs" / "quickstart.yaml"), *_gpt_overrides(gpt_data, run_dir)], nproc=2,
                   timeout=600)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 40 and summary["tokens_seen"] == 40 * 16 * 64 and summary["samples_seen"] == 640
    # DeepSpeed's known noise on every CPU launch is silenced (ZeRO-1 with llmscale's AdamW printed both before)
    out = proc.stdout + proc.stderr
    assert "untested optimizer" not in out and "all_gather_into_tensor` is deprecated" not in out

    recs = _records(run_dir)
    train = [r for r in recs if r["kind"] == "train"]
    val = [r for r in recs if r["kind"] == "val"]
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    assert [r["step"] for r in val] == [20, 40]
    for r in train:
        assert TRAIN_FIELDS <= set(r), TRAIN_FIELDS - set(r)
        assert r["mfu"] is None  # CPU: no bf16 peak to compare against
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0 and r["forward_time_s"] > 0 and r["backward_time_s"] > 0
        assert r["grad_norm"] > 0 and r["tflops_per_device"] > 0 and r["rss_gb"] > 0.05
    # the logged lr is that of the step just taken (0-based index step - 1): warm-up, then cosine to min_lr
    from llmscale.optim import lr_at

    ocfg = load_config(RunConfig, run_dir / "config.yaml").optim
    assert [r["lr"] for r in train] == pytest.approx([lr_at(r["step"] - 1, ocfg, 40) for r in train])
    assert train[0]["lr"] == pytest.approx(3e-3 / 2) and train[1]["lr"] == pytest.approx(3e-3)
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, [r["loss"] for r in train]
    assert val[-1]["val_loss"] < val[0]["val_loss"]

    # validation: a val split this small is evaluated whole; bits per byte follow from the manifest's counts
    manifest = json.loads((gpt_data / "manifest.json").read_text())
    vs = manifest["splits"]["val"]
    for v in val:
        assert VAL_FIELDS <= set(v)
        assert v["val_full"] is True and v["val_tokens"] == vs["num_tokens"] - 1
        assert v["val_ppl"] == pytest.approx(math.exp(v["val_loss"]), rel=1e-6)
        bytes_per_token = vs["num_bytes"] / vs["num_tokens"]
        assert v["val_bpb"] == pytest.approx(v["val_loss"] / math.log(2) / bytes_per_token, rel=1e-6)

    # resolved config: vocab filled in from the dataset, overrides applied; it loads back as a RunConfig
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["model"]["vocab_size"] == manifest["tokenizer"]["vocab_size"]
    assert resolved["train"]["steps"] == 40 and resolved["parallel"]["zero_stage"] == 1
    load_config(RunConfig, run_dir / "config.yaml")
    assert (json.loads((run_dir / "tokenizer" / "tokenizer_meta.json").read_text())["hash"]
            == manifest["tokenizer"]["hash"])
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "final" / "model.pt").is_file()

    # TensorBoard holds the same scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/bpb"} <= tags
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(5, 41, 5))

    # the final weights reproduce the last validation loss outside DeepSpeed
    import torch

    from llmscale.artifacts import load_model
    from llmscale.data.loader import build_loader

    lm = load_model(run_dir)
    model, cfg = lm.model, lm.run_config
    loader = build_loader(cfg.data, dp_rank=0, dp_size=1, global_batch_size=16, micro_batch_size=16)
    total, n = 0.0, 0
    with torch.no_grad():
        for b in loader.eval_batches():
            out = model(b["input_ids"], labels=b["labels"])
            k = int((b["labels"] != -100).sum())
            total += float(out.loss) * k
            n += k
    assert total / n == pytest.approx(val[-1]["val_loss"], rel=1e-4)

    # llmscale plot draws the curves
    out = run_cli(["plot", str(run_dir)])
    png = Path(out.stdout.strip().splitlines()[-1])
    assert png == run_dir / "loss.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_vocab_and_tokenizer_mismatch_refused(gpt_data, other_tok_data, tmp_path):
    from llmscale.data.checks import check_datasets
    from llmscale.data.tokenizer import TokenizerError

    vocab = json.loads((gpt_data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    # model.vocab_size that disagrees with the dataset's tokenizer: refused, naming both and the fix
    run_dir = tmp_path / "run_vocab"
    proc = run_cli(["train", str(ROOT / "configs" / "quickstart.yaml"),
                    *_gpt_overrides(gpt_data, run_dir, **{"model.vocab_size": vocab + 100})], check=False, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"model.vocab_size={vocab + 100}" in proc.stderr and f"vocab {vocab}" in proc.stderr
    assert "llmscale prepare --tokenizer" in proc.stderr and "Traceback" not in proc.stderr
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.yaml").exists()

    # a blend of datasets made with different tokenizers
    cfg = load_config(RunConfig, None, [f"data.blend=[{{path: {gpt_data}}}, {{path: {other_tok_data}}}]",
                                        f"run_dir={tmp_path / 'run_blend'}"])
    with pytest.raises(TokenizerError, match="mixes tokenizers"):
        check_datasets(cfg)

    # a run directory trained with one tokenizer refuses data made with another
    import shutil

    run_dir = tmp_path / "run_resume"
    run_dir.mkdir()
    shutil.copytree(gpt_data / "tokenizer", run_dir / "tokenizer")
    cfg = load_config(RunConfig, None, [f"data.path={other_tok_data}", f"run_dir={run_dir}"])
    with pytest.raises(TokenizerError) as e:
        check_datasets(cfg)
    h_run = json.loads((gpt_data / "manifest.json").read_text())["tokenizer"]["hash"][:12]
    h_data = json.loads((other_tok_data / "manifest.json").read_text())["tokenizer"]["hash"][:12]
    assert h_run in str(e.value) and h_data in str(e.value) and f"--tokenizer {run_dir / 'tokenizer'}" in str(e.value)

    # the matching case passes and fills model.vocab_size from the dataset
    cfg = load_config(RunConfig, None, [f"data.path={gpt_data}", f"run_dir={tmp_path / 'fresh'}"])
    check_datasets(cfg)
    assert cfg.model.vocab_size == vocab


@pytest.mark.slow
def test_bert_trains_with_nsp(tmp_path, corpus_path):
    from llmscale.data.prepare import prepare_dataset

    data = tmp_path / "bert"
    prepare_dataset([corpus_path], data, vocab_size=512, format="bert", seq_len=64, val_fraction=0.02,
                    doc_split="paragraph", num_proc=1)
    run_dir = tmp_path / "run"
    run_cli(["train", str(ROOT / "configs" / "bert_tiny.yaml"), f"run_dir={run_dir}", f"data.path={data}",
             "data.seq_len=64", "model.max_seq_len=64", "train.steps=30", "train.log_every=5", "train.eval_every=30",
             "train.eval_batches=4", "optim.warmup_steps=5", "optim.lr=2e-3", "parallel.micro_batch_size=16",
             "parallel.global_batch_size=32"], nproc=2, timeout=600)
    recs = _records(run_dir)
    train = [r for r in recs if r["kind"] == "train"]
    val = [r for r in recs if r["kind"] == "val"]
    assert len(train) == 6 and len(val) == 1
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, [r["loss"] for r in train]
    assert VAL_FIELDS <= set(val[0]) and math.isfinite(val[0]["val_loss"])
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["data"]["nsp"] is True and resolved["model"]["nsp_head"] is True

    # the trained model has an NSP head that was used: its logits depend on the input
    import torch

    from llmscale.artifacts import load_model
    from llmscale.data.loader import build_loader

    lm = load_model(run_dir)
    model, tok, cfg = lm.model, lm.tokenizer, lm.run_config
    loader = build_loader(cfg.data, dp_rank=0, dp_size=1, global_batch_size=16, micro_batch_size=16,
                          mask_id=tok.mask_id, cls_id=tok.cls_id, sep_id=tok.sep_id, pad_id=tok.pad_id)
    b = next(iter(loader.eval_batches(1)))
    with torch.no_grad():
        out = model(b["input_ids"], labels=b["labels"], attention_mask=b["attention_mask"],
                    token_type_ids=b["token_type_ids"], next_sentence_label=b["next_sentence_label"])
    assert out.nsp_logits is not None and out.nsp_logits.shape == (16, 2) and out.nsp_loss is not None
    assert math.isfinite(float(out.nsp_loss))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_validates(path, capsys):
    from llmscale.cli import main as cli_main

    assert cli_main(["config", "show", str(path)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["model"]["family"] in ("gpt", "bert", "lstm")  # the LSTM language model trains like a GPT
    assert shown["data"]["format"] == ("bert" if shown["model"]["family"] == "bert" else "gpt")


@pytest.mark.parametrize("path", FINETUNE_CONFIGS, ids=[p.name for p in FINETUNE_CONFIGS])
def test_every_finetune_config_validates(path, capsys):
    from llmscale.cli import main as cli_main

    assert cli_main(["config", "show", str(path)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["task"] in ("classify", "sft", "lm") and shown["init"]["from"]
    assert shown[shown["task"]]["train"] if shown["task"] != "lm" else shown["data"]["path"]


def test_quickstart_config_is_shipped_in_the_package():
    from llmscale import configs_builtin

    shipped = configs_builtin.path("quickstart.yaml")
    assert (ROOT / "configs" / "quickstart.yaml").read_text() == shipped.read_text()


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    proc = run_cli(["quickstart", "--run-dir", str(tmp_path / "qs"), "--steps", "20", "--sample-tokens", "40"],
                   timeout=600)
    out = proc.stdout
    assert "[3/3] validation after 20 steps: loss" in out and "----- sample -----" in out
    sample = (tmp_path / "qs" / "sample.txt").read_text()
    assert sample.startswith("ROMEO:\n") and len(sample) > len("ROMEO:\n")
    assert (tmp_path / "qs" / "run" / "final" / "model.pt").is_file()


def test_known_noise_filter_drops_only_what_it_names():
    import logging

    from llmscale.engine import quiet_known_noise

    quiet_known_noise()
    quiet_known_noise()  # idempotent: one filter per logger
    for name in ("DeepSpeed", "torch.utils.cpp_extension"):
        assert len(logging.getLogger(name).filters) == 1

    def passes(name: str, msg: str) -> bool:
        rec = logging.LogRecord(name, logging.WARNING, __file__, 1, msg, None, None)
        return all(f.filter(rec) for f in logging.getLogger(name).filters)

    assert not passes("DeepSpeed", "**** You are using ZeRO with an untested optimizer, proceed with caution *****")
    assert not passes("torch.utils.cpp_extension", "No CUDA runtime is found, using CUDA_HOME='%s'")
    assert passes("DeepSpeed", "**** Some other DeepSpeed warning *****")  # anything else still shows
    assert passes("torch.utils.cpp_extension", "Error building extension")


@pytest.mark.slow
def test_real_trainer_skips_poisoned_batches_then_rolls_back(gpt_data, tmp_path):
    """The real `llmscale train` on 2 ranks: batches at loader positions 11 and 12 give a NaN loss (test hook):
    both updates are skipped on every rank, the second bad step in a row (train.max_bad_steps=2) rolls the run back
    to the step-10 checkpoint, the loader keeps its place so those batches are not met again, and the run
    finishes its 20 steps with finite losses."""
    run_dir = tmp_path / "run"
    overrides = _gpt_overrides(gpt_data, run_dir, **{
        "train.steps": 20, "train.log_every": 1, "train.eval_every": 0, "train.max_bad_steps": 2,
        "checkpoint.every_steps": 10, "checkpoint.keep_last": 2})
    proc = run_cli(["train", str(ROOT / "configs" / "quickstart.yaml"), *overrides], nproc=2, timeout=600,
                   env={"LLMSCALE_TEST_NAN_BATCHES": "11,12"})
    out = proc.stdout + proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 20 and summary["samples_seen"] == 20 * 16  # counters restored by the rollback
    assert out.count("poisoned (NaN loss)") == 2  # positions 11 and 12 (rank 0 logs)
    assert "rolled back to step-000010" in out
    train = [r for r in _records(run_dir) if r["kind"] == "train"]
    steps = [r["step"] for r in train]
    # steps 1..13 (12 and 13 skipped), then 11..20 again after the rollback to step 10
    assert steps == list(range(1, 14)) + list(range(11, 21)), steps
    skipped = {r["step"]: r["skipped_steps"] for r in train[:13]}
    assert skipped[12] == 1 and skipped[13] == 1 and sum(skipped.values()) == 2
    assert all(math.isfinite(r["loss"]) for r in train[13:]) and train[-1]["skipped_steps"] == 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000020"


def test_deepspeed_ops_build_with_the_environments_own_ninja(monkeypatch):
    """Two ninjas (the venv's and the system's) made every other launch rebuild DeepSpeed's shm op; the engine
    puts the interpreter's own ninja first on PATH before DeepSpeed builds anything."""
    import os
    import shutil
    import sys

    from llmscale.engine import use_one_ninja

    own = os.path.join(os.path.dirname(sys.executable), "ninja")
    if not os.path.isfile(own):
        pytest.skip("this interpreter's environment has no ninja of its own (nothing to prefer)")
    others = [d for d in os.environ["PATH"].split(os.pathsep) if d and os.path.realpath(d) !=
              os.path.realpath(os.path.dirname(sys.executable))]
    monkeypatch.setenv("PATH", os.pathsep.join(others))  # as a shell without the venv activated
    use_one_ninja()
    assert os.path.realpath(shutil.which("ninja")) == os.path.realpath(own)
    before = os.environ["PATH"]
    use_one_ninja()  # already first: PATH is left alone
    assert os.environ["PATH"] == before
