"""`llmscale finetune` end to end with real ranks: pretrain on 2 ranks with TP=2 (BERT) or PP=2 (GPT), fine-tune a
classifier from that checkpoint (consolidated on load) on 2 data-parallel ranks, export it, and check that
transformers' text-classification pipeline predicts what llmscale predicts. Also: a BiLSTM + attention
classifier from scratch learns a keyword task; a fine-tune killed mid-run resumes bitwise; the best checkpoint
survives retention; bad input is refused with the fix."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmscale.testing import cpu_env, run_cli

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the night was long and the king spoke of his son while the rain fell on the old castle walls "
         "near the sea where ships come and go").split()


def _keyword_task(path: Path, n: int, seed: int) -> Path:
    """Sentences of random words; the label is whether 'good' or 'bad' is in it (a task any classifier can learn)."""
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        label = rng.choice(("pos", "neg"))
        words.insert(rng.randrange(len(words) + 1), "good" if label == "pos" else "bad")
        lines.append(f"{' '.join(words)}\t{label}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("keyword-task")
    return {"train": _keyword_task(d / "train.tsv", 256, 1), "val": _keyword_task(d / "val.tsv", 61, 2)}


def _pretrain(config: str, data: Path, run_dir: Path, **extra) -> Path:
    o = {"run_dir": run_dir, "data.path": data, "data.seq_len": 64, "model.max_seq_len": 64, "train.steps": 4,
         "train.log_every": 2, "train.eval_every": 0, "train.eval_batches": 1, "train.tensorboard": "false",
         "checkpoint.every_steps": 4, "parallel.zero_stage": 1, "parallel.micro_batch_size": 4,
         "parallel.global_batch_size": 8, **extra}
    run_cli(["train", str(ROOT / "configs" / config), *[f"{k}={v}" for k, v in o.items()], "--no-final-weights"],
            nproc=2, timeout=600)
    return run_dir / "checkpoints" / "step-000004"


def _ft_args(run_dir: Path, init: str, task: dict, **extra) -> list[str]:
    o = {"run_dir": run_dir, "init.from": init, "classify.train": f"[{task['train']}]",
         "classify.val": f"[{task['val']}]", "classify.max_len": 32, "classify.pooling": "auto", "optim.lr": 3e-3,
         "optim.warmup_steps": 2,
         "parallel.micro_batch_size": 8, "parallel.global_batch_size": 16, "train.steps": 8, "train.eval_every": 4,
         "train.log_every": 2, "train.tensorboard": "false", "checkpoint.every_steps": 2, **extra}
    return ["finetune", str(ROOT / "configs" / "finetune_sst2_bert.yaml"), *[f"{k}={v}" for k, v in o.items()]]


def _texts(path: Path) -> list[str]:
    return [line.split("\t")[0] for line in path.read_text(encoding="utf-8").splitlines()[1:]]


def _pipeline_agrees(folder: Path, texts: list[str]) -> None:
    """transformers' pipeline on the export predicts llmscale's labels, from the same ids, with the same logits."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from llmscale.artifacts import load_model

    lm = load_model(folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    hf = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    got = pipeline("text-classification", model=hf, tokenizer=tok)(texts)
    want = []
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            ours = lm.model(ids).logits
            theirs = hf(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        want.append(lm.classifier.labels[int(ours.argmax(-1))])
    assert [g["label"] for g in got] == want


def test_bert_tp2_checkpoint_to_dp2_classifier_to_transformers(tiny_bert_dataset, task, tmp_path):
    ckpt = _pretrain("bert_tiny.yaml", tiny_bert_dataset, tmp_path / "pre", **{"parallel.tensor_parallel": 2})
    run = tmp_path / "ft"
    out = run_cli(_ft_args(run, str(ckpt), task), nproc=2, timeout=600)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["step"] == 8 and summary["examples"] == 61 and summary["best_metric"] == "accuracy"
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["step"] == summary["best_step"] and Path(best["path"]).is_dir()
    run_cli(["export", str(run), str(tmp_path / "exp")])
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"]
    _pipeline_agrees(tmp_path / "exp", _texts(task["val"])[:12])


def test_gpt_pp2_checkpoint_to_classifier_to_transformers(tiny_gpt_dataset, task, tmp_path):
    ckpt = _pretrain("quickstart.yaml", tiny_gpt_dataset, tmp_path / "pre",
                     **{"parallel.pipeline_parallel": 2, "model.preset": "gpt-tiny", "model.bias": "true"})
    run = tmp_path / "ft"
    run_cli(_ft_args(run, str(ckpt), task), nproc=1, timeout=600)
    run_cli(["export", str(run), str(tmp_path / "exp")])
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["architectures"] == [
        "GPT2ForSequenceClassification"]
    _pipeline_agrees(tmp_path / "exp", _texts(task["val"])[:12])
    # init.from a plain transformers folder (GPT2LMHeadModel, no llmscale files) with init.tokenizer
    import shutil

    hf = tmp_path / "hf"
    run_cli(["export", str(ckpt), str(hf)])
    tok = tmp_path / "tok"
    shutil.move(str(hf / "tokenizer"), tok)
    (hf / "llmscale_config.json").unlink()
    p = run_cli(_ft_args(tmp_path / "ft_hf", str(hf), task, **{"train.steps": 2}), check=False)
    assert p.returncode == 2 and "init.tokenizer" in p.stderr  # transformers' tokenizer has no llmscale ids
    done = run_cli(_ft_args(tmp_path / "ft_hf", str(hf), task, **{"train.steps": 2, "init.tokenizer": tok}))
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 2


def test_bilstm_from_scratch_learns_and_best_survives_retention(tokenizer_dir, task, tmp_path):
    run = tmp_path / "ft"
    args = _ft_args(run, "scratch", task, **{"init.tokenizer": tokenizer_dir, "model.family": "bilstm",
                                             "model.preset": "null", "model.d_model": 32, "model.n_layers": 1,
                                             "train.steps": 48, "train.eval_every": 8, "optim.lr": 1e-2,
                                             "checkpoint.keep_last": 1})
    out = run_cli(args, nproc=2, timeout=600)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["best_value"] >= 0.95, summary  # chance is ~0.5: the keyword decides the label
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert best["name"] in kept and "step-000048" in kept  # keep_last=1 keeps the newest, and the best
    # `llmscale eval` of the run dir scores its best checkpoint by default, on 2 processes, with the same accuracy
    # the fine-tune's own validation gave it (the same 61 examples)
    ev = tmp_path / "eval.yaml"
    ev.write_text(json.dumps({"model": str(run), "tasks": ["classify"], "output_dir": str(tmp_path / "ev"),
                              "classify": {"files": [str(task["val"])]}}), encoding="utf-8")
    res = json.loads(run_cli(["eval", str(ev)], nproc=2).stdout.strip().splitlines()[-1])["tasks"]["classify"]
    report = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert report["model"]["path"] == str(run / "checkpoints" / best["name"]) and report["world_size"] == 2
    assert res["examples"] == 61 and res["accuracy"] == pytest.approx(summary["best_value"], abs=1e-12)
    # a BiLSTM has no transformers class: export writes an llmscale folder that reloads to the same predictions
    run_cli(["export", str(run), str(tmp_path / "exp")])
    assert not (tmp_path / "exp" / "config.json").exists()
    from llmscale.artifacts import load_model

    a, b = load_model(run), load_model(tmp_path / "exp")
    ids = torch.tensor([b.tokenizer.encode("the king was good")])
    torch.testing.assert_close(a.model(ids).logits, b.model(ids).logits, rtol=0, atol=0)


def test_finetune_killed_mid_run_resumes_bitwise(tokenizer_dir, task, tmp_path):
    extra = {"init.tokenizer": tokenizer_dir, "model.family": "bilstm", "model.preset": "null", "model.d_model": 32,
             "model.n_layers": 1, "train.steps": 12, "classify.dropout": 0.3}
    ref = tmp_path / "ref"
    run_cli(_ft_args(ref, "scratch", task, **extra), nproc=2, timeout=600)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llmscale",
           *_ft_args(run, "scratch", task, **extra)]
    with open(tmp_path / "killed.log", "wb") as log:
        p = subprocess.Popen(cmd, env=cpu_env(), stdout=log, stderr=subprocess.STDOUT, process_group=0)
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "step-000006").is_dir() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and both ranks at once
        p.wait(timeout=60)
    done = run_cli(_ft_args(run, "scratch", task, **extra), nproc=2, timeout=600)
    assert "resumed at step" in done.stderr
    want = torch.load(ref / "final" / "model.pt", weights_only=True)
    got = torch.load(run / "final" / "model.pt", weights_only=True)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_bad_input_is_refused_with_the_fix(tokenizer_dir, task, tmp_path):
    base = {"init.tokenizer": tokenizer_dir, "model.family": "bilstm", "model.preset": "null", "model.d_model": 32}
    bad_label = tmp_path / "val.tsv"
    bad_label.write_text("sentence\tlabel\nthe king was good\tneutral\n", encoding="utf-8")
    p = run_cli(_ft_args(tmp_path / "a", "scratch", {**task, "val": bad_label}, **base), check=False)
    assert p.returncode == 1 and "neutral" in p.stderr and "classify.labels" in p.stderr and "Traceback" not in p.stderr
    p = run_cli(_ft_args(tmp_path / "b", "scratch", task, **{k: v for k, v in base.items() if k != "init.tokenizer"}),
                check=False)
    assert p.returncode == 2 and "init.tokenizer" in p.stderr
    p = run_cli(_ft_args(tmp_path / "c", str(tmp_path / "missing"), task), check=False)
    assert p.returncode == 1 and "does not exist" in p.stderr
    p = run_cli(_ft_args(tmp_path / "d", "scratch", task, **base, **{"parallel.pipeline_parallel": 2}), check=False)
    assert p.returncode == 2 and "pipeline_parallel=1" in p.stderr
    # a max_len beyond the model's positions is refused before any text is tokenized, naming both and the fix
    bert = {"init.tokenizer": tokenizer_dir, "model.preset": "bert-tiny-cpu", "model.max_seq_len": 32,
            "classify.max_len": 64}
    p = run_cli(_ft_args(tmp_path / "e", "scratch", task, **bert), check=False)
    assert p.returncode == 2 and "classify.max_len=64 exceeds the model's max_seq_len=32" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def _sft_pairs(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
            f.write(json.dumps({"prompt": f"Q: {a}\nA:", "response": f" {a.upper()}"}) + "\n")
    return path


def test_sft_and_continued_pretraining_from_a_gpt_run(tiny_gpt_dataset, tmp_path):
    from llmscale.artifacts import load_model

    ckpt = _pretrain("quickstart.yaml", tiny_gpt_dataset, tmp_path / "pre", **{"model.preset": "gpt-tiny",
                                                                                "model.bias": "true"})
    train, val = _sft_pairs(tmp_path / "train.jsonl", 96, 1), _sft_pairs(tmp_path / "val.jsonl", 20, 2)
    run = tmp_path / "sft"
    o = {"run_dir": run, "task": "sft", "init.from": ckpt, "sft.train": f"[{train}]", "sft.val": f"[{val}]",
         "sft.max_len": 48, "parallel.micro_batch_size": 4, "parallel.global_batch_size": 8, "train.steps": 6,
         "train.eval_every": 3, "train.log_every": 3, "train.tensorboard": "false", "checkpoint.every_steps": 3}
    out = run_cli(["finetune", str(ROOT / "configs" / "finetune_sft_gpt.yaml"), *[f"{k}={v}" for k, v in o.items()]],
                  nproc=2, timeout=600)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["best_metric"] == "val_loss" and summary["val_tokens"] > 0 and summary["step"] == 6
    # the validation loss counts exactly the response tokens + eos of the 20 validation pairs
    from llmscale.data.finetune import encode_sft, read_sft

    lm = load_model(run)
    feats = encode_sft(read_sft([val]), lm.tokenizer, max_len=48)
    assert summary["val_tokens"] == feats.num_targets
    run_cli(["export", str(run), str(tmp_path / "exp")])
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    # packed rows (attention and positions restart per example) train on 2 ranks and score the same targets
    packed = run_cli(["finetune", str(ROOT / "configs" / "finetune_sft_gpt.yaml"),
                      *[f"{k}={v}" for k, v in {**o, "run_dir": tmp_path / "packed", "sft.packing": "true"}.items()]],
                     nproc=2, timeout=600)
    assert json.loads(packed.stdout.strip().splitlines()[-1])["val_tokens"] == feats.num_targets
    # continued pretraining on the dataset the run was pretrained on; a dataset of another tokenizer is refused
    lm_args = ["finetune", str(ROOT / "configs" / "finetune_sft_gpt.yaml"), "task=lm", f"init.from={ckpt}",
               f"data.path={tiny_gpt_dataset}", "data.seq_len=64", "parallel.micro_batch_size=4",
               "parallel.global_batch_size=8", "train.steps=4", "train.eval_every=2", "train.eval_batches=2",
               "train.tensorboard=false"]
    done = run_cli([*lm_args, f"run_dir={tmp_path / 'lm'}"], timeout=600)
    assert json.loads(done.stdout.strip().splitlines()[-1])["val_bpb"] > 0
    other = tmp_path / "other"
    from llmscale.data.prepare import prepare_dataset

    prepare_dataset([ROOT / "llmscale" / "corpus" / "tinyshakespeare.txt"], other, vocab_size=400, format="gpt",
                    seq_len=64, val_fraction=0.05, doc_split="paragraph", num_proc=1)  # another tokenizer
    p = run_cli([*lm_args, f"run_dir={tmp_path / 'lm2'}", f"data.path={other}"], check=False)
    assert p.returncode == 1 and "llmscale prepare --tokenizer" in p.stderr and "Traceback" not in p.stderr


def test_zero_stages_give_the_same_classifier(tokenizer_dir, task, tmp_path):
    """Data parallel with ZeRO 0, 2 and 3: the same fine-tuned weights (fp32; reduction order only)."""
    extra = {"init.tokenizer": tokenizer_dir, "model.preset": "gpt-tiny", "model.bias": "false", "model.dropout": 0.0,
             "classify.dropout": 0.0, "train.steps": 4, "train.eval_every": 0, "checkpoint.every_steps": 0}
    final = {}
    for z in (0, 2, 3):
        run = tmp_path / f"z{z}"
        run_cli(_ft_args(run, "scratch", task, **extra, **{"parallel.zero_stage": z}), nproc=2, timeout=600)
        final[z] = torch.load(run / "final" / "model.pt", weights_only=True)
    for z in (2, 3):
        assert set(final[z]) == set(final[0])
        for k, v in final[0].items():
            torch.testing.assert_close(final[z][k], v, rtol=0, atol=2e-5, msg=f"zero {z}: {k}")
