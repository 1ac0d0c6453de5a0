"""The lm-evaluation-harness adapter (llmscale.harness): its log-likelihoods equal llmscale's own scorer and,
within 1e-4, the harness's transformers model class (HFLM) on the exported model; the bundled offline task
llmscale_mc runs through lm_eval's Python API and through run_harness with the network cut off; generation
stops where it is told. Everything runs on tiny models on the CPU."""
from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness (pip install 'llmscale[harness]')")

import torch
from lm_eval.api.instance import Instance

from llmscale.artifacts import LoadedModel, load_model
from llmscale.config import ModelConfig, from_dict
from llmscale.errors import ConfigError
from llmscale.harness import LOCAL_TASKS_DIR, LLMScaleLM, run_harness
from llmscale.models import build_model
from llmscale.models.generate import generate
from llmscale.models.hf import export_model
from llmscale.scoring import rolling_windows, score_continuations, score_stream

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)

MAX_LEN = 64
ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "llmscale" / "corpus" / "tinyshakespeare.txt"
MC_ITEMS = 40

CONTEXTS = [  # (context, continuation): trailing spaces, an empty context, a context longer than MAX_LEN tokens
    ("To be, or not to", " be"),
    ("Now is the winter of our ", "discontent"),
    ("", "First Citizen:\nBefore we proceed any further, hear me speak."),
    ("", "O"),
    ("ROMEO:\n", "O, I am fortune's fool!"),
    ("First Citizen:\n" + "Speak, speak. " * 40, "We know't, we know't."),
    ("Hello", " world! and a much longer continuation of several words"),
]


def _req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def _ll_requests() -> list[Instance]:
    return [_req("loglikelihood", c, x) for c, x in CONTEXTS]


def _long_text() -> str:
    text = CORPUS.read_text(encoding="utf-8")
    return text[40_000:41_500]  # ~700 tokens: ten windows of MAX_LEN


@pytest.fixture(scope="module")
def exported(tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny random GPT (every parameter perturbed) exported with its tokenizer: an llmscale model folder
    that transformers also loads."""
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, dict(preset="gpt-tiny", d_model=32, n_heads=4, max_seq_len=MAX_LEN)),
                        vocab_size=500)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return export_model(model.eval(), model.config, tokenizer_dir, tmp_path_factory.mktemp("harness") / "gpt")


@pytest.fixture(scope="module")
def loaded(exported) -> LoadedModel:
    return load_model(exported)


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every internet connection and name lookup fails and is recorded (some libraries swallow the error), with
    the hub libraries configured as without HF_HUB_OFFLINE: what passes here needs no network at all."""
    import datasets
    import huggingface_hub.constants

    attempts: list = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(real):
        def connect(self, address):
            if self.family in (socket.AF_INET, socket.AF_INET6):
                attempts.append(address)
                raise OSError(f"network access in an offline test: {address}")
            return real(self, address)
        return connect

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror(f"name lookup in an offline test: {host}")

    monkeypatch.setattr(socket.socket, "connect", guard(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(real_connect_ex))
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    return attempts


# --------------------------------------------------------------------------- against llmscale's own scorer


def test_rolling_windows_are_the_harness_windows():
    from lm_eval import utils

    for max_len in (1, 2, 5, 16):
        for n in range(0, 60):
            tokens = list(range(100, 100 + n))
            stream = [7] + tokens
            ours = [(stream[w.start:w.end], stream[w.score_from:w.end + 1])
                    for w in rolling_windows(len(stream), context=max_len, stride=max_len, align="end")]
            theirs = []
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=7, max_seq_len=max_len, context_len=1)):
                theirs.append(((ctx + cont)[-(max_len + 1):][:-1], cont))  # HFLM's model input and targets
            assert ours == theirs, (max_len, n)


def test_loglikelihoods_equal_llmscale_scoring(loaded):
    lm = LLMScaleLM(loaded, batch_size=1)
    tok = loaded.tokenizer
    eos = tok.eos_id
    got = lm.loglikelihood(_ll_requests())
    pairs = [lm.encode_pair(c, x) for c, x in CONTEXTS]
    assert pairs[2][0] == [eos] and pairs[3][0] == [eos]  # empty context: the prefix token
    assert pairs[1] == (tok.encode("Now is the winter of our"), tok.encode("Now is the winter of our discontent")[
        len(tok.encode("Now is the winter of our")):])  # the trailing space moved into the continuation
    assert len(pairs[5][0]) > MAX_LEN  # the model sees only the last MAX_LEN ids of it
    want = score_continuations(loaded.model, pairs, max_len=MAX_LEN, batch_size=1)
    assert all(isinstance(ll, float) and isinstance(g, bool) for ll, g in got)
    assert got == want  # the same computation: equal to the last bit
    # batching and the adapter's longest-first order change nothing but float noise
    batched = LLMScaleLM(loaded, batch_size=4).loglikelihood(_ll_requests())
    assert max(abs(a[0] - b[0]) for a, b in zip(got, batched)) < 1e-4
    assert [a[1] for a in got] == [b[1] for b in batched]

    texts = [_long_text(), "A horse! a horse! my kingdom for a horse!", ""]
    rolling = lm.loglikelihood_rolling([_req("loglikelihood_rolling", t) for t in texts])
    assert len(tok.encode(texts[0])) > 5 * MAX_LEN
    for text, ll in zip(texts, rolling):
        nats, n = score_stream(loaded.model, [eos] + tok.encode(text), context=MAX_LEN, stride=MAX_LEN,
                               batch_size=1, align="end")
        assert n == len(tok.encode(text))
        assert abs(ll - -nats) <= 1e-9, text[:30]
    assert rolling[2] == 0.0 and rolling[0] < rolling[1] < 0


def test_an_lstm_scores_with_the_default_context(loaded):
    from llmscale.harness import LSTM_MAX_LENGTH

    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, dict(preset="lstm-tiny", d_model=32)), vocab_size=500).eval()
    lstm = LoadedModel(model=model, config=model.config, tokenizer=loaded.tokenizer, tokenizer_dir=None,
                       kind="model_folder", path=Path("lstm"))
    lm = LLMScaleLM(lstm, batch_size=1)
    assert lm.max_length == LSTM_MAX_LENGTH
    pairs = [lm.encode_pair(c, x) for c, x in CONTEXTS]
    assert lm.loglikelihood(_ll_requests()) == score_continuations(model, pairs, max_len=LSTM_MAX_LENGTH, batch_size=1)
    text = _long_text()
    (ll,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
    nats, _ = score_stream(model, [lm.prefix_token_id] + lm.tok_encode(text), context=LSTM_MAX_LENGTH,
                           stride=LSTM_MAX_LENGTH, batch_size=1, align="end")
    assert ll == -nats
    (gen,) = lm.generate_until([_req("generate_until", "ROMEO:\n", {"until": ["never"], "max_gen_toks": 4})])
    prompt = lm.tok_encode("ROMEO:\n")
    new = generate(model, prompt, max_new_tokens=4, temperature=0.0)[0, len(prompt):].tolist()
    eos = loaded.tokenizer.eos_id
    assert gen == loaded.tokenizer.decode(new[:new.index(eos)] if eos in new else new)


# --------------------------------------------------------------------------- against the harness's HFLM


def test_matches_the_harness_transformers_model_on_the_export(loaded, exported):
    from lm_eval.models.huggingface import HFLM

    lm = LLMScaleLM(loaded, batch_size=4)
    # HFLM's prefix token defaults to bos; llmscale's documents start after eos, so both get the same prefix
    hf = HFLM(pretrained=str(exported), batch_size=4, device="cpu", max_length=MAX_LEN,
              prefix_token_id=lm.prefix_token_id)
    assert hf.max_length == lm.max_length == MAX_LEN
    for c, x in CONTEXTS:  # the same token split as HFLM's
        if c:
            assert hf._encode_pair(c, x) == lm.encode_pair(c, x), (c, x)
    ours = lm.loglikelihood(_ll_requests())
    theirs = hf.loglikelihood(_ll_requests(), disable_tqdm=True)
    for (a, ga), (b, gb), (c, x) in zip(ours, theirs, CONTEXTS):
        assert abs(a - b) <= 1e-4, (c[:20], x[:20], a, b)
        assert ga == gb
    assert len({round(a, 3) for a, _ in ours}) == len(ours)  # not a degenerate comparison

    # HFLM sums each window's token log-probabilities in float32 (ours in float64): at this random model's
    # ~6 nats a token that alone is ~2e-5 a window, so its texts stay a few windows long
    texts = [_long_text()[:300], "What's in a name? that which we call a rose"]
    assert len(lm.tok_encode(texts[0])) > 2 * MAX_LEN
    ours_r = lm.loglikelihood_rolling([_req("loglikelihood_rolling", t) for t in texts])
    theirs_r = hf.loglikelihood_rolling([_req("loglikelihood_rolling", t) for t in texts], disable_tqdm=True)
    for a, b in zip(ours_r, theirs_r):
        assert abs(a - b) <= 1e-4, (a, b)
    # a long text: the same windows through the transformers model itself, sums in float64
    long_ll = lm.loglikelihood_rolling([_req("loglikelihood_rolling", _long_text())])[0]
    nats, _ = score_stream(hf.model, [lm.prefix_token_id] + lm.tok_encode(_long_text()), context=MAX_LEN,
                           stride=MAX_LEN, batch_size=4, align="end")
    assert abs(long_ll - -nats) <= 1e-4

    # the bundled task through HFLM too: the same per-choice log-likelihoods as through the adapter
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=hf, tasks=["llmscale_mc"], task_manager=TaskManager(
        include_path=[str(LOCAL_TASKS_DIR)], include_defaults=False))
    samples = out["samples"]["llmscale_mc"]
    args = [tuple(a) for s in samples for a in s["arguments"]]
    theirs_mc = [r[0] for s in samples for r in s["filtered_resps"]]
    ours_mc = lm.loglikelihood([_req("loglikelihood", *a) for a in args])
    assert len(args) == 4 * MC_ITEMS
    assert max(abs(a - float(b)) for (a, _), b in zip(ours_mc, theirs_mc)) <= 1e-4


# --------------------------------------------------------------------------- the bundled task, end to end


def test_bundled_task_golds_are_the_corpus_text():
    items = [json.loads(line) for line in (LOCAL_TASKS_DIR / "llmscale_mc.jsonl").read_text("utf-8").splitlines()]
    corpus = CORPUS.read_text(encoding="utf-8")
    assert len(items) == MC_ITEMS
    assert sorted(it["gold"] for it in items) == sorted([0, 1, 2, 3] * (MC_ITEMS // 4))  # balanced: chance 0.25
    for it in items:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        gold = it["choices"][it["gold"]]
        assert it["query"] + gold in corpus, it["id"]
        assert not any(it["query"] + c in corpus for c in it["choices"] if c != gold), it["id"]
    yaml_text = (LOCAL_TASKS_DIR / "llmscale_mc.yaml").read_text("utf-8")
    assert re.search(r"^task: llmscale_mc$", yaml_text, re.M) and "output_type: multiple_choice" in yaml_text


def _mc_samples_match_the_adapter(samples: list[dict], lm: LLMScaleLM) -> None:
    assert len(samples) == MC_ITEMS
    args = [tuple(a) for s in samples for a in s["arguments"]]
    lls = [r[0] for s in samples for r in s["filtered_resps"]]
    assert len(args) == 4 * MC_ITEMS
    direct = lm.loglikelihood([_req("loglikelihood", *a) for a in args])
    assert max(abs(float(a) - b) for a, (b, _) in zip(lls, direct)) <= 1e-9


def test_simple_evaluate_and_run_harness_run_the_local_task_offline(exported, loaded, tmp_path, monkeypatch,
                                                                   no_network):
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    with pytest.raises(OSError, match="offline test"):
        socket.create_connection(("127.0.0.1", 9))  # the guard is on
    no_network.clear()
    monkeypatch.chdir(tmp_path)  # the task's data is found from any working directory
    assert get_model("llmscale") is LLMScaleLM
    out = lm_eval.simple_evaluate(model="llmscale", model_args=f"pretrained={exported},batch_size=4",
                                  tasks=["llmscale_mc"], task_manager=TaskManager(
                                      include_path=[str(LOCAL_TASKS_DIR)], include_defaults=False))
    res = out["results"]["llmscale_mc"]
    assert 0.0 <= res["acc,none"] <= 1.0 and 0.0 <= res["acc_norm,none"] <= 1.0
    assert out["n-samples"]["llmscale_mc"] == {"original": MC_ITEMS, "effective": MC_ITEMS}
    lm = LLMScaleLM(loaded, batch_size=4)
    _mc_samples_match_the_adapter(out["samples"]["llmscale_mc"], lm)
    gold_wins = sum(max(range(4), key=lambda i: s["filtered_resps"][i][0]) == s["target"]
                    for s in out["samples"]["llmscale_mc"])
    assert res["acc,none"] == pytest.approx(gold_wins / MC_ITEMS)

    # the eval job's entry: a name from the bundled folder, or a path to the YAML
    for task in ("llmscale_mc", str(LOCAL_TASKS_DIR / "llmscale_mc.yaml")):
        got = run_harness(loaded, tasks=[task], include_path=[], num_fewshot=None, limit=None, batch_size=4,
                          device="cpu", seed=1234, keep_samples=True)
        json.dumps(got, allow_nan=False)  # JSON as it is
        assert got["results"]["llmscale_mc"]["acc"] == pytest.approx(res["acc,none"])
        assert got["results"]["llmscale_mc"]["acc_norm"] == pytest.approx(res["acc_norm,none"])
        assert got["n-samples"]["llmscale_mc"] == {"original": MC_ITEMS, "effective": MC_ITEMS}
        assert got["configs"]["llmscale_mc"]["output_type"] == "multiple_choice"
        assert got["versions"]["llmscale_mc"] == 1.0 and got["n-shot"]["llmscale_mc"] == 0
        assert got["config"]["model_source"] == str(exported) and got["config"]["random_seed"] == 1234
        _mc_samples_match_the_adapter(got["samples"]["llmscale_mc"], lm)
    limited = run_harness(lm, tasks=["llmscale_mc"], limit=8, num_fewshot=2)
    assert limited["n-samples"]["llmscale_mc"]["effective"] == 8 and "samples" not in limited
    assert limited["n-shot"]["llmscale_mc"] == 2
    assert no_network == []  # not even a name lookup


def test_run_harness_and_the_model_refuse_what_cannot_run(loaded, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        run_harness(loaded, tasks=[str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="not a folder"):
        run_harness(loaded, tasks=["llmscale_mc"], include_path=[tmp_path / "nowhere"])
    with pytest.raises(ConfigError, match="at least one task"):
        run_harness(loaded, tasks=[])
    with pytest.raises(ConfigError, match="unknown option"):
        LLMScaleLM(loaded, dtype="float16")
    with pytest.raises(ConfigError, match="max_seq_len=64"):
        LLMScaleLM(loaded, max_length=65)
    with pytest.raises(ConfigError, match="not an integer"):
        LLMScaleLM(loaded, batch_size="auto")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cpu"):
            LLMScaleLM(loaded, device="cuda")
    with pytest.raises(ConfigError, match="leaves no room"):
        LLMScaleLM(loaded, max_gen_toks=MAX_LEN).generate_until([_req("generate_until", "Hi", {"until": ["\n"]})])


def test_importing_the_adapter_keeps_the_harness_model_names_and_says_when_it_is_missing(monkeypatch):
    import importlib
    import subprocess
    import sys

    # lm_eval fills its model registry only when it is empty: registering "llmscale" first must not hide "hf"
    code = ("import llmscale.harness\nfrom lm_eval.api.registry import get_model\n"
            "print(get_model('hf').__name__, get_model('llmscale').__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["HFLM", "LLMScaleLM"]
    # without lm-evaluation-harness: a user error naming the extra to install
    monkeypatch.delitem(sys.modules, "llmscale.harness")
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ConfigError, match=re.escape("pip install 'llmscale[harness]'")):
        importlib.import_module("llmscale.harness")


# --------------------------------------------------------------------------- generation


LINE = "ROMEO:\nO, I am fortune's fool!\n\n"


@pytest.fixture(scope="module")
def parrot(tokenizer_dir, loaded) -> LoadedModel:
    """A tiny GPT overfit on one line repeated: greedy decoding from "ROMEO:\\n" recites it."""
    tok = loaded.tokenizer
    ids = torch.tensor([tok.encode(LINE * 8)[:MAX_LEN]])
    torch.manual_seed(0)
    model = build_model(from_dict(ModelConfig, dict(preset="gpt-tiny", d_model=32, n_heads=4, max_seq_len=MAX_LEN)),
                        vocab_size=500)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return LoadedModel(model=model.eval(), config=model.config, tokenizer=tok, tokenizer_dir=loaded.tokenizer_dir,
                       kind="model_folder", path=Path("parrot"))


def test_generate_until_stops_at_until_and_respects_max_gen_toks(parrot):
    lm = LLMScaleLM(parrot, batch_size=4)
    tok = parrot.tokenizer
    prompt = "ROMEO:\n"
    reqs = [
        _req("generate_until", prompt, {"until": ["\n"], "max_gen_toks": 40}),
        _req("generate_until", prompt, {"until": ["fool", "I am"], "max_gen_toks": 40}),  # the earliest stop wins
        _req("generate_until", prompt, {"until": ["never generated"], "max_gen_toks": 5}),
        _req("generate_until", prompt, {"until": "!", "max_new_tokens": 40, "do_sample": False}),
        _req("generate_until", "First Citizen:\nBefore we", {"until": ["\n"], "max_gen_toks": 3}),
    ]
    out = lm.generate_until(reqs)
    assert out[0] == "O, I am fortune's fool!"
    assert out[1] == "O, "
    assert out[3] == "O, I am fortune's fool"
    five = generate(parrot.model, tok.encode(prompt), max_new_tokens=5, temperature=0.0)[0, len(tok.encode(prompt)):]
    assert len(five) == 5 and out[2] == tok.decode(five.tolist())  # exactly max_gen_toks tokens
    assert "O, I am fortune's fool!".startswith(out[2]) and out[2] != out[0]
    assert len(out[4]) > 0
    # one at a time (no batching) gives the same
    assert [lm.generate_until([r])[0] for r in reqs] == out
    # sampling is seeded: the same requests give the same text
    sampled = [_req("generate_until", prompt, {"until": ["\n\n"], "do_sample": True, "temperature": 1.5,
                                               "max_gen_toks": 12})] * 2
    assert lm.generate_until(sampled) == lm.generate_until(sampled)
