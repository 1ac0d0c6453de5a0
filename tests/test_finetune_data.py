"""Fine-tuning data: readers (TSV/CSV/JSONL, zip members, folder-per-label folders and tar archives), the label
map, classification and SFT encoding (truncation, masking, packing), the loader's order/resume/eval contract, and
the errors bad input gets.

Exact-token tests use a word tokenizer whose ids are the numbers written in the text ("7 8" -> [107, 108]), so
every expected row can be written out; the real SentencePiece tokenizer (``tokenizer_dir``) checks the layout.
"""
from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from llmscale.data.finetune import (
    IGNORE,
    Example,
    FinetuneLoader,
    LabelMap,
    SFTExample,
    encode_classification,
    encode_sft,
    pack_rows,
    read_classification,
    read_sft,
)
from llmscale.data.tokenizer import Tokenizer
from llmscale.errors import ConfigError, FinetuneDataError, UserError

PAD, EOS, CLS, SEP = 0, 3, 4, 5


class WordTok:
    """ids = 100 + the numbers written in the text: "1 2 3" -> [101, 102, 103]; any other word is 99."""

    pad_id, unk_id, bos_id, eos_id, cls_id, sep_id, mask_id = 0, 1, 2, 3, 4, 5, 6

    def encode(self, text: str) -> list[int]:
        return [100 + int(w) if w.isdigit() else 99 for w in text.split()]


def words(*nums: int) -> str:
    return " ".join(map(str, nums))


def ids(*nums: int) -> list[int]:
    return [100 + n for n in nums]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- readers


def test_tsv_keeps_bare_quotes_and_names_lines(tmp_path):
    f = write(tmp_path / "train.tsv", 'sentence\tlabel\nhe said "hi \t1\n\n"quoted" start\t0\nlast one\t1\n')
    exs = read_classification(f, text_field="sentence", label_field="label")
    assert [e.text for e in exs] == ['he said "hi ', '"quoted" start', "last one"]
    assert [e.label for e in exs] == ["1", "0", "1"]
    assert [e.source for e in exs] == [f"{f}:2", f"{f}:4", f"{f}:5"]
    gz = tmp_path / "train.tsv.gz"
    gz.write_bytes(gzip.compress(f.read_bytes()))
    assert [e.text for e in read_classification(gz, text_field="sentence")] == [e.text for e in exs]


def test_csv_quoting_pairs_and_start_lines(tmp_path):
    f = write(tmp_path / "pairs.csv", 'premise,hypothesis,label\n"a, b","say ""x""",entail\n"two\nlines",c,neutral\n')
    exs = read_classification(f, text_field="premise", text_pair_field="hypothesis", label_field="label")
    assert exs == [Example("a, b", "entail", f"{f}:2", 'say "x"'), Example("two\nlines", "neutral", f"{f}:3", "c")]


def test_jsonl_fields_nested_and_integer_labels(tmp_path):
    rows = [{"review": {"body": "good"}, "stars": 5}, {"review": {"body": "bad"}, "stars": 1},
            {"review": {"body": None}, "stars": True}]
    f = write(tmp_path / "r.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    exs = read_classification(f, text_field="review.body", label_field="stars")
    assert [(e.text, e.label, e.source) for e in exs] == [("good", "5", f"{f}:1"), ("bad", "1", f"{f}:2"),
                                                          ("", "true", f"{f}:3")]
    unlabelled = read_classification(f, text_field="review.body", label_field="", text_pair_field="")
    assert [(e.label, e.text_pair) for e in unlabelled] == [(None, None)] * 3
    feats = encode_classification(unlabelled, WordTok(), None, max_len=8, family="bert")
    assert feats.labels.tolist() == [IGNORE, IGNORE] and feats.num_empty == 1


def test_zip_member_read_in_place(tmp_path):
    z = tmp_path / "corp.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("data/train.tsv", "label\ttext_a\n1\t好\n0\t差\n")
        zf.writestr("data/dev.tsv", "label\ttext_a\n1\t行\n")
    exs = read_classification(f"{z}::data/train.tsv", text_field="text_a")
    assert [(e.text, e.label) for e in exs] == [("好", "1"), ("差", "0")]
    assert exs[1].source == f"{z}::data/train.tsv:3"
    with pytest.raises(FinetuneDataError, match=r"has no member 'train.tsv'.*data/dev.tsv"):
        read_classification(f"{z}::train.tsv", text_field="text_a")
    with pytest.raises(FinetuneDataError, match=r"names no member.*corp.zip::MEMBER"):
        read_classification(z, text_field="text_a", format="tsv")


def _folder_files() -> dict[str, str]:
    return {"train/pos/10_9.txt": "great", "train/pos/2_8.txt": "fine", "train/neg/1_1.txt": "awful",
            "train/urls_pos.txt": "not an example", "train/pos/deeper/x.txt": "not an example",
            "test/neg/5_2.txt": "meh", "README": "x"}


def test_folder_per_label_directory_sorted(tmp_path):
    for rel, text in _folder_files().items():
        write(tmp_path / "aclImdb" / rel, text)
    exs = read_classification(tmp_path / "aclImdb", split="train")
    assert [(e.label, e.text) for e in exs] == [("neg", "awful"), ("pos", "great"), ("pos", "fine")]  # sorted names
    assert exs[0].source == str(tmp_path / "aclImdb" / "train" / "neg" / "1_1.txt")
    assert [e.text for e in read_classification(tmp_path / "aclImdb" / "test")] == ["meh"]  # split=None
    with pytest.raises(FinetuneDataError, match=r"no such folder.*test, train.*split="):
        read_classification(tmp_path / "aclImdb", split="valid")


def test_folder_per_label_tar_streamed_in_sorted_order(tmp_path):
    tgz = tmp_path / "imdb.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        for rel, text in reversed(list(_folder_files().items())):  # archive order is not sorted order
            data = text.encode()
            info = tarfile.TarInfo(f"aclImdb/{rel}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    exs = read_classification(tgz, split="train")
    assert [(e.label, e.text) for e in exs] == [("neg", "awful"), ("pos", "great"), ("pos", "fine")]
    assert exs[0].source == f"{tgz}::aclImdb/train/neg/1_1.txt"
    assert [e.text for e in read_classification(f"{tgz}::aclImdb/test")] == ["meh"]
    assert [e.text for e in read_classification(f"{tgz}::aclImdb", split="test")] == ["meh"]
    with pytest.raises(FinetuneDataError, match=r"no valid/LABEL/\*\.txt members.*split="):
        read_classification(tgz, split="valid")


# --------------------------------------------------------------------------- the real shared files


@pytest.mark.shared
def test_sst2_rows(shared_data):
    d = shared_data / "sst2_glue"
    train = read_classification(d / "train_full.tsv", text_field="sentence", label_field="label")
    dev = read_classification(d / "dev.tsv", text_field="sentence", label_field="label")
    assert (len(train), len(dev)) == (67_349, 872)
    assert LabelMap.from_examples(train).labels == ("0", "1")
    assert dev[0].text.startswith("it 's a charming") and dev[0].source.endswith("dev.tsv:2")


@pytest.mark.shared
def test_imdb_train_from_the_tar_in_place(shared_data):
    exs = read_classification(shared_data / "imdb_aclImdb_v1" / "aclImdb_v1_labelled.tar.gz", split="train")
    assert len(exs) == 25_000
    assert Counter(e.label for e in exs) == {"neg": 12_500, "pos": 12_500}
    names = [e.source.split("::", 1)[1] for e in exs]
    assert names == sorted(names) and all(n.startswith("aclImdb/train/") for n in names)


@pytest.mark.shared
def test_chnsenticorp_from_the_zip(shared_data):
    z = shared_data / "zh_chnsenticorp_bertwwm" / "chnsenticorp.zip"
    sizes = {s: len(read_classification(f"{z}::{s}.tsv", text_field="text_a", label_field="label"))
             for s in ("train", "dev", "test")}
    assert sizes == {"train": 9_600, "dev": 1_200, "test": 1_200}


# --------------------------------------------------------------------------- label map


def test_label_map_round_trip_and_order(tmp_path):
    exs = [Example("x", lab, f"f:{i}") for i, lab in enumerate(["10", "2", "1", "2"])]
    m = LabelMap.from_examples(exs)
    assert m.labels == ("1", "2", "10") and m.index("10") == 2  # integers in numeric order
    assert LabelMap.from_json(m.to_json()) == m
    assert LabelMap.load(m.save(tmp_path / "labels.json")) == m
    assert LabelMap.from_examples([Example("x", "b", "f:1"), Example("y", "a", "f:2")]).labels == ("a", "b")
    explicit = LabelMap.from_examples(exs, labels=["10", "2", "1", "99"])
    assert explicit.labels == ("10", "2", "1", "99") and len(explicit) == 4
    with pytest.raises(FinetuneDataError, match="twice"):
        LabelMap(["a", "a"])
    with pytest.raises(FinetuneDataError, match="label map must be JSON"):
        LabelMap.from_json("not json")


def test_unknown_label_names_label_line_and_known_labels(tmp_path):
    train = read_classification(write(tmp_path / "train.tsv", "text\tlabel\na\tpos\nb\tneg\n"))
    dev = read_classification(write(tmp_path / "dev.tsv", "text\tlabel\nc\tpos\nd\tneutral\n"))
    m = LabelMap.from_examples(train)
    with pytest.raises(FinetuneDataError) as e:
        encode_classification(dev, WordTok(), m, max_len=8, family="bert")
    msg = str(e.value)
    assert f"{tmp_path / 'dev.tsv'}:3" in msg and "'neutral'" in msg and "'neg', 'pos'" in msg and "labels=[" in msg
    with pytest.raises(FinetuneDataError, match=r"'neg' is not one of"):
        LabelMap.from_examples(train, labels=["pos", "neutral"])
    with pytest.raises(FinetuneDataError, match="at least two"):
        LabelMap.from_examples(train[:1])


# --------------------------------------------------------------------------- classification features


def test_empty_and_overlong_texts_are_counted():
    exs = [Example(words(1, 2), "a", "f:1"), Example("  \n", "b", "f:2"), Example(words(*range(20)), "b", "f:3"),
           Example("", "a", "f:4")]
    m = LabelMap(["a", "b"])
    f = encode_classification(exs, WordTok(), m, max_len=8, family="bert")
    assert (len(f), f.num_examples, f.num_empty, f.num_truncated) == (2, 4, 2, 1)
    assert f.empty_sources == ["f:2", "f:4"] and f.sources == ["f:1", "f:3"]
    assert f.labels.tolist() == [0, 1] and f.lengths.tolist() == [4, 8]
    pairs = [Example("1", "a", "f:1", "2"), Example("1", "a", "f:2", " ")]
    assert encode_classification(pairs, WordTok(), m, max_len=8, family="gpt").num_empty == 1


def test_head_and_head_tail_truncation_exact():
    m = LabelMap(["a", "b"])
    long = [Example(words(*range(20)), "a", "f:1")]
    head = encode_classification(long, WordTok(), m, max_len=10, family="bert")
    assert head.input_ids[0].tolist() == [CLS, *ids(*range(8)), SEP]
    ht = encode_classification(long, WordTok(), m, max_len=10, family="bert", truncation="head_tail")
    assert ht.input_ids[0].tolist() == [CLS, *ids(0, 1), *ids(*range(14, 20)), SEP]  # budget 8: 2 head + 6 tail
    gpt = encode_classification(long, WordTok(), m, max_len=10, family="gpt", truncation="head_tail",
                                head_tail_ratio=0.5)
    assert gpt.input_ids[0].tolist() == ids(0, 1, 2, 3, 4, 15, 16, 17, 18, 19)  # no special tokens
    paper = encode_classification([Example(words(*range(1000)), "a", "f:1")], WordTok(), m, max_len=512,
                                  family="bert", truncation="head_tail")
    row = paper.input_ids[0].tolist()
    assert len(row) == 512 and row[1:129] == ids(*range(128)) and row[129:511] == ids(*range(618, 1000))
    short = encode_classification([Example(words(1, 2), "a", "f:1")], WordTok(), m, max_len=10, family="bert",
                                  truncation="head_tail")
    assert short.input_ids[0].tolist() == [CLS, *ids(1, 2), SEP] and short.num_truncated == 0


def test_pairs_longest_first_and_token_types():
    m = LabelMap(["a", "b"])
    exs = [Example(words(*range(10)), "a", "f:1", words(50, 51)),  # the long one gives way
           Example(words(*range(10)), "b", "f:2", words(*range(50, 60)))]  # both halved
    f = encode_classification(exs, WordTok(), m, max_len=10, family="bert")
    assert f.input_ids[0].tolist() == [CLS, *ids(0, 1, 2, 3, 4), SEP, *ids(50, 51), SEP]
    assert f.input_ids[1].tolist() == [CLS, *ids(0, 1, 2, 3), SEP, *ids(50, 51, 52), SEP]  # budget 7: 4 + 3
    b = f.collate(np.array([0, 1]), pad_id=PAD)
    assert b["token_type_ids"].tolist() == [[0] * 7 + [1] * 3, [0] * 6 + [1] * 4]
    g = encode_classification(exs[:1], WordTok(), m, max_len=10, family="gpt")
    assert g.input_ids[0].tolist() == [*ids(*range(7)), SEP, *ids(50, 51)] and "token_type_ids" not in g.collate(
        np.array([0]), pad_id=PAD)


def test_real_tokenizer_layout(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    m = LabelMap(["0", "1"])
    exs = [Example("To be, or not to be", "1", "f:1"), Example("that is the question", "0", "f:2", "Whether 'tis")]
    bert = encode_classification(exs, tok, m, max_len=64, family="bert")
    a, b, c = tok.encode(exs[0].text), tok.encode(exs[1].text), tok.encode("Whether 'tis")
    assert bert.input_ids[0].tolist() == [tok.cls_id, *a, tok.sep_id]
    assert bert.input_ids[1].tolist() == [tok.cls_id, *b, tok.sep_id, *c, tok.sep_id]
    lstm = encode_classification(exs, tok, m, max_len=64, family="bilstm")
    assert lstm.input_ids[0].tolist() == a and lstm.input_ids[1].tolist() == [*b, tok.sep_id, *c]


def test_classification_bad_settings():
    m = LabelMap(["a", "b"])
    ex = [Example("1", "a", "f:1")]
    for kw, msg in (({"family": "t5"}, "family"), ({"family": "bert", "truncation": "tail"}, "truncation"),
                    ({"family": "bert", "max_len": 3}, "max_len=3")):
        with pytest.raises(ConfigError, match=msg):
            encode_classification(ex, WordTok(), m, **{"max_len": 8, **kw})


# --------------------------------------------------------------------------- SFT


def test_read_sft_template(tmp_path):
    f = write(tmp_path / "sft.jsonl", json.dumps({"q": "1 2", "a": "7"}) + "\n")
    plain = read_sft(f, prompt_field="q", response_field="a")
    assert plain == [SFTExample("1 2", "7", f"{f}:1")]
    t = read_sft(f, prompt_field="q", response_field="a", template="{{Q}} 9 {prompt} 8 {response} 6")
    assert t == [SFTExample("{Q} 9 1 2 8 ", "7 6", f"{f}:1")]  # up to {response}: prompt; the rest: response
    for bad in ("{response} {prompt}", "{prompt}", "{prompt} {response} {prompt}", "{prompt} {x} {response}",
                "{prompt:>3} {response}", "{prompt} {response"):
        with pytest.raises(ConfigError, match="template"):
            read_sft(f, prompt_field="q", response_field="a", template=bad)


def test_sft_masking_exact():
    exs = [SFTExample(words(1, 2, 3), words(7, 8), "f:1"), SFTExample(words(4), words(9), "f:2")]
    f = encode_sft(exs, WordTok(), max_len=16)
    assert f.input_ids[0].tolist() == [*ids(1, 2, 3, 7, 8), EOS]
    # labels are pre-shifted like GPT pretraining: labels[t] is the target of position t (= input_ids[t + 1])
    assert f.labels[0].tolist() == [IGNORE, IGNORE, *ids(7, 8), EOS, IGNORE]
    assert f.input_ids[1].tolist() == [*ids(4, 9), EOS] and f.labels[1].tolist() == [*ids(9), EOS, IGNORE]
    b = f.collate(np.array([1, 0]), pad_id=PAD)
    assert b["input_ids"].tolist() == [[*ids(4, 9), EOS, PAD, PAD, PAD], [*ids(1, 2, 3, 7, 8), EOS]]
    assert b["labels"].tolist()[0] == [*ids(9), EOS, IGNORE, IGNORE, IGNORE, IGNORE]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert EOS != PAD and set(b) == {"input_ids", "attention_mask", "labels"}
    # the pretraining convention, checked against the GPT loss: labels[t] scores logits[t]
    logits = torch.full((1, 6, 120), -30.0)
    for t in range(5):
        logits[0, t, f.input_ids[0][t + 1]] = 30.0
    from llmscale.models.layers import lm_loss
    loss, n = lm_loss(logits, torch.from_numpy(f.labels[0].astype(np.int64))[None])
    assert int(n) == 3 and float(loss) < 1e-6


def test_sft_truncation_drops_and_counts():
    exs = [SFTExample(words(1, 2), words(7, 8, 9), "f:1"),  # 6 tokens -> cut to 4: targets 7, 8
           SFTExample(words(1, 2, 3, 4), words(7), "f:2"),  # prompt fills max_len: no target, dropped
           SFTExample(words(1), "  ", "f:3"),  # blank response: skipped
           SFTExample("", words(7, 8), "f:4")]  # empty prompt: the first response token has nothing before it
    f = encode_sft(exs, WordTok(), max_len=4)
    assert (len(f), f.num_examples, f.num_truncated, f.num_no_target, f.num_empty) == (2, 4, 2, 1, 1)
    assert f.input_ids[0].tolist() == ids(1, 2, 7, 8) and f.labels[0].tolist() == [IGNORE, *ids(7, 8), IGNORE]
    assert f.labels[1].tolist() == [*ids(8), EOS, IGNORE] and f.sources == ["f:1", "f:4"]
    assert set(f.dropped_sources) == {"f:2", "f:3"}


def test_real_tokenizer_sft(tokenizer_dir):
    tok = Tokenizer.load(tokenizer_dir)
    f = encode_sft([SFTExample("Q: who art thou?\nA: ", "A king.", "f:1")], tok, max_len=64)
    p, r = tok.encode("Q: who art thou?\nA: "), tok.encode("A king.")
    assert f.input_ids[0].tolist() == [*p, *r, tok.eos_id]
    assert f.labels[0].tolist() == [IGNORE] * (len(p) - 1) + [*r, tok.eos_id, IGNORE]


def test_packing_restarts_positions_and_keeps_the_same_pairs():
    rng = np.random.default_rng(0)
    exs = [SFTExample(words(*rng.integers(0, 50, int(rng.integers(1, 6)))),
                      words(*rng.integers(50, 99, int(rng.integers(1, 8)))), f"f:{i}") for i in range(40)]
    plain = encode_sft(exs, WordTok(), max_len=16)
    packed = encode_sft(exs, WordTok(), max_len=16, packing=True)
    assert len(packed) < len(plain) and packed.packed and int(packed.lengths.max()) <= 16
    seen = []
    for r in range(len(packed)):
        inp, lab = packed.input_ids[r], packed.labels[r]
        pos, doc = packed.position_ids[r], packed.doc_ids[r]
        for d, i in enumerate(packed.row_examples[r]):
            sel = doc == d
            assert pos[sel].tolist() == list(range(int(sel.sum())))  # restarts at 0 for every example
            assert inp[sel].tolist() == plain.input_ids[i].tolist() and lab[sel].tolist() == plain.labels[i].tolist()
            assert lab[np.flatnonzero(sel)[-1]] == IGNORE  # the last token of an example predicts nothing
            seen.append(i)
        assert (np.diff(doc) >= 0).all()
    assert sorted(seen) == list(range(len(plain)))  # every example exactly once
    pairs = lambda f: sorted((int(a), int(b)) for x, y in zip(f.input_ids, f.labels) for a, b in zip(x, y))
    assert pairs(packed) == pairs(plain) and packed.num_targets == plain.num_targets
    b = packed.collate(np.array([0, len(packed) - 1]), pad_id=PAD)
    assert set(b) == {"input_ids", "attention_mask", "labels", "position_ids", "doc_ids"}
    pad = b["attention_mask"] == 0
    assert (b["doc_ids"][pad] == -1).all() and (b["labels"][pad] == IGNORE).all()
    assert (b["position_ids"][pad] == 0).all()
    assert pack_rows([5, 3, 8, 2, 6], 8) == [(0, 1), (2,), (3, 4)]  # best fit, longest first, deterministic


# --------------------------------------------------------------------------- the loader


def _features(n: int = 37, seed: int = 0):
    rng = np.random.default_rng(seed)
    exs = [Example(words(*range(int(rng.integers(1, 12)))), "ab"[i % 2], f"f:{i}") for i in range(n)]
    return encode_classification(exs, WordTok(), LabelMap(["a", "b"]), max_len=16, family="bert")


def _loader(feats, rank=0, world=1, gbs=8, mbs=2, **kw):
    return FinetuneLoader(feats, dp_rank=rank, dp_size=world, global_batch_size=gbs, micro_batch_size=mbs, seed=5,
                          pad_id=PAD, **kw)


def _global_step(feats, world, gbs=8, mbs=2, state=None) -> list[int]:
    """sample_ids of one global batch, gathered from every rank in rank order."""
    out = []
    for r in range(world):
        ld = _loader(feats, r, world, gbs, mbs)
        if state is not None:
            ld.load_state_dict(state)
        out += [i for mb in ld.next_step() for i in mb["sample_ids"].tolist()]
    return out


def test_world_sizes_see_the_same_global_order():
    feats = _features()
    ref = _loader(feats)
    steps = [ref.global_sample_ids(k).tolist() for k in range(12)]  # spans 2+ epochs of 37
    for world in (1, 2, 4):
        lds = [_loader(feats, r, world) for r in range(world)]
        for k in range(12):
            got = [i for ld in lds for mb in ld.next_step() for i in mb["sample_ids"].tolist()]
            assert got == steps[k], (world, k)
    unshuffled = _loader(feats, shuffle=False)
    assert unshuffled.global_sample_ids(0).tolist() == list(range(8))


def test_every_example_once_per_epoch_across_the_boundary():
    feats = _features(37)
    ld = _loader(feats)
    stream = np.concatenate([ld.global_sample_ids(k) for k in range(14)])  # 112 positions: 3 epochs + 1
    for e in range(3):
        assert sorted(stream[e * 37 : (e + 1) * 37].tolist()) == list(range(37))
    assert stream[:37].tolist() != stream[37:74].tolist()  # reshuffled per epoch
    assert ld.steps_per_epoch == 5 and ld.samples_per_epoch == 37


def test_resume_mid_epoch_is_exact_on_another_world_size():
    feats = _features()
    a = _loader(feats, 0, 1)
    for _ in range(3):
        a.next_step()
    state = a.state_dict()
    assert state["consumed_samples"] == 24 and state["epoch"] == 0 and state["step"] == 3
    expect = [[{k: v.clone() for k, v in mb.items()} for mb in a.next_step()] for _ in range(4)]
    b = _loader(feats, 0, 1)
    b.load_state_dict(json.loads(json.dumps(state)))
    for step in expect:
        got = b.next_step()
        assert len(got) == len(step)
        for x, y in zip(got, step):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    flat = [i for step in expect[:1] for mb in step for i in mb["sample_ids"].tolist()]
    assert _global_step(feats, 2, state=state) == flat == _global_step(feats, 4, state=state)


def test_loader_state_checks():
    feats = _features()
    state = _loader(feats).state_dict()
    with pytest.raises(FinetuneDataError, match="seed"):
        FinetuneLoader(feats, dp_rank=0, dp_size=1, global_batch_size=8, micro_batch_size=2, seed=6,
                       pad_id=PAD).load_state_dict(state)
    with pytest.raises(FinetuneDataError, match="other data"):
        _loader(_features(seed=1)).load_state_dict(state)
    with pytest.raises(ConfigError, match="divisible"):
        _loader(feats, 0, 2, gbs=6, mbs=2)
    with pytest.raises(ConfigError, match="dp_rank"):
        _loader(feats, 2, 2)


def test_dynamic_padding_pads_each_micro_batch_to_its_longest():
    feats = _features()
    ld = _loader(feats, gbs=8, mbs=4)
    for _ in range(5):
        for mb in ld.next_step():
            rows = mb["sample_ids"].numpy()
            lens = feats.lengths[rows]
            assert mb["input_ids"].shape == (4, lens.max()) and mb["input_ids"].dtype == torch.long
            assert mb["attention_mask"].sum(1).tolist() == lens.tolist()
            assert (mb["input_ids"][mb["attention_mask"] == 0] == PAD).all()
            assert mb["labels"].shape == (4,) and mb["token_type_ids"].shape == mb["input_ids"].shape
            for r, i in enumerate(rows.tolist()):
                assert mb["input_ids"][r, : lens[r]].tolist() == feats.input_ids[i].tolist()


def test_eval_serves_each_example_once_over_two_ranks():
    feats = _features(23)  # 23 rows, eval batch 2 ranks x 4: 3 batches, the last holding 7 real rows
    seen, counts = [], []
    for r in range(2):
        batches = list(_loader(feats, r, 2, gbs=8, mbs=4).eval_batches())
        counts.append(len(batches))
        for b in batches:
            sid, lab = b["sample_ids"], b["labels"]
            real = sid >= 0
            assert (lab[~real] == IGNORE).all() and (lab[real] >= 0).all()
            assert lab[real].tolist() == feats.labels[sid[real].numpy()].tolist()
            seen += sid[real].tolist()
    assert counts == [3, 3] and sorted(seen) == list(range(23))
    assert len(list(_loader(feats, 1, 2, gbs=8, mbs=4).eval_batches(max_batches=2))) == 2
    other = _features(5, seed=3)
    got = [i for b in _loader(feats, 0, 1, eval_features=other).eval_batches() for i in b["sample_ids"].tolist()]
    assert sorted(i for i in got if i >= 0) == [0, 1, 2, 3, 4] and got.count(-1) == 1
    # the evaluation order is a fixed permutation: the same at every pass and on any number of ranks
    one = [i for b in _loader(feats, 0, 1, gbs=8, mbs=8).eval_batches() for i in b["sample_ids"].tolist() if i >= 0]
    assert one == [i for b in _loader(feats, 0, 1, gbs=8, mbs=8).eval_batches() for i in b["sample_ids"].tolist()
                   if i >= 0] and one != sorted(one)


def test_a_shortened_evaluation_is_a_sample_of_every_class_not_the_first_rows():
    """Files sorted by label (IMDb's neg/ then pos/ folders): the first rows are all one class; a validation
    cut short by max_batches must still see both (found on the IMDb config, whose first 1,280 test reviews
    are all negative)."""
    feats = _features(400)
    feats.labels[:] = np.repeat([0, 1], 200)  # sorted by label
    labels = [int(v) for b in _loader(feats, 0, 1, gbs=8, mbs=8).eval_batches(max_batches=10)
              for v in b["labels"].tolist()]
    assert len(labels) == 80 and 20 <= sum(labels) <= 60


def test_sft_loader_batches_and_eval_pad_rows():
    exs = [SFTExample(words(1, 2), words(*range(7, 7 + i % 5 + 1)), f"f:{i}") for i in range(11)]
    feats = encode_sft(exs, WordTok(), max_len=12, packing=True)
    ld = _loader(feats, gbs=2, mbs=1)
    mb = ld.next_step()[0]
    assert set(mb) == {"input_ids", "attention_mask", "labels", "position_ids", "doc_ids", "sample_ids"}
    assert mb["labels"].shape == mb["input_ids"].shape == mb["doc_ids"].shape
    plain = encode_sft(exs, WordTok(), max_len=12)
    n = len(plain)
    batches = list(_loader(plain, 0, 1, gbs=4, mbs=4).eval_batches())
    last = batches[-1]
    pad = last["sample_ids"] < 0
    assert int(pad.sum()) == 4 * len(batches) - n and (last["labels"][pad] == IGNORE).all()
    assert sum(int((b["labels"] != IGNORE).sum()) for b in batches) == plain.num_targets


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name, text, field, match", [
    ("a.tsv", "sentence\tlabel\nx\t1\n", "text", r"a.tsv:2: no field 'text' \(its fields: 'sentence', 'label'\)"
                                                 r".*text_field"),
    ("a.jsonl", '{"text": "x", "lab": 1}\n', "text", r"a.jsonl:1: no field 'label'.*'text', 'lab'.*label_field"),
])
def test_missing_column(tmp_path, name, text, field, match):
    with pytest.raises(FinetuneDataError, match=match):
        read_classification(write(tmp_path / name, text), text_field=field)


def test_bad_inputs_give_clear_errors(tmp_path):
    bad_json = write(tmp_path / "b.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 2}\n')
    with pytest.raises(FinetuneDataError, match=r"b.jsonl:2: not valid JSON.*one JSON object"):
        read_classification(bad_json)
    with pytest.raises(FinetuneDataError, match=r"c.jsonl:1: a JSON list, not an object"):
        read_classification(write(tmp_path / "c.jsonl", "[1, 2]\n"))
    with pytest.raises(FinetuneDataError, match=r"nope.tsv: no such file.*holds: b.jsonl"):
        read_classification(tmp_path / "nope.tsv")
    for name in ("empty.tsv", "empty.jsonl"):
        with pytest.raises(FinetuneDataError, match=rf"{name}: the file is empty"):
            read_classification(write(tmp_path / name, ""))
    with pytest.raises(FinetuneDataError, match=r"head.tsv: no examples"):
        read_classification(write(tmp_path / "head.tsv", "text\tlabel\n"))
    with pytest.raises(FinetuneDataError, match=r"cols.tsv:3: 3 fields, but the header row has 2.*tab inside"):
        read_classification(write(tmp_path / "cols.tsv", "text\tlabel\na\t1\nb\tc\t0\n"))
    with pytest.raises(FinetuneDataError, match=r"lab.tsv:2: the label field 'label' holds ' ', not a label"):
        read_classification(write(tmp_path / "lab.tsv", "text\tlabel\na\t \n"))
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("text\tlabel\ncaf\u00e9\t1\n".encode("latin-1"))
    with pytest.raises(FinetuneDataError, match=r"latin.tsv:\d+: not UTF-8.*Re-encode"):
        read_classification(latin)
    with pytest.raises(FinetuneDataError, match=r"data.txt: cannot tell its format.*format="):
        read_classification(write(tmp_path / "data.txt", "x"))
    with pytest.raises(FinetuneDataError, match=r"s.jsonl:1: no field 'response'.*response_field"):
        read_sft(write(tmp_path / "s.jsonl", '{"prompt": "p", "answer": "a"}\n'))
    with pytest.raises(FinetuneDataError, match="no examples to batch"):
        _loader(encode_sft([SFTExample("1", " ", "f:1")], WordTok(), max_len=8))
    assert issubclass(FinetuneDataError, UserError) and issubclass(FinetuneDataError, ValueError)
