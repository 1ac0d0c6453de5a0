"""`llmscale eval`: perplexity against plain loops and the transformers recipe, the same numbers on 1 and 2
processes and for micro-batch 1 and 8, MLM, classification and generation outputs, and bad input refused
with the fix."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llmscale.testing import run_cli, run_distributed

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "llmscale" / "corpus" / "tinyshakespeare.txt"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gpt_folder(tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny GPT (2 x 64, context 64) trained 300 steps on the bundled corpus, exported to transformers."""
    from llmscale.config import ModelConfig, from_dict
    from llmscale.data.tokenizer import Tokenizer
    from llmscale.models import build_model
    from llmscale.models.hf import export_model

    tok = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, dict(n_layers=2, d_model=64, n_heads=4, max_seq_len=64)),
                        vocab_size=tok.vocab_size)
    ids = torch.tensor(tok.encode(CORPUS.read_text(encoding="utf-8")[:400_000]))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        ix = torch.randint(0, len(ids) - 65, (16,), generator=g)
        x = torch.stack([ids[i:i + 64] for i in ix])
        y = torch.stack([ids[i + 1:i + 65] for i in ix])
        loss = model(x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 4.5  # it learned something (a uniform guess is ln 500 = 6.2)
    return export_model(model.eval(), model.config, tokenizer_dir, tmp_path_factory.mktemp("gpt") / "model")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> dict:
    """Held-out text of 7 documents (an odd count: it does not divide by 2 ranks), some longer than the context."""
    text = CORPUS.read_text(encoding="utf-8")
    tail = text[-40_000:]
    paras = [p for p in tail.split("\n\n") if p.strip()]
    docs = ["\n\n".join(paras[i:i + 9]) for i in range(0, 63, 9)][:7]
    d = tmp_path_factory.mktemp("held")
    jsonl = d / "held.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    txt = d / "short.txt"
    txt.write_text(docs[0][:1500], encoding="utf-8")
    prompts = d / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET:\nFirst Citizen:\nKING HENRY VI:\nO, \n", encoding="utf-8")
    return {"jsonl": jsonl, "txt": txt, "docs": docs, "prompts": prompts}


def _config(path: Path, **values) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path


def _eval_rank(rank: int, world_size: int, cfg_path: str, overrides: list[str]) -> dict | None:
    from llmscale.config import load_config
    from llmscale.config_eval import EvalConfig
    from llmscale.jobs.eval import run

    return run(load_config(EvalConfig, cfg_path, overrides))


def _run_eval(cfg_path: Path, overrides: list[str], *, world_size: int) -> dict:
    return run_distributed(_eval_rank, world_size, args=(str(cfg_path), overrides))[0]


# --------------------------------------------------------------------------- windows and plain loops


@pytest.mark.parametrize("align", ["start", "end"])
@pytest.mark.parametrize("length,context,stride", [(2, 4, 4), (10, 4, 4), (10, 4, 1), (97, 16, 5), (64, 64, 64),
                                                   (65, 64, 64), (200, 64, 32), (5, 8, 3)])
def test_rolling_windows_score_every_target_exactly_once(length, context, stride, align):
    from llmscale.scoring import rolling_windows

    ws = rolling_windows(length, context=context, stride=stride, align=align)
    targets = [t for w in ws for t in range(w.score_from, w.end + 1)]
    assert targets == list(range(1, length))  # each once, in order
    for k, w in enumerate(ws):
        assert 0 <= w.start < w.score_from <= w.end + 1 and w.end - w.start <= context
        if k > 0:  # every scored target sees at least context - stride tokens before it
            assert w.score_from - w.start >= min(context - stride, w.score_from)
        if align == "start":
            assert w.start == k * stride  # the transformers recipe's windows
        elif w.start > 0:
            assert w.end - w.start == context  # every window full


def _nats_plain(model, stream: list[int], context: int) -> float:
    """Token by token: target p scored from the (up to) `context` tokens before it, with all of them when the
    first window covers p (the definition in llmscale.scoring)."""
    total = 0.0
    for p in range(1, len(stream)):
        start = 0 if p <= context else p - context
        x = torch.tensor([stream[start:p]])
        logp = torch.log_softmax(model(x).logits[0, -1].double(), -1)
        total -= logp[stream[p]].item()
    return total


def test_perplexity_equals_plain_loops_and_a_smaller_stride_is_no_worse(gpt_folder, held_out, tmp_path):
    from llmscale.artifacts import load_model

    loaded = load_model(gpt_folder)
    tok = loaded.tokenizer
    text = held_out["txt"].read_text(encoding="utf-8")
    stream = [tok.eos_id, *tok.encode(text)]
    cfg = _config(tmp_path / "e.yaml", model=str(gpt_folder), tasks=["perplexity"], output_dir=str(tmp_path / "o"),
                  perplexity={"files": [str(held_out["txt"])], "context": 64})
    disjoint = _run_eval(cfg, [], world_size=1)["tasks"]["perplexity"]
    # disjoint windows by hand: x = s[i:i+C], y = s[i+1:i+C+1]
    nats = 0.0
    with torch.no_grad():
        for i in range(0, len(stream) - 1, 64):
            x, y = torch.tensor([stream[i:i + 64]]), torch.tensor(stream[i + 1:i + 65])
            x = x[:, :len(y)]
            nats -= torch.log_softmax(loaded.model(x).logits[0].double(), -1).gather(1, y[:, None]).sum().item()
    assert disjoint["tokens"] == len(stream) - 1 and disjoint["windows"] == math.ceil((len(stream) - 1) / 64)
    assert disjoint["nats"] == pytest.approx(nats, rel=1e-6)
    assert disjoint["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(text.encode("utf-8")), rel=1e-6)
    assert disjoint["perplexity"] == pytest.approx(math.exp(nats / (len(stream) - 1)), rel=1e-6)
    one = _run_eval(cfg, ["perplexity.stride=1"], world_size=1)["tasks"]["perplexity"]
    with torch.no_grad():
        assert one["nats"] == pytest.approx(_nats_plain(loaded.model, stream, 64), rel=1e-6)
    # More context per token helps a trained model, on a text long enough (3,400 tokens) for it to show. Not a law
    # for any model: this tiny one scores stride 1 (every token at the window's last position) a little worse, and
    # stride 48 (a quarter of the tokens re-scored with more context) moved either way of the disjoint figure
    # between CI runs (83.25 against 82.29 once), so the claim is made where the effect is large: stride 16, three
    # quarters of every window re-scored with 48+ tokens of context.
    long = tmp_path / "long.txt"
    long.write_text(CORPUS.read_text(encoding="utf-8")[-6000:], encoding="utf-8")
    cfg = _config(tmp_path / "l.yaml", model=str(gpt_folder), tasks=["perplexity"], output_dir=str(tmp_path / "o"),
                  perplexity={"files": [str(long)], "context": 64})
    disjoint = _run_eval(cfg, [], world_size=1)["tasks"]["perplexity"]
    for stride in (48, 16):
        smaller = _run_eval(cfg, [f"perplexity.stride={stride}"], world_size=1)["tasks"]["perplexity"]
        assert smaller["tokens"] == disjoint["tokens"], stride  # every token scored once, whatever the stride
    assert smaller["perplexity"] <= disjoint["perplexity"], (smaller["perplexity"], disjoint["perplexity"])


@pytest.mark.parametrize("stride", [63, 24])
def test_perplexity_equals_the_transformers_sliding_window_recipe(gpt_folder, held_out, tmp_path, stride):
    """transformers docs, perplexity.md, on the exported model: windows of max_length = context + 1 moved by
    `stride`, the last trg_len labels of each window scored. (The recipe weighs each window's mean by
    trg_len - 1; we count the targets a window actually scores, which is what makes it exact.)"""
    from transformers import AutoModelForCausalLM

    from llmscale.data.tokenizer import Tokenizer

    hf = AutoModelForCausalLM.from_pretrained(gpt_folder).eval()
    tok = Tokenizer.load(gpt_folder / "tokenizer")
    ids = torch.tensor([[tok.eos_id, *tok.encode(held_out["txt"].read_text(encoding="utf-8"))]])
    context = 63  # the recipe feeds context + 1 tokens, and the model has 64 positions
    max_length, seq_len = context + 1, ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, seq_len, stride):
            end = min(begin + max_length, seq_len)
            trg_len = end - prev_end
            input_ids = ids[:, begin:end]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            out = hf(input_ids, labels=target_ids)
            scored = int((target_ids[:, 1:] != -100).sum())  # the labels left after transformers' shift
            nll_sum += out.loss.double().item() * scored
            n_tokens += scored
            prev_end = end
            if end == seq_len:
                break
    want = math.exp(nll_sum / n_tokens)
    cfg = _config(tmp_path / "e.yaml", model=str(gpt_folder), tasks=["perplexity"], output_dir=str(tmp_path / "o"),
                  perplexity={"files": [str(held_out["txt"])], "context": context, "stride": stride})
    got = _run_eval(cfg, [], world_size=1)["tasks"]["perplexity"]
    assert got["tokens"] == n_tokens
    assert got["perplexity"] == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- ranks and micro-batches


@pytest.mark.slow
def test_same_numbers_on_1_and_2_processes_and_micro_batch_1_and_8(gpt_folder, held_out, tmp_path):
    from llmscale.data.tokenizer import Tokenizer
    from llmscale.scoring import stream_windows

    tok = Tokenizer.load(gpt_folder / "tokenizer")
    streams = [[tok.eos_id, *tok.encode(d)] for d in held_out["docs"]]
    # a stride whose window count does not divide by 2 ranks: one rank scores one window more
    stride = next(s for s in range(48, 20, -1) if len(stream_windows(streams, context=64, stride=s)) % 2)
    cfg = _config(tmp_path / "e.yaml", model=str(gpt_folder), tasks=["perplexity", "generate"],
                  output_dir=str(tmp_path / "one"),
                  perplexity={"files": [str(held_out["jsonl"])], "context": 64, "stride": stride},
                  generate={"prompts": [str(held_out["prompts"])], "max_new_tokens": 12, "greedy": False,
                            "temperature": 0.9, "top_k": 20, "seed": 7})
    a = _run_eval(cfg, ["batch_size=8"], world_size=1)
    b = _run_eval(cfg, ["batch_size=1", f"output_dir={tmp_path / 'two'}"], world_size=2)
    pa, pb = a["tasks"]["perplexity"], b["tasks"]["perplexity"]
    assert pa["documents"] == 7 and pa["windows"] % 2 == 1  # uneven over 2 ranks: nothing padded in or dropped
    assert pa["tokens"] == pb["tokens"] and pa["windows"] == pb["windows"] and pa["long_documents"] >= 5
    for k in ("loss", "perplexity", "bits_per_byte", "word_perplexity", "accuracy"):
        assert pb[k] == pytest.approx(pa[k], rel=1e-6, abs=1e-9), k
    assert b["world_size"] == 2 and a["world_size"] == 1
    preds = [[json.loads(line) for line in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]
             for d in ("one", "two")]
    assert [p["index"] for p in preds[0]] == list(range(5)) and [p["prediction"] for p in preds[0]] == \
        [p["prediction"] for p in preds[1]]  # sampled with seed + index: the same text whatever the rank


def test_generate_greedy_matches_llmscale_generate_and_reports_every_prompt(gpt_folder, held_out, tmp_path):
    from llmscale.artifacts import load_model
    from llmscale.models.generate import generate_text

    cfg = _config(tmp_path / "e.yaml", model=str(gpt_folder), tasks=["generate"], output_dir=str(tmp_path / "o"),
                  generate={"prompts": [str(held_out["prompts"])], "max_new_tokens": 10})
    report = _run_eval(cfg, [], world_size=1)
    rows = [json.loads(line) for line in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    loaded = load_model(gpt_folder)
    assert report["tasks"]["generate"]["prompts"] == len(rows) == 5
    for row in rows:
        want = generate_text(loaded.model, loaded.tokenizer, row["prompt"], max_new_tokens=10, greedy=True)
        assert row["prediction"] == want["completion"] and row["new_tokens"] == len(want["new_ids"])


# --------------------------------------------------------------------------- mlm and classify


@pytest.fixture(scope="module")
def bert_folder(tokenizer_dir, tmp_path_factory) -> Path:
    from llmscale.config import ModelConfig, from_dict
    from llmscale.data.tokenizer import Tokenizer
    from llmscale.models import build_model
    from llmscale.models.hf import export_model

    torch.manual_seed(1)
    model = build_model(from_dict(ModelConfig, dict(family="bert", n_layers=2, d_model=64, n_heads=4, max_seq_len=64,
                                                    norm_position="post")),
                        vocab_size=Tokenizer.load(tokenizer_dir).vocab_size)
    return export_model(model.eval(), model.config, tokenizer_dir, tmp_path_factory.mktemp("bert") / "model")


@pytest.mark.slow
def test_mlm_is_the_same_on_1_and_2_processes_and_masks_by_training_rule(bert_folder, held_out, tmp_path):
    cfg = _config(tmp_path / "e.yaml", model=str(bert_folder), tasks=["mlm"], output_dir=str(tmp_path / "o"),
                  mlm={"files": [str(held_out["jsonl"])], "seq_len": 48})
    a = _run_eval(cfg, ["batch_size=8"], world_size=1)["tasks"]["mlm"]
    b = _run_eval(cfg, ["batch_size=1"], world_size=2)["tasks"]["mlm"]
    assert a["masked_tokens"] == b["masked_tokens"] and a["segments"] == b["segments"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["accuracy"] == a["accuracy"]
    assert 0.12 < a["masked_tokens"] / a["tokens"] < 0.18  # 15% selected
    assert a["loss"] > 3.0  # random weights: far from a trained model, and finite
    c = _run_eval(cfg, ["mlm.seed=99"], world_size=1)["tasks"]["mlm"]
    assert c["masked_tokens"] != a["masked_tokens"] or c["loss"] != a["loss"]  # the seed decides the masking


@pytest.mark.slow
def test_nsp_is_the_same_on_1_and_2_processes_and_refuses_what_cannot_be_scored(tiny_bert_dataset, bert_folder,
                                                                                tmp_path):
    """The nsp task scores the val pairs of training's loader (half of the B segments from another document);
    random weights score near chance, every pair once, the same on 1 and 2 processes."""
    from llmscale.config import ModelConfig, from_dict
    from llmscale.data.tokenizer import Tokenizer
    from llmscale.models import build_model
    from llmscale.models.hf import export_model

    tok_dir = tiny_bert_dataset / "tokenizer"
    torch.manual_seed(3)
    shape = dict(family="bert", n_layers=1, d_model=32, n_heads=2, max_seq_len=64, nsp_head=True, norm_position="post")
    model = build_model(from_dict(ModelConfig, shape), vocab_size=Tokenizer.load(tok_dir).vocab_size)
    folder = export_model(model.eval(), model.config, tok_dir, tmp_path / "nsp_model")
    cfg = _config(tmp_path / "e.yaml", model=str(folder), tasks=["nsp"], output_dir=str(tmp_path / "o"),
                  nsp={"dataset": str(tiny_bert_dataset), "seq_len": 64})
    a = _run_eval(cfg, ["batch_size=8"], world_size=1)["tasks"]["nsp"]
    b = _run_eval(cfg, ["batch_size=4"], world_size=2)["tasks"]["nsp"]
    assert a["pairs"] == b["pairs"] and a["confusion"] == b["confusion"]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert a["pairs"] == sum(map(sum, a["confusion"])) and 0.35 < a["random_next_share"] < 0.65
    assert abs(a["accuracy"] - 0.5) < 0.15  # random weights: a coin
    refused = [
        (dict(model=str(bert_folder), nsp={"dataset": str(tiny_bert_dataset)}), "next-sentence head"),
        (dict(model=str(folder), nsp={"dataset": ""}), "task nsp needs nsp.dataset"),
    ]
    for i, (values, needle) in enumerate(refused):
        c = _config(tmp_path / f"bad{i}.yaml", tasks=["nsp"], output_dir=str(tmp_path / f"bad{i}"), **values)
        proc = run_cli(["eval", str(c)], check=False)
        assert proc.returncode in (1, 2) and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_mask_tokens_is_the_rule_training_uses(tokenizer_dir):
    """bert_batch (training) and the eval job mask through one function: same rows, same seed -> same masks."""
    import numpy as np

    from llmscale.data.collate import MaskSpec, mask_tokens

    spec = MaskSpec(seq_len=32, vocab_size=500, mlm_probability=0.15, nsp=False, pad_id=0, mask_id=6, cls_id=4,
                    sep_id=5)
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 500, size=(64, 32))
    ids[:, 0], ids[:, -1] = 4, 5
    att = np.ones_like(ids)
    m1, l1 = mask_tokens(ids, att, spec, seed=3, tag=1, positions=np.arange(64))
    m2, l2 = mask_tokens(ids[:, :20], att[:, :20], spec, seed=3, tag=1, positions=np.arange(64))
    assert (l1[:, :20] == l2).all() and (m1[:, :20] == m2).all()  # a column's choice does not depend on the width
    sel = l1 != -100
    assert not sel[:, 0].any() and not sel[:, -1].any()  # [CLS]/[SEP] never masked
    assert 0.12 < sel.mean() < 0.18 and (l1[sel] == ids[sel]).all()
    assert 0.7 < (m1[sel] == 6).mean() < 0.9


@pytest.fixture(scope="module")
def classifier_folder(tokenizer_dir, tmp_path_factory) -> Path:
    from llmscale.config import ModelConfig, from_dict
    from llmscale.models.classify import ClassifierConfig, SequenceClassifier
    from llmscale.models.hf_classify import export_classifier

    torch.manual_seed(2)
    clf = ClassifierConfig(num_labels=3, pooling="cls_pooler", labels=["neg", "neu", "pos"])
    model = SequenceClassifier.from_config(from_dict(ModelConfig, dict(family="bert", n_layers=1, d_model=32,
                                                                       n_heads=2, max_seq_len=64)), clf,
                                           vocab_size=500)
    return export_classifier(model.eval(), model.config, model.clf_config, tokenizer_dir,
                             tmp_path_factory.mktemp("clf") / "model")


def _labelled(path: Path, n: int, labels=("neg", "neu", "pos"), long_every: int = 0) -> Path:
    words = CORPUS.read_text(encoding="utf-8").split()[:5000]
    rows = ["sentence\tlabel"]
    for i in range(n):
        k = 200 if long_every and i % long_every == 0 else 5 + i % 11
        rows.append(" ".join(words[i * 7:i * 7 + k]) + "\t" + labels[i % len(labels)])
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_classify_metrics_predictions_and_rank_invariance(classifier_folder, tmp_path):
    from llmscale.evaluate import classification_metrics

    data = _labelled(tmp_path / "dev.tsv", 37, long_every=10)  # 37: uneven over 2 ranks; some longer than max_len
    cfg = _config(tmp_path / "e.yaml", model=str(classifier_folder), tasks=["classify"],
                  output_dir=str(tmp_path / "one"), classify={"files": [str(data)], "max_len": 64})
    a = _run_eval(cfg, ["batch_size=8"], world_size=1)["tasks"]["classify"]
    b = _run_eval(cfg, ["batch_size=1", f"output_dir={tmp_path / 'two'}"], world_size=2)["tasks"]["classify"]
    assert a["examples"] == b["examples"] == 37 and a["truncated"] == 4
    assert a["confusion"] == b["confusion"] and b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "one" / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(37))
    assert [r["gold"] for r in rows] == [("neg", "neu", "pos")[i % 3] for i in range(37)]
    names = ["neg", "neu", "pos"]
    cm = [[sum(1 for r in rows if r["gold"] == g and r["prediction"] == p) for p in names] for g in names]
    assert cm == a["confusion"] and classification_metrics(cm, labels=names)["f1"] == a["f1"]
    assert all(0.0 < r["score"] <= 1.0 for r in rows)
    report = json.loads((tmp_path / "one" / "results.json").read_text())
    assert report["model"]["classifier"] and report["tasks"]["classify"]["data"][0]["sha256"]
    assert (tmp_path / "one" / "results.md").read_text().count("| neu |") == 1


# --------------------------------------------------------------------------- outputs and bad input


def test_results_record_source_tokenizer_data_hashes_and_settings(gpt_folder, held_out, tmp_path):
    from llmscale.data.tokenizer import Tokenizer
    from llmscale.files import sha256_file

    out = tmp_path / "o"
    cfg = _config(tmp_path / "e.yaml", model=str(gpt_folder), tasks=["perplexity"], output_dir=str(out),
                  perplexity={"files": [str(held_out["txt"])], "context": 32, "stride": 16})
    run_cli(["eval", str(cfg)])
    report = json.loads((out / "results.json").read_text())
    assert report["model"]["source"] == str(gpt_folder)
    assert report["model"]["tokenizer_hash"] == Tokenizer.load(gpt_folder / "tokenizer").hash
    ppl = report["tasks"]["perplexity"]
    assert ppl["data"] == [{"path": str(held_out["txt"]), "sha256": sha256_file(held_out["txt"])}]
    assert ppl["settings"]["context"] == 32 and ppl["settings"]["stride"] == 16 and ppl["settings"]["prefix"] == "eos"
    md = (out / "results.md").read_text()
    assert "bits_per_byte" in md and f"{ppl['perplexity']:.6g}" in md
    assert not (out / "predictions.jsonl").exists()  # perplexity writes no predictions


def test_wikitext_word_count_is_the_published_one(shared_data, tokenizer_dir):
    """245,569 words in WikiText-2 test (whitespace tokens + one <eos> per line), as ../shared/data/README.md says."""
    from llmscale.config_eval import PerplexityConfig
    from llmscale.data.tokenizer import Tokenizer
    from llmscale.eval_tasks import count_words, read_docs

    docs = read_docs(PerplexityConfig(files=[str(shared_data / "wikitext-2" / "test.txt")]),
                     Tokenizer.load(tokenizer_dir), task="perplexity", strip_eos=True)
    assert len(docs.texts) == 1 and sum(count_words(t) for t in docs.texts) == 245_569


def test_a_prepared_split_scores_like_its_raw_text(gpt_folder, held_out, tmp_path):
    from llmscale.data.prepare import prepare_dataset

    ds = tmp_path / "ds"
    prepare_dataset([held_out["jsonl"]], ds, tokenizer=gpt_folder / "tokenizer", seq_len=64, val_fraction=0.0,
                    num_proc=1)
    base = dict(model=str(gpt_folder), tasks=["perplexity"], output_dir=str(tmp_path / "o"))
    raw = _run_eval(_config(tmp_path / "a.yaml", **base, perplexity={"files": [str(held_out["jsonl"])]}), [],
                    world_size=1)["tasks"]["perplexity"]
    pre = _run_eval(_config(tmp_path / "b.yaml", **base, perplexity={"dataset": str(ds), "split": "train"}), [],
                    world_size=1)["tasks"]["perplexity"]
    assert pre["documents"] == raw["documents"] == 7 and pre["tokens"] == raw["tokens"]
    assert pre["bytes"] == raw["bytes"] and pre["nats"] == pytest.approx(raw["nats"], rel=1e-9)


def test_bad_input_is_refused_with_the_fix(gpt_folder, classifier_folder, held_out, tiny_gpt_dataset, tmp_path):
    def fails(name: str, needles: tuple[str, ...], **values) -> None:
        cfg = _config(tmp_path / f"{name}.yaml", output_dir=str(tmp_path / name), **values)
        proc = run_cli(["eval", str(cfg)], check=False)
        assert proc.returncode in (1, 2), (name, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
        for needle in needles:
            assert needle in proc.stderr, (name, needle, proc.stderr[-2000:])
        assert not (tmp_path / name / "results.json").exists()

    ppl = {"files": [str(held_out["txt"])]}
    fails("missing", ("does not exist", "llmscale export"), model=str(tmp_path / "nope"), tasks=["perplexity"],
          perplexity=ppl)
    fails("foreign_tokenizer", ("was prepared with tokenizer", "llmscale prepare --tokenizer"), model=str(gpt_folder),
          tasks=["perplexity"], perplexity={"dataset": str(tiny_gpt_dataset)})
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n", encoding="utf-8")
    fails("empty", ("hold no text",), model=str(gpt_folder), tasks=["perplexity"], perplexity={"files": [str(blank)]})
    fails("labels", ("not in the model's label map", "'maybe'"), model=str(classifier_folder), tasks=["classify"],
          classify={"files": [str(_labelled(tmp_path / "odd.tsv", 9, labels=("neg", "maybe", "pos")))]})
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text(" ".join(["ROMEO"] * 200) + "\n", encoding="utf-8")
    fails("long_prompt", ("max_seq_len is 64", "shorten it"), model=str(gpt_folder), tasks=["generate"],
          generate={"prompts": [str(long_prompt)]})
    fails("context", ("exceeds the model's max_seq_len=64",), model=str(gpt_folder), tasks=["perplexity"],
          perplexity={**ppl, "context": 128})
    fails("wrong_task", ("task mlm needs a BERT",), model=str(gpt_folder), tasks=["mlm"], mlm=ppl)
    fails("no_task", ("tasks is empty",), model=str(gpt_folder))
    # a text longer than the context is no error: every token is still scored, and the count says so
    cfg = _config(tmp_path / "ok.yaml", output_dir=str(tmp_path / "ok"), model=str(gpt_folder), tasks=["perplexity"],
                  perplexity=ppl)
    res = json.loads(run_cli(["eval", str(cfg)]).stdout.strip().splitlines()[-1])["tasks"]["perplexity"]
    assert res["long_documents"] == 1 and res["windows"] > 1


@pytest.mark.slow
def test_two_processes_under_torchrun(gpt_folder, held_out, tmp_path):
    cfg = _config(tmp_path / "e.yaml", model=str(gpt_folder), tasks=["perplexity"], output_dir=str(tmp_path / "o"),
                  perplexity={"files": [str(held_out["jsonl"])], "context": 64})
    two = json.loads(run_cli(["eval", str(cfg)], nproc=2).stdout.strip().splitlines()[-1])["tasks"]["perplexity"]
    assert json.loads((tmp_path / "o" / "results.json").read_text())["world_size"] == 2
    one = _run_eval(cfg, [f"output_dir={tmp_path / 'one'}"], world_size=1)["tasks"]["perplexity"]
    assert two["tokens"] == one["tokens"] and two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-6)




@pytest.mark.slow
def test_the_harness_task_of_the_eval_job_runs_offline_on_2_processes(gpt_folder, tmp_path):
    """configs/eval_harness.yaml as shipped (the local multiple-choice task): every item scored, on rank 0, with the
    numbers lm_eval reports; the other rank waits. Chance is 0.25 (4 choices)."""
    pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness (pip install -e '.[harness]')")
    out = tmp_path / "h"
    line = run_cli(["eval", str(ROOT / "configs" / "eval_harness.yaml"), f"model={gpt_folder}", f"output_dir={out}"],
                   nproc=2, cwd=tmp_path).stdout.strip().splitlines()[-1]
    res = json.loads(line)["tasks"]["harness"]
    items = sum(1 for _ in open(ROOT / "configs" / "harness" / "llmscale_mc.jsonl", encoding="utf-8"))
    report = json.loads((out / "results.json").read_text())
    assert report["tasks"]["harness"]["results"]["llmscale_mc"]["acc"] == res["llmscale_mc/acc"]
    assert 0.0 <= res["llmscale_mc/acc"] <= 1.0 and report["tasks"]["harness"]["n-samples"]["llmscale_mc"][
        "effective"] == items == 40
    assert "| llmscale_mc | acc |" in (out / "results.md").read_text()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_loads_with_its_tree(name):
    from llmscale.config import RunConfig, load_config, read_yaml
    from llmscale.config_eval import EvalConfig
    from llmscale.config_finetune import FinetuneConfig

    path = ROOT / "configs" / name
    raw = read_yaml(path)
    tree = EvalConfig if "tasks" in raw else FinetuneConfig if "task" in raw else RunConfig
    assert name.startswith("eval_") == (tree is EvalConfig)
    load_config(tree, path, [])


def test_eval_configs_name_data_that_exists(shared_data):
    from llmscale.config import load_config
    from llmscale.config_eval import EvalConfig

    # data/... is what a documented command writes (prepare, the SFT pairs): some config's comments must hold it
    comments = "\n".join(line for p in (ROOT / "configs").glob("*.yaml")
                         for line in p.read_text(encoding="utf-8").splitlines() if line.lstrip().startswith("#"))
    for path in sorted((ROOT / "configs").glob("eval_*.yaml")):
        cfg = load_config(EvalConfig, path, [])
        named = [*cfg.perplexity.files, *cfg.mlm.files, *cfg.classify.files, *cfg.generate.prompts,
                 *[d for d in (cfg.perplexity.dataset, cfg.mlm.dataset, cfg.nsp.dataset) if d]]
        for f in named:
            if f.startswith("data/"):
                assert f"--output {f}" in comments or f in comments.replace("{s}", "dev"), \
                    f"{path.name} names {f}: no config comment shows the command that writes it"
            else:
                assert (ROOT / f.split("::")[0]).exists(), f"{path.name} names {f}, which does not exist"
        assert named or cfg.tasks == ["harness"], path.name


def test_every_eval_field_is_documented():
    from llmscale.config import describe
    from llmscale.config_eval import EvalConfig

    rows = describe(EvalConfig)
    assert len(rows) > 40 and [key for key, _, _, text in rows if not text] == []
