"""`llmscale prepare`: documents -> tokens -> Arrow shards + manifest, on the shipped corpus, on every
input format, and on the shared real corpora (Gutenberg CRLF books, a Chinese novel, 宋词 JSON with a
list-of-strings field, SST-2 TSV)."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmscale.data.prepare import prepare_dataset, split_sentences
from llmscale.data.shards import open_shard, read_manifest, verify_dataset
from llmscale.data.sources import ReadStats, iter_documents
from llmscale.data.tokenizer import Tokenizer
from llmscale.testing import run_cli


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)  # vocab 500 (conftest)


def rows(root, split):
    """Every row of a split, in order, as numpy arrays (plus sentence lengths for BERT)."""
    m = read_manifest(root)
    out = []
    for s in m.shards(split):
        v = open_shard(m.root / s.path)
        for i in range(v.num_documents):
            sl = None
            if v.sentence_offsets is not None:
                sl = v.sentence_lengths[v.sentence_offsets[i]: v.sentence_offsets[i + 1]]
            out.append((np.array(v.document(i)), sl))
    return out


def test_shakespeare_gpt_dataset(tmp_path, corpus_path, tok):
    out = tmp_path / "ds"
    m = prepare_dataset([corpus_path], out, tokenizer=tok, num_proc=2, shard_tokens=100_000, seq_len=256)
    d = m.data
    assert d["kind"] == "gpt" and d["eos_appended"] is True and d["seq_len"] == 256
    assert d["tokenizer"]["hash"] == tok.hash and d["tokenizer"]["vocab_size"] == 500
    assert d["token_dtype"] == "uint16"
    assert Tokenizer.load(out / "tokenizer").hash == tok.hash  # the dataset carries its tokenizer
    assert Tokenizer.load(out).hash == tok.hash  # and a dataset folder can stand for it
    docs = [t for _, t in iter_documents([corpus_path])]
    st = d["stats"]
    assert st["documents_read"] == st["documents_written"] == len(docs) and st["documents_skipped"] == 0
    assert st["skipped_reasons"] == {}
    train, val = rows(out, "train"), rows(out, "val")
    assert len(train) + len(val) == len(docs) and len(val) >= 1  # val never empty with >= 2 documents
    assert len(m.shards("train")) >= 3  # shard_tokens=100k over ~430k tokens
    for split, rs in (("train", train), ("val", val)):
        sp = d["splits"][split]
        assert sp["num_documents"] == len(rs) == sum(s.num_documents for s in m.shards(split))
        assert sp["num_tokens"] == sum(r.size for r, _ in rs) == sum(s.num_tokens for s in m.shards(split))
        for r, _ in rs:
            assert r[-1] == tok.eos_id and tok.eos_id not in r[:-1]  # exactly one eos, at the end
    decoded = [tok.decode(r[:-1]) for r, _ in train + val]
    assert sorted(decoded) == sorted(docs)  # lossless, nothing lost or duplicated
    assert decoded[: len(train)] == [x for x in docs if x in set(decoded[: len(train)])]  # input order kept
    total_bytes = d["splits"]["train"]["num_bytes"] + d["splits"]["val"]["num_bytes"]
    assert total_bytes == sum(len(x.encode("utf-8")) for x in docs)
    assert verify_dataset(out) == []


def test_sentencepiece_space_symbol_in_a_document_is_kept(tmp_path, tok):
    # U+2581 is SentencePiece's own mark for a space: a document holding it must come back with it, not " "
    docs = ["SentencePiece writes \u2581 for a space: a\u2581b.\n", "plain document\n", "\u2581\u2581 twice \u2581\n"]
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d, encoding="utf-8")
    prepare_dataset([tmp_path / f"{i}.txt" for i in range(3)], tmp_path / "ds", tokenizer=tok, seq_len=8,
                    val_fraction=0.3, doc_split="file")
    decoded = [tok.decode(r[:-1]) for r, _ in rows(tmp_path / "ds", "train") + rows(tmp_path / "ds", "val")]
    assert sorted(decoded) == sorted(docs)


def test_split_is_deterministic_and_independent_of_num_proc(tmp_path, corpus_path, tok):
    kw = dict(tokenizer=tok, doc_split="paragraph", val_fraction=0.05, seq_len=64)
    a = prepare_dataset([corpus_path], tmp_path / "a", num_proc=1, **kw)
    b = prepare_dataset([corpus_path], tmp_path / "b", num_proc=2, batch_chars=10_000, **kw)
    assert [s.sha256 for s in a.shards("train")] == [s.sha256 for s in b.shards("train")]
    assert [s.sha256 for s in a.shards("val")] == [s.sha256 for s in b.shards("val")]
    n_val, n = a.data["splits"]["val"]["num_documents"], a.data["stats"]["documents_written"]
    assert 0.03 < n_val / n < 0.07, (n_val, n)
    c = prepare_dataset([corpus_path], tmp_path / "c", num_proc=2, seed=7, **kw)
    assert [s.sha256 for s in c.shards("val")] != [s.sha256 for s in a.shards("val")]
    # the split follows content: identical documents land in the same split whatever their position
    val_docs = {tok.decode(r[:-1]) for r, _ in rows(tmp_path / "a", "val")}
    train_docs = {tok.decode(r[:-1]) for r, _ in rows(tmp_path / "a", "train")}
    assert not val_docs & train_docs


def test_bert_rows_carry_sentence_lengths(tmp_path, corpus_path, tok):
    src = tmp_path / "few.txt"
    src.write_text(corpus_path.read_text()[:60_000])
    m = prepare_dataset([src], tmp_path / "bert", tokenizer=tok, format="bert", doc_split="paragraph", seq_len=128)
    assert m.kind == "bert" and m.data["eos_appended"] is False
    docs = [t for _, t in iter_documents([src], doc_split="paragraph")]
    got = rows(tmp_path / "bert", "train") + rows(tmp_path / "bert", "val")
    assert len(got) == len(docs)
    multi = 0
    for ids, sl in got:
        assert sl is not None and sl.sum() == ids.size and (sl > 0).all()
        assert tok.eos_id not in ids
        multi += len(sl) > 1
        # each sentence decodes on its own to a piece of the document
        bounds = np.concatenate([[0], np.cumsum(sl)])
        sents = [tok.decode(ids[bounds[i]: bounds[i + 1]]) for i in range(len(sl))]
        assert "".join(sents) in docs
    assert multi > len(got) // 5  # speeches of several sentences are split


def test_split_sentences_english_and_chinese():
    en = 'Mr. Smith went to Washington. He said: "Hi!" Then, e.g. this.\n\nNew paragraph? Yes'
    assert split_sentences(en) == ["Mr. Smith went to Washington. ", 'He said: "Hi!" ', "Then, e.g. this.\n\n",
                                   "New paragraph? ", "Yes"]
    zh = "气和玉烛，睿化著鸿明。缇管一阳生。“好！”他说：何以至此？"
    assert split_sentences(zh) == ["气和玉烛，睿化著鸿明。", "缇管一阳生。", "“好！”", "他说：何以至此？"]
    for t in [en, zh, "", "no end", "...", "a.b.c. d"]:
        assert "".join(split_sentences(t)) == t


def test_prepare_trains_its_own_tokenizer(tmp_path, corpus_path):
    m = prepare_dataset([corpus_path], tmp_path / "own", vocab_size=400, tokenizer_sample_bytes=200_000, seq_len=64)
    t = Tokenizer.load(tmp_path / "own" / "tokenizer")
    assert m.tokenizer_hash == t.hash and m.vocab_size == 400
    assert not list(tmp_path.glob("own.tmp-*"))  # the staging folder was renamed into place


def _write_formats(tmp_path):
    recs = [{"text": "first record\nwith two lines"}, {"text": "  spaced  out  "}, {"text": "中文记录。"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "gzipped json line"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "array item one"}, {"text": "array item two"}]))
    pq.write_table(pa.table({"text": ["parquet row", "another parquet row"], "n": [1, 2]}), tmp_path / "d.parquet")
    (tmp_path / "e.csv").write_text('text,label\n"comma, inside",1\nplain csv,0\n')
    (tmp_path / "f.tsv").write_text('text\tlabel\nit \'s a "quoted" review \t1\n')
    with gzip.open(tmp_path / "g.csv.gz", "wt") as f:
        f.write("text\ngz csv row\n")
    (tmp_path / "h.txt").write_text("plain text file\n")
    return [r["text"] for r in recs] + [
        "gzipped json line", "array item one", "array item two", "parquet row", "another parquet row",
        "comma, inside", "plain csv", 'it \'s a "quoted" review ', "gz csv row", "plain text file\n"]


def test_every_input_format(tmp_path, tok):
    folder = tmp_path / "in"
    folder.mkdir()
    expected = _write_formats(folder)
    got = [t for _, t in iter_documents([folder])]
    assert sorted(got) == sorted(expected)
    # globs, and a prepare over all formats at once
    assert len(list(iter_documents([str(folder / "*.json*")]))) == 6
    m = prepare_dataset([folder], tmp_path / "ds", tokenizer=tok, seq_len=8, val_fraction=0.2)
    decoded = [tok.decode(r[:-1]) for r, _ in rows(tmp_path / "ds", "train") + rows(tmp_path / "ds", "val")]
    assert sorted(decoded) == sorted(expected)
    assert m.data["stats"]["documents_read"] == len(expected) and m.data["stats"]["files"] == 8
    # a file whose name holds glob characters (Gutenberg's "Love and Freindship [sic].txt") is read as named,
    # as the shell passes it when it expands `books/*.txt`
    odd = tmp_path / "Love and Freindship [sic].txt"
    odd.write_text("Sense and sensibility.\n", encoding="utf-8")
    assert [t for _, t in iter_documents([str(odd)])] == ["Sense and sensibility.\n"]


def test_list_of_strings_and_nested_fields(tmp_path):
    poems = [{"author": "a", "paragraphs": ["第一句，", "第二句。"]}, {"author": "b", "paragraphs": ["only one"]},
             {"author": "c"}, {"author": "d", "paragraphs": 7}]  # mixed types: datasets stores JSON text
    (tmp_path / "p.json").write_text(json.dumps(poems, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "q.json").write_text(json.dumps([{"paragraphs": 7}, {"paragraphs": 8}]))
    st = ReadStats()
    got = [t for _, t in iter_documents([tmp_path / "p.json", tmp_path / "q.json"], text_field="paragraphs", stats=st)]
    assert got == ["第一句，\n第二句。", "only one"]
    assert st.documents_read == 6 and dict(st.skipped) == {"missing_field:paragraphs": 1, "not_text": 3}
    (tmp_path / "n.jsonl").write_text('{"meta": {"body": "nested text"}}\n{"meta": {}}\n')
    st = ReadStats()
    assert [t for _, t in iter_documents([tmp_path / "n.jsonl"], text_field="meta.body", stats=st)] == ["nested text"]
    assert st.skipped["missing_field:meta.body"] == 1


def test_doc_split_modes(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text("\n\nPara one line one\nline two\n\n\n  \nPara two\n\nPara three\n\n")
    docs = lambda mode, **kw: [t for _, t in iter_documents([src], doc_split=mode, **kw)]  # noqa: E731
    assert docs("paragraph") == ["Para one line one\nline two\n", "Para two\n", "Para three\n"]
    assert docs("line") == ["Para one line one\n", "line two\n", "Para two\n", "Para three\n"]
    assert docs("file") == [src.read_text()]
    assert docs("chunk", doc_chars=30) == ["Para one line one\nline two\n\n\n  \nPara two\n", "Para three\n"]
    assert docs("chunk", doc_chars=1000) == ["Para one line one\nline two\n\n\n  \nPara two\n\nPara three\n"]


def test_long_documents_are_cut_into_rows(tmp_path, tok):
    src = tmp_path / "long.txt"
    line = "word " * 40 + "\n"
    src.write_text(line * 2000)  # one 402k-character paragraph
    st = ReadStats()
    pieces = [t for _, t in iter_documents([src], max_doc_chars=100_000, stats=st)]
    assert "".join(pieces) == src.read_text() and len(pieces) == 5
    assert all(p.endswith("\n") for p in pieces[:-1])  # cut at line ends
    assert st.documents_read == 1 and st.documents_split == 1
    m = prepare_dataset([src], tmp_path / "ds", tokenizer=tok, max_doc_chars=100_000, seq_len=64)
    assert m.data["stats"]["documents_written"] == 5 and m.data["stats"]["documents_split"] == 1
    # all pieces of one document stay in one split (here the document is alone: all train)
    assert m.data["splits"]["train"]["num_documents"] in (0, 5)


@pytest.mark.shared
def test_shared_corpora(tmp_path, shared_data):
    books = sorted((shared_data / "gutenberg_top_authors_subset" / "Doyle, Arthur Conan").glob("*.txt"))[:2]
    assert books and b"\r\n" in books[0].read_bytes()[:2000]
    novel = tmp_path / "红楼梦-slice.txt"
    novel.write_bytes((shared_data / "zh_four_classic_novels" / "红楼梦.txt").read_bytes()[:200_000].decode(
        "utf-8", "ignore").encode("utf-8"))
    out = tmp_path / "mixed"
    m = prepare_dataset([*books, novel], out, vocab_size=2048, character_coverage=0.98,
                        tokenizer_sample_bytes=800_000, seq_len=128, num_proc=2)
    t = Tokenizer.load(out / "tokenizer")
    decoded = [t.decode(r[:-1]) for r, _ in rows(out, "train") + rows(out, "val")]
    assert not any("\r" in x for x in decoded)  # CRLF normalised on read
    expected = [x for _, x in iter_documents([*books, novel])]
    assert sorted(decoded) == sorted(expected)
    assert any("宝玉" in x for x in decoded) and any("Holmes" in x or "Watson" in x for x in decoded)
    assert m.data["splits"]["val"]["num_documents"] >= 1

    # 宋词: JSON arrays whose `paragraphs` field is a list of strings, with the same tokenizer
    files = [shared_data / "zh_chinese_poetry" / "宋词" / f"ci.song.{i}.json" for i in (0, 1000)]
    ci = tmp_path / "ci"
    m2 = prepare_dataset(files, ci, tokenizer=out / "tokenizer", text_field="paragraphs", seq_len=32)
    records = [r for f in files for r in json.loads(f.read_text(encoding="utf-8"))]
    assert m2.data["stats"]["documents_read"] == len(records) == 2000
    first = json.loads(files[0].read_text(encoding="utf-8"))[0]
    poems = [t.decode(r[:-1]) for r, _ in rows(ci, "train")]
    assert "\n".join(first["paragraphs"]) in poems

    # SST-2: TSV with a `sentence` column (bare quotes inside)
    sst = prepare_dataset([shared_data / "sst2_glue" / "dev.tsv"], tmp_path / "sst", tokenizer=out / "tokenizer",
                          text_field="sentence", seq_len=32)
    assert sst.data["stats"]["documents_read"] == 872
    assert sst.data["stats"]["documents_written"] + sst.data["stats"]["documents_skipped"] == 872


def test_cli_prepare_inspect_verify(tmp_path, corpus_path, tok):
    out = tmp_path / "cli"
    proc = run_cli(["prepare", "--input", str(corpus_path), "--output", str(out), "--tokenizer", str(tok.path.parent),
                    "--seq-len", "128", "--num-proc", "2"])
    info = json.loads(proc.stdout)
    assert info["tokenizer_hash"] == tok.hash and info["val"]["num_documents"] >= 1
    ins = run_cli(["data", "inspect", str(out), "--samples", "2"])
    assert "documents read 34, written 34, skipped 0" in ins.stdout and "First Citizen" in ins.stdout
    js = json.loads(run_cli(["data", "inspect", str(out), "--json"]).stdout)
    assert js["splits"]["train"]["num_tokens"] == read_manifest(out).num_tokens("train")
    ok = run_cli(["data", "verify", str(out)])
    assert "OK" in ok.stdout
    shard = out / read_manifest(out).shards("train")[0].path
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = run_cli(["data", "verify", str(out)], check=False)
    assert bad.returncode == 1 and "sha256 mismatch" in bad.stderr
    (out / "manifest.json").unlink()
    gone = run_cli(["data", "verify", str(out)], check=False)
    assert gone.returncode == 1 and "not a complete llmscale dataset" in gone.stderr


# ------------------------------------------------------------------ parts across nodes (--part I/N) and their merge


def _stream(root, split: str) -> np.ndarray:
    m = read_manifest(root)
    return np.concatenate([open_shard(root / s.path).tokens for s in m.shards(split)] or [np.zeros(0)])


def _docs(root, split: str) -> list[bytes]:
    m = read_manifest(root)
    out = []
    for s in m.shards(split):
        v = open_shard(root / s.path)
        out += [v.document(i).tobytes() for i in range(v.num_documents)]
    return out


@pytest.mark.parametrize("fmt", ["gpt", "bert"])
def test_three_parts_merged_equal_one_process_prepare(tmp_path, corpus_path, tok, fmt):
    """The inputs cut into 3 parts (by file, balanced by bytes), each tokenized on its own, then merged: the same
    documents, tokens, order, counts and skips as one process on the same inputs; the loader serves the same
    batches."""
    from llmscale.config import DataConfig
    from llmscale.data.loader import build_loader
    from llmscale.data.prepare import merge_parts, parts_dir

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    paras = corpus_path.read_text(encoding="utf-8").split("\n\n")
    for i in range(7):  # 7 files of unequal size, one with a bad line skipped
        text = "\n\n".join(paras[i * 300:(i + 1) * 300 + 40 * i])
        (corpus / f"f{i}.txt").write_text(text, encoding="utf-8")
    (corpus / "f7.jsonl").write_text('{"text": "a good line"}\n{"nope": 1}\n{"text": "another line"}\n',
                                     encoding="utf-8")
    kw = dict(tokenizer=tok, format=fmt, seq_len=64, val_fraction=0.05, doc_split="paragraph", shard_tokens=20_000,
              num_proc=1)
    one = prepare_dataset([corpus], tmp_path / "one", **kw)
    for i in (2, 0, 1):  # any order, as array tasks finish
        prepare_dataset([corpus], tmp_path / "merged", part=(i, 3), **kw)
    assert sorted(p.name for p in parts_dir(tmp_path / "merged").iterdir()) == [
        "part-00000-of-00003", "part-00001-of-00003", "part-00002-of-00003"]
    # a finished part run again is kept, not redone
    again = prepare_dataset([corpus], tmp_path / "merged", part=(1, 3), **kw)
    assert again.root.name == "part-00001-of-00003"
    merged = merge_parts(tmp_path / "merged")
    assert not parts_dir(tmp_path / "merged").exists() and verify_dataset(merged.root) == []
    for split in ("train", "val"):
        a, b = one.data["splits"][split], merged.data["splits"][split]
        assert {k: a[k] for k in ("num_documents", "num_tokens", "num_bytes")} == \
            {k: b[k] for k in ("num_documents", "num_tokens", "num_bytes")}
        assert _docs(one.root, split) == _docs(merged.root, split)
        assert np.array_equal(_stream(one.root, split), _stream(merged.root, split))
    for k in ("documents_read", "documents_written", "documents_skipped", "skipped_reasons", "files", "bytes_read"):
        assert one.data["stats"][k] == merged.data["stats"][k], k
    assert one.data["stats"]["documents_skipped"] == 1
    assert [s["path"] for s in one.data["sources"]] == [s["path"] for s in merged.data["sources"]]
    assert len(merged.shards("train")) > 3  # each part's shards kept, renumbered
    # what training reads: the same batches from both
    served = []
    for root in (one.root, merged.root):
        cfg = DataConfig(path=str(root), seq_len=64, format=fmt)
        loader = build_loader(cfg, split="train", dp_rank=0, dp_size=1, global_batch_size=8, micro_batch_size=4,
                              pad_id=tok.pad_id, mask_id=tok.mask_id, cls_id=tok.cls_id, sep_id=tok.sep_id,
                              vocab_size=tok.vocab_size, shuffle=True)
        served.append([mb["input_ids"].clone() for _ in range(5) for mb in loader.next_step()])
        loader.close()
    for x, y in zip(*served):
        assert torch_equal(x, y)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_merge_refuses_missing_and_mismatched_parts(tmp_path, corpus_path, tok):
    from llmscale.data.prepare import PrepareError, merge_parts

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    paras = corpus_path.read_text(encoding="utf-8").split("\n\n")
    for i in range(3):
        (corpus / f"f{i}.txt").write_text("\n\n".join(paras[i * 200:(i + 1) * 200]), encoding="utf-8")
    kw = dict(tokenizer=tok, format="gpt", seq_len=64, val_fraction=0.05, doc_split="paragraph", num_proc=1)
    with pytest.raises(PrepareError, match="no parts to merge"):
        merge_parts(tmp_path / "ds")
    prepare_dataset([corpus], tmp_path / "ds", part=(0, 2), **kw)
    with pytest.raises(PrepareError, match="1 of 2 parts are missing.*part-00001-of-00002"):
        merge_parts(tmp_path / "ds")
    prepare_dataset([corpus], tmp_path / "ds", part=(1, 2), **{**kw, "seq_len": 32})
    with pytest.raises(PrepareError, match="other settings.*seq_len"):
        merge_parts(tmp_path / "ds")
    with pytest.raises(PrepareError, match="--part needs --tokenizer"):
        prepare_dataset([corpus], tmp_path / "x", part=(0, 2), **{**kw, "tokenizer": None, "vocab_size": 300})
