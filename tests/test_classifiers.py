"""Sequence classifiers (llmscale.models.classify, .bilstm, .hf_classify): exported folders compute the same
logits in transformers (and pipeline("text-classification") the same labels), pooling ignores padding, the loss
is the documented one, from_pretrained_lm reuses the LM's parameters, every model can overfit a tiny batch, and
what cannot be done is refused with a message saying what to do. CPU, fp32, tiny random models, offline."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from llmscale.config import ModelConfig, from_dict
from llmscale.data.tokenizer import Tokenizer
from llmscale.errors import ConfigError, ExportError
from llmscale.models import build_model
from llmscale.models.classify import ClassifierConfig, SequenceClassifier
from llmscale.models.hf import export_model
from llmscale.models.hf_classify import export_classifier, load_classifier_folder

torch.set_num_threads(1)

LABELS = ["negative", "neutral", "positive"]
MODELS = {
    "bert": (dict(preset="bert-tiny-cpu", d_model=32, n_heads=4, max_seq_len=64), "cls_pooler"),
    "bert-mean": (dict(preset="bert-tiny-cpu", d_model=32, n_heads=4, max_seq_len=64), "mean"),
    "bert-cls": (dict(preset="bert-tiny-cpu", d_model=32, n_heads=4, max_seq_len=64), "cls"),
    "gpt2": (dict(preset="gpt-tiny", d_model=32, n_heads=4, max_seq_len=64), "last"),
    "llama-gqa": (dict(preset="llama-tiny", d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64), "last"),
    "bilstm": (dict(preset="bilstm-imdb", d_model=32, n_layers=2, dropout=0.0), "attention"),
}
HF_ARCH = {"bert": "BertForSequenceClassification", "gpt2": "GPT2ForSequenceClassification",
           "llama-gqa": "LlamaForSequenceClassification"}
TEXTS = ["To be, or not to be, that is the question.", "O Romeo, Romeo! wherefore art thou Romeo?",
         "Now is the winter of our discontent", "All the world's a stage,\nand all the men and women merely players"]


def clf_cfg(pooling: str, **kw) -> ClassifierConfig:
    return ClassifierConfig(num_labels=3, pooling=pooling, labels=list(LABELS), **kw)


def random_classifier(name: str, vocab: int, *, seed: int = 0, perturb: bool = True, **clf_kw) -> SequenceClassifier:
    """A tiny classifier whose every parameter (norm gains and biases too) is random, so a swapped or
    transposed tensor anywhere changes the logits."""
    raw, pooling = MODELS[name]
    torch.manual_seed(seed)
    model = SequenceClassifier.from_config(from_dict(ModelConfig, raw), clf_cfg(pooling, **clf_kw), vocab_size=vocab)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def padded_batch(vocab: int, lengths=(12, 7, 3), *, pad_id: int = 0, seed: int = 1):
    """Right-padded rows of the given lengths: ids in [7, vocab) (never a special id), pad_id after."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(7, vocab, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad_id), mask


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def exported(tok, tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("classifiers")
    out = {}
    for name in MODELS:
        model = random_classifier(name, tok.vocab_size)
        out[name] = (model, export_classifier(model, model.config, model.clf_config, tokenizer_dir, root / name))
    return out


def llmscale_ids(tok: Tokenizer, family: str, text: str) -> list[int]:
    return [tok.cls_id, *tok.encode(text), tok.sep_id] if family == "bert" else tok.encode(text)


# --------------------------------------------------------------------------- transformers export


@pytest.mark.parametrize("name", list(HF_ARCH))
def test_exported_logits_match_transformers_on_a_right_padded_batch(name, exported, tok):
    from transformers import AutoModelForSequenceClassification

    model, folder = exported[name]
    hf, info = AutoModelForSequenceClassification.from_pretrained(str(folder), output_loading_info=True)
    hf.eval()
    assert type(hf).__name__ == HF_ARCH[name]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask = padded_batch(tok.vocab_size, pad_id=tok.pad_id)
    kwargs = {"attention_mask": mask}
    if model.config.family == "bert":
        kwargs["token_type_ids"] = (torch.arange(ids.size(1))[None, :] >= 5).long() * mask  # a second segment
    with torch.no_grad():
        ours = model(ids, **kwargs).logits
        theirs = hf(input_ids=ids, **kwargs).logits
    assert ours.shape == (3, 3) and ours.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert sum(p.numel() for p in hf.parameters()) == model.num_params()


@pytest.mark.parametrize("name", list(HF_ARCH))
def test_text_classification_pipeline_predicts_llmscale_labels(name, exported, tok):
    from transformers import AutoTokenizer, pipeline

    model, folder = exported[name]
    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    clf = pipeline("text-classification", model=str(folder), tokenizer=str(folder), device="cpu")
    preds = clf(TEXTS, top_k=None)
    for text, pred in zip(TEXTS, preds):
        ids = llmscale_ids(tok, model.config.family, text)
        assert hf_tok(text)["input_ids"] == ids, text
        with torch.no_grad():
            probs = model(torch.tensor([ids])).logits.softmax(-1)[0]
        scores = {p["label"]: p["score"] for p in pred}
        assert set(scores) == set(LABELS)
        assert max(scores, key=scores.get) == LABELS[int(probs.argmax())], text
        for i, label in enumerate(LABELS):
            assert scores[label] == pytest.approx(float(probs[i]), abs=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_folder_round_trip_keeps_labels_weights_and_logits(name, exported, tok):
    model, folder = exported[name]
    meta = json.loads((folder / "llmscale_classifier.json").read_text())
    if name in HF_ARCH:
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["architectures"] == [HF_ARCH[name]] and meta["format"] == "transformers"
        assert cfg["id2label"] == {str(i): n for i, n in enumerate(LABELS)}
        assert cfg["label2id"] == {n: i for i, n in enumerate(LABELS)}
        assert cfg["problem_type"] == "single_label_classification" and cfg["pad_token_id"] == tok.pad_id
        from transformers import AutoConfig

        assert AutoConfig.from_pretrained(str(folder)).num_labels == 3
    else:  # no transformers class: an llmscale-only folder
        assert not (folder / "config.json").exists() and meta["format"] == "llmscale"
    assert (folder / "tokenizer" / "tokenizer.model").is_file() and (folder / "tokenizer.json").is_file()
    loaded, model_cfg, loaded_clf = load_classifier_folder(folder)
    assert loaded_clf == model.clf_config and loaded_clf.labels == LABELS
    assert model_cfg == model.config
    assert ClassifierConfig.from_dict(loaded_clf.to_dict()) == loaded_clf
    want, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    ids, mask = padded_batch(tok.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_llmscale_only_export_is_announced(tok, tmp_path, caplog):
    model = random_classifier("bert-mean", tok.vocab_size)
    with caplog.at_level(logging.WARNING, logger="llmscale"):
        export_classifier(model, model.config, model.clf_config, None, tmp_path / "out")
    assert any("llmscale-only" in r.getMessage() and "pooling='mean'" in r.getMessage() for r in caplog.records)


def test_class_weights_and_dtype_survive_export(tok, tmp_path):
    model = random_classifier("gpt2", tok.vocab_size, class_weights=[1.0, 2.0, 0.5])
    folder = export_classifier(model, model.config, model.clf_config, None, tmp_path / "bf16", dtype=torch.bfloat16)
    loaded, _, clf = load_classifier_folder(folder)
    assert clf.class_weights == [1.0, 2.0, 0.5] and torch.equal(loaded.class_weights, torch.tensor([1.0, 2.0, 0.5]))
    assert torch.equal(loaded.score.weight, model.score.weight.to(torch.bfloat16).float())  # stored as bf16
    assert load_classifier_folder(folder, dtype=torch.bfloat16)[0].score.weight.dtype == torch.bfloat16


# --------------------------------------------------------------------------- pooling


def test_mean_pooling_ignores_pad_positions(tok):
    model = random_classifier("bert-mean", tok.vocab_size)
    ids, mask = padded_batch(tok.vocab_size)
    other = ids.masked_fill(mask == 0, 99)  # different ids at the pad positions
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = model(other, attention_mask=mask).logits
        h = model.backbone(ids, mask)
        pooled = (h * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True)
        want = model.classifier(pooled)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(a, want, rtol=0, atol=1e-6)


def test_cls_pooling_uses_position_0(tok):
    for name in ("bert-cls", "bert"):
        model = random_classifier(name, tok.vocab_size)
        ids, mask = padded_batch(tok.vocab_size)
        with torch.no_grad():
            h0 = model.backbone(ids, mask)[:, 0]
            want = model.classifier(torch.tanh(model.pooler.dense(h0)) if name == "bert" else h0)
            torch.testing.assert_close(model(ids, attention_mask=mask).logits, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_gpt_pools_the_last_real_token(name, tok):
    model = random_classifier(name, tok.vocab_size)
    ids, mask = padded_batch(tok.vocab_size)
    lengths = mask.sum(1)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        h = model.backbone(ids, mask)
        want = model.score(h[torch.arange(3), lengths - 1])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        # appending pads changes nothing, with the mask or through pad_id without one
        more = torch.cat([ids, torch.full((3, 5), tok.pad_id)], 1)
        more_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.long)], 1)
        torch.testing.assert_close(model(more, attention_mask=more_mask).logits, got, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(more).logits, got, rtol=0, atol=1e-5)
        # each row alone, unpadded
        for i, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(model(ids[i:i + 1, :n]).logits[0], got[i], rtol=0, atol=1e-5)


def test_bilstm_attention_gives_pads_zero_weight(tok):
    model = random_classifier("bilstm", tok.vocab_size)
    ids, mask = padded_batch(tok.vocab_size)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        h = model.backbone(ids, mask)
        _, weights = model.attention(h, mask.bool())
        assert torch.all(weights[mask == 0] == 0) and torch.all(weights[mask == 1] > 0)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3))
        assert torch.all(h[mask == 0] == 0)
        # other pad ids, more pads, or each row alone: the same logits (the backward LSTM never reads a pad)
        torch.testing.assert_close(model(ids.masked_fill(mask == 0, 99), attention_mask=mask).logits, got,
                                   rtol=0, atol=1e-6)
        more = torch.cat([ids, torch.full((3, 4), 42)], 1)
        more_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], 1)
        torch.testing.assert_close(model(more, attention_mask=more_mask).logits, got, rtol=0, atol=1e-6)
        for i, n in enumerate(mask.sum(1).tolist()):
            torch.testing.assert_close(model(ids[i:i + 1, :n]).logits[0], got[i], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- loss


def test_loss_is_weighted_sum_over_counted_examples(tok):
    w = [0.5, 2.0, 1.5]
    model = random_classifier("gpt2", tok.vocab_size, class_weights=w)
    ids, mask = padded_batch(tok.vocab_size, lengths=(6, 4, 5, 2))
    labels = torch.tensor([2, -100, 1, 1])
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
    z = out.logits.double()
    terms = [w[y] * (torch.logsumexp(z[i], 0) - z[i, y]) for i, y in enumerate(labels.tolist()) if y != -100]
    assert int(out.num_targets) == 3 and out.num_targets.dtype == torch.long
    torch.testing.assert_close(out.loss.double(), sum(terms) / 3, rtol=1e-6, atol=0)  # / count, not / sum of weights
    # unweighted it is plain cross-entropy's mean; an all-ignored batch gives loss 0, not NaN
    plain = random_classifier("gpt2", tok.vocab_size)
    with torch.no_grad():
        o = plain(ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(o.loss, torch.nn.functional.cross_entropy(o.logits, labels, ignore_index=-100))
        empty = plain(ids, attention_mask=mask, labels=torch.full((4,), -100))
    assert empty.loss.item() == 0.0 and int(empty.num_targets) == 0


def test_loss_refuses_labels_outside_the_classes(tok):
    model = random_classifier("bert", tok.vocab_size)
    ids, mask = padded_batch(tok.vocab_size)
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\) or -100"):
        model(ids, attention_mask=mask, labels=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="shape"):
        model(ids, attention_mask=mask, labels=torch.tensor([[0], [1], [2]]))


# --------------------------------------------------------------------------- weights from a pretrained LM


LMS = {
    "gpt2-tied": dict(preset="gpt-tiny", d_model=32, n_heads=4, max_seq_len=64),
    "llama-untied": dict(preset="llama-tiny", d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64),
    "bert-nsp": dict(preset="bert-tiny-cpu", d_model=32, n_heads=4, max_seq_len=64, nsp_head=True,
                     tie_embeddings=False),
    "bert-mlm": dict(preset="bert-tiny-cpu", d_model=32, n_heads=4, max_seq_len=64),
}


@pytest.mark.parametrize("name", list(LMS))
def test_from_pretrained_lm_keeps_the_backbone_weights(name, tok):
    torch.manual_seed(0)
    lm = build_model(from_dict(ModelConfig, LMS[name]), vocab_size=tok.vocab_size)
    pooling = "last" if lm.config.family == "gpt" else "cls_pooler"
    clf = SequenceClassifier.from_pretrained_lm(lm, clf_cfg(pooling))
    lm_state, state = lm.state_dict(), clf.state_dict()
    heads = ("lm_head.", "mlm_head.", "nsp_head.")
    backbone = {k: v for k, v in lm_state.items() if not k.startswith(heads)}
    head_names = ["score.weight"] if pooling == "last" else ["pooler.dense.weight", "pooler.dense.bias",
                                                             "classifier.weight", "classifier.bias"]
    assert list(state) == ["backbone." + k for k in backbone] + head_names  # the documented names
    for k, v in backbone.items():
        assert torch.equal(state["backbone." + k], v), k
        assert state["backbone." + k].data_ptr() == v.data_ptr(), k  # shared, not copied
    if name == "bert-nsp":
        assert clf.pooler.dense is lm.nsp_head.pooler  # NSP pretraining trained the pooler: it is handed over
    ids, mask = padded_batch(tok.vocab_size)
    with torch.no_grad():  # the backbone computes the LM's hidden states
        h = clf.backbone(ids, mask)
        if lm.config.family == "gpt":
            torch.testing.assert_close(lm._logits(h), lm(ids, attention_mask=mask).logits, rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(lm.mlm_head.transform(h)[mask == 1],
                                       lm.mlm_head.transform(lm.hidden_states(ids, mask))[mask == 1])


def test_from_pretrained_lm_then_export_matches_transformers(tok, tmp_path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    lm = build_model(from_dict(ModelConfig, LMS["bert-nsp"]), vocab_size=tok.vocab_size).eval()
    clf = SequenceClassifier.from_pretrained_lm(lm, clf_cfg("cls_pooler")).eval()
    folder = export_classifier(clf, clf.config, clf.clf_config, None, tmp_path / "out", require_transformers=True)
    hf = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    ids, mask = padded_batch(tok.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits,
                                   clf(ids, attention_mask=mask).logits, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", ["bert", "bert-mean", "gpt2", "llama-gqa", "bilstm"])
def test_each_classifier_overfits_a_tiny_batch(name, tok):
    model = random_classifier(name, tok.vocab_size, perturb=False, dropout=0.0).train()
    ids, mask = padded_batch(tok.vocab_size, lengths=(10, 8, 10, 5, 9, 3, 7, 10), seed=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1, 0])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _step in range(300):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        if loss.item() < 0.02:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
    assert out.loss.item() < 0.05, (name, out.loss.item())
    assert torch.equal(out.logits.argmax(-1), labels)


# --------------------------------------------------------------------------- configs, presets, plans


def test_bilstm_preset_and_build_model_refusal():
    cfg = from_dict(ModelConfig, {"preset": "bilstm-imdb"})
    assert (cfg.family, cfg.d_model, cfg.n_layers) == ("bilstm", 300, 1)
    with pytest.raises(ConfigError, match="sequence classifier, not a language model.*SequenceClassifier"):
        build_model(cfg, vocab_size=1000)
    with torch.device("meta"):
        model = SequenceClassifier.from_config(cfg, ClassifierConfig(num_labels=2, pooling="attention",
                                                                     labels=["neg", "pos"]), vocab_size=1000)
    assert model.backbone.lstm.hidden_size == 150 and model.backbone.lstm.bidirectional
    V, C, H = 1000, 300, 150
    lstm = 2 * (4 * H * C + 4 * H * H + 8 * H)
    assert model.num_params() == V * C + lstm + (C * C + C + C) + (C * C + C) + (2 * C + 2)
    assert model.num_params(exclude_embeddings=True) == model.num_params() - V * C
    assert model.tp_plan() == {} and model.flops_per_token(256) > 6 * lstm
    with pytest.raises(ConfigError, match="must be even"):
        from_dict(ModelConfig, {"preset": "bilstm-imdb", "d_model": 301})


def test_tp_plan_names_the_backbone_linears(tok):
    import re

    import torch.nn as nn

    for name in ("bert", "llama-gqa"):
        model = random_classifier(name, tok.vocab_size, perturb=False)
        plan = model.tp_plan()
        hits = {n for n, m in model.named_modules() if any(re.fullmatch(rx, n) for rx in plan)}
        linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        assert hits and hits <= linears and all(n.startswith("backbone.blocks.") for n in hits)
        assert len(hits) == model.config.n_layers * (6 if model.config.activation == "gelu" else 7)


def test_classifier_config_is_strict_and_round_trips():
    cfg = clf_cfg("cls_pooler", class_weights=[1.0, 1.0, 3.0], dropout=0.2)
    assert ClassifierConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="Unknown config key 'num_label'"):
        ClassifierConfig.from_dict({"num_label": 3, "pooling": "cls", "labels": LABELS})
    with pytest.raises(ConfigError, match="pooling='max' is not allowed"):
        ClassifierConfig.from_dict({"num_labels": 3, "pooling": "max", "labels": LABELS})


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_labels=3, labels=["a", "b"]), r"num_labels=3 but labels has 2 names.*one name per class"),
    (dict(num_labels=2, labels=["a", "a"]), r"labels repeat \['a'\]"),
    (dict(num_labels=1, labels=["a"]), "at least 2 classes"),
    (dict(num_labels=2, labels=["a", "b"], class_weights=[1.0]), "one weight per class"),
    (dict(num_labels=2, labels=["a", "b"], class_weights=[1.0, -1.0]), ">= 0"),
    (dict(num_labels=2, labels=["a", "b"], dropout=1.0), r"dropout must be in \[0, 1\)"),
])
def test_classifier_config_refusals(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ClassifierConfig(pooling="cls", **kwargs)


def test_refusals_name_the_problem_and_the_fix(tok, tmp_path, tokenizer_dir):
    gpt = from_dict(ModelConfig, MODELS["gpt2"][0])
    with pytest.raises(ConfigError, match="pooling='mean' is not available for model.family=gpt; choose last"):
        SequenceClassifier.from_config(gpt, clf_cfg("mean"), vocab_size=100)
    with pytest.raises(ConfigError, match="pooling='cls_pooler' is not available for model.family=bilstm"):
        SequenceClassifier.from_config(from_dict(ModelConfig, MODELS["bilstm"][0]), clf_cfg("cls_pooler"),
                                       vocab_size=100)
    lstm = build_model(from_dict(ModelConfig, {"preset": "lstm-tiny", "d_model": 16}), vocab_size=100)
    with pytest.raises(ConfigError, match="GPT or BERT language model.*from scratch"):
        SequenceClassifier.from_pretrained_lm(lstm, clf_cfg("last"))
    mean = random_classifier("bert-mean", tok.vocab_size)
    with pytest.raises(ExportError, match="pooling='mean' has no transformers class.*llmscale-only.*cls_pooler"):
        export_classifier(mean, mean.config, mean.clf_config, None, tmp_path / "x", require_transformers=True)
    bilstm = random_classifier("bilstm", tok.vocab_size)
    with pytest.raises(ExportError, match="BiLSTM .* no transformers class"):
        export_classifier(bilstm, bilstm.config, bilstm.clf_config, None, tmp_path / "y", require_transformers=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before writing
    prenorm = SequenceClassifier.from_config(from_dict(ModelConfig, {**MODELS["bert"][0], "norm_position": "pre"}),
                                             clf_cfg("cls_pooler"), vocab_size=tok.vocab_size)
    with pytest.raises(ExportError, match="norm_position='pre'"):
        export_classifier(prenorm, prenorm.config, prenorm.clf_config, None, tmp_path / "z", require_transformers=True)
    torch.manual_seed(0)
    lm = build_model(gpt, vocab_size=tok.vocab_size)
    lm_folder = export_model(lm, lm.config, tokenizer_dir, tmp_path / "lm")
    with pytest.raises(ExportError, match="not a classifier folder.*load_model_folder.*from_pretrained_lm"):
        load_classifier_folder(lm_folder)
    ids, mask = padded_batch(tok.vocab_size)
    with pytest.raises(ValueError, match="right-padded"):
        bilstm(ids, attention_mask=mask.flip(1))
    gpt_clf = random_classifier("gpt2", tok.vocab_size)
    with pytest.raises(ValueError, match="token_type_ids are BERT inputs"):
        gpt_clf(ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
