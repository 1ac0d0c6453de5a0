"""The SentencePiece tokenizer: lossless on any UTF-8 text, fixed special ids, the files and hash it
writes, char models with a vocabulary fixed by the corpus, and errors that say what to pass."""
from __future__ import annotations

import hashlib
import json
import random

import pytest

from llmscale.data.tokenizer import (
    META_FILE,
    MODEL_FILE,
    NUM_BYTES,
    NUM_SPECIAL,
    SPECIAL_IDS,
    VOCAB_FILE,
    Tokenizer,
    TokenizerError,
    train_tokenizer,
)
from llmscale.testing import run_cli


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, corpus_path):
    return train_tokenizer([corpus_path], tmp_path_factory.mktemp("bpe"), vocab_size=600, sample_bytes=400_000)


def _random_texts(seed: int, n: int) -> list[str]:
    """Random strings that stress losslessness: whitespace runs, CRLF, tabs, control characters,
    emoji, CJK, combining marks, characters never seen in training, and random code points."""
    rng = random.Random(seed)
    atoms = [
        "\n", "\r\n", "\r", "\t", " ", "  ", "   ", "\u3000", "\xa0", "\x00", "\x01", "\x1b", "\x7f",
        "the", "King", "Ｆｕｌｌ", "ﬁ", "é", "e\u0301", "😀", "👩‍👩‍👧", "中文", "你好，世界。", "ß", "İ",
        "\ufeff", "\u200b", "\U0010fffd", "ℌ", "①", "'", '"', "…", "—", "\ufffd",
        *META_SYMBOLS,
    ]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 12)):
            r = rng.random()
            if r < 0.6:
                parts.append(rng.choice(atoms))
            elif r < 0.8:
                parts.append("".join(chr(rng.randint(32, 126)) for _ in range(rng.randint(1, 8))))
            else:
                cp = rng.randint(0, 0x10FFFF)
                if 0xD800 <= cp <= 0xDFFF:  # surrogates are not valid UTF-8 text
                    cp = 0x41
                parts.append(chr(cp))
        out.append("".join(parts))
    return out


# SentencePiece's own symbols written as text: its whitespace mark U+2581 (decoded as a space unless spelled
# with bytes), the unknown mark U+2047 it prints for <unk>, byte-piece and control-piece names.
META_SYMBOLS = [
    "\u2581", "\u2581\u2581", " \u2581 ", "a\u2581b", "\u2581lead", "trail\u2581", "\u2581\n\u2581",
    "\u2047", " \u2047 ", "<0x41>", "<0xE2><0x96><0x81>", "<unk>", "<s>", "</s>", "<pad>", "<cls>", "<sep>",
    "<mask>", "\u2581<unk>\u2581",
]

EDGE_CASES = [
    "", " ", "  ", "\n", "\n\n\n", "\t", " \t \n", "  leading spaces", "trailing spaces   ", "a  b   c    d",
    "line one\nline two\r\nline three\rend", "tabs\tbetween\t\twords", "\n  indented\n\tand tabbed\n",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n", "中文和English混合 text。",
    "emoji 😀 and flags 🇫🇷", "null\x00byte", "\x01\x02\x03 control", "ＡＢＣ full width", "ligature ﬁ",
    *META_SYMBOLS, "SentencePiece writes \u2581 for a space: 'a\u2581b' is not 'a b'",
]


def test_lossless_on_edge_cases_and_random_unicode(bpe):
    texts = EDGE_CASES + _random_texts(0, 4000)
    bad = [t for t in texts if bpe.decode(bpe.encode(t)) != t]
    assert not bad, f"{len(bad)} texts do not round-trip, e.g. {bad[:3]!r}"
    # the batch API agrees with the one-text API
    assert bpe.encode_batch(texts[:200]) == [bpe.encode(t) for t in texts[:200]]


def test_whitespace_is_kept_not_normalised(bpe):
    # SentencePiece's defaults would turn "a  b" into "a b", drop the leading space and NFKC "ﬁ" -> "fi".
    for t in ["a  b", " a", "a ", "ﬁ", "x\n\ny", "\tz"]:
        assert bpe.decode(bpe.encode(t)) == t
    # newline is a learned piece, not spelled with a byte
    assert "\n" in {bpe.id_to_piece(i) for i in bpe.encode("speak.\nAll:")} or any(
        "\n" in bpe.id_to_piece(i) for i in bpe.encode("speak.\nAll:"))


def test_special_ids_and_byte_pieces(bpe):
    assert (bpe.pad_id, bpe.unk_id, bpe.bos_id, bpe.eos_id, bpe.cls_id, bpe.sep_id, bpe.mask_id) == (
        0, 1, 2, 3, 4, 5, 6)
    assert [bpe.id_to_piece(i) for i in range(7)] == ["<pad>", "<unk>", "<s>", "</s>", "<cls>", "<sep>", "<mask>"]
    assert bpe.id_to_piece(NUM_SPECIAL) == "<0x00>" and bpe.id_to_piece(NUM_SPECIAL + 255) == "<0xFF>"
    # special token strings in text are plain text, never the special ids
    ids = bpe.encode("<mask> <cls></s>")
    assert not set(ids) & set(SPECIAL_IDS.values())
    assert bpe.decode(ids) == "<mask> <cls></s>"
    # characters unseen in training fall back to bytes (no unk)
    assert bpe.unk_id not in bpe.encode("漢字 😀 \x07")


def test_folder_files_hash_and_meta(bpe):
    folder = bpe.path.parent
    assert {p.name for p in folder.iterdir()} >= {MODEL_FILE, VOCAB_FILE, META_FILE}
    digest = hashlib.sha256((folder / MODEL_FILE).read_bytes()).hexdigest()
    assert bpe.hash == digest
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["hash"] == digest and meta["vocab_size"] == bpe.vocab_size == 600
    assert meta["normalization"] == "identity" and meta["byte_fallback"] is True and meta["model_type"] == "bpe"
    assert meta["special_tokens"]["mask"] == {"id": 6, "piece": "<mask>"}
    vocab_lines = (folder / VOCAB_FILE).read_text(encoding="utf-8").split("\n")
    assert len([ln for ln in vocab_lines if ln]) >= 599  # one piece per line (a "\n" piece spans two)
    again = Tokenizer.load(folder)
    assert again.hash == bpe.hash and again.encode("hello world") == bpe.encode("hello world")


def test_training_is_deterministic(tmp_path, corpus_path, bpe):
    t = train_tokenizer([corpus_path], tmp_path / "again", vocab_size=600, sample_bytes=400_000)
    assert t.hash == bpe.hash


def test_char_model_vocab_is_fixed_by_the_corpus(tmp_path, corpus_path, caplog):
    tok = train_tokenizer([corpus_path], tmp_path / "char", model_type="char")
    # Tiny Shakespeare: 65 distinct characters + 7 special + 256 byte pieces
    assert tok.vocab_size == 65 + NUM_SPECIAL + NUM_BYTES
    assert tok.model_type == "char"
    text = corpus_path.read_text()[:3000]
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text  # one id per character
    assert tok.decode(tok.encode("Zebra 中 😀")) == "Zebra 中 😀"  # unseen characters via bytes
    caplog.clear()
    big = train_tokenizer([corpus_path], tmp_path / "char2", model_type="char", vocab_size=500)
    assert big.vocab_size == 328
    assert "Pass --vocab-size 328 or omit it" in caplog.text


def test_unigram_model_round_trips(tmp_path, corpus_path):
    tok = train_tokenizer([corpus_path], tmp_path / "uni", vocab_size=500, model_type="unigram", sample_bytes=300_000)
    assert tok.model_type == "unigram" and tok.vocab_size == 500
    for t in EDGE_CASES + _random_texts(1, 200):
        assert tok.decode(tok.encode(t)) == t


def test_vocab_size_errors_say_what_to_pass(tmp_path, corpus_path):
    with pytest.raises(TokenizerError, match=r"Pass --vocab-size 327 or more"):
        train_tokenizer([corpus_path], tmp_path / "a", vocab_size=263)
    with pytest.raises(TokenizerError, match=r"too large for this corpus.*Pass --vocab-size \d+ or less"):
        train_tokenizer([corpus_path], tmp_path / "b", vocab_size=200_000, sample_bytes=100_000)
    with pytest.raises(TokenizerError, match="--vocab-size is required"):
        train_tokenizer([corpus_path], tmp_path / "c")
    with pytest.raises(TokenizerError, match="No tokenizer at"):
        Tokenizer.load(tmp_path / "nothing")


@pytest.mark.shared
def test_chinese_and_english(tmp_path, shared_data):
    novel = (shared_data / "zh_four_classic_novels" / "红楼梦.txt").read_bytes()[:300_000].decode("utf-8", "ignore")
    src = tmp_path / "mixed.txt"
    english = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:100_000]
    src.write_text(novel + "\n\n" + english, encoding="utf-8")
    with pytest.raises(TokenizerError,
                       match=r"too small for this corpus.*Pass --vocab-size \d+ or more.*character-coverage"):
        train_tokenizer([src], tmp_path / "small", vocab_size=1000)
    tok = train_tokenizer([src], tmp_path / "zh", vocab_size=2048, character_coverage=0.98)
    sample = novel[5000:7000].replace("\r\n", "\n")
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert len(ids) < len(sample.encode("utf-8")) / 2  # learned pieces, not mostly bytes
    for t in ["第一回 甄士隐梦幻识通灵\n\n　　此开卷第一回也。", "Hello, 世界! 😀\tTab", "贾宝玉  林黛玉\r\n"]:
        assert tok.decode(tok.encode(t)) == t


def test_cli_train_and_missing_input(tmp_path, corpus_path):
    out = tmp_path / "cli_tok"
    proc = run_cli(["tokenizer", "train", "--input", str(corpus_path), "--output", str(out), "--vocab-size", "400",
                    "--sample-bytes", "200000"])
    info = json.loads(proc.stdout)
    assert info["vocab_size"] == 400 and info["hash"] == Tokenizer.load(out).hash
    bad = run_cli(["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--output", str(out),
                   "--vocab-size", "400"], check=False)
    assert bad.returncode == 1
    assert "missing.txt does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_sentencepiece_meta_symbols_round_trip_in_every_model_type(tmp_path, corpus_path, bpe):
    uni = train_tokenizer([corpus_path], tmp_path / "uni", vocab_size=500, model_type="unigram", sample_bytes=300_000)
    char = train_tokenizer([corpus_path], tmp_path / "char", model_type="char")
    texts = META_SYMBOLS + [f"x{m}y {m} z" for m in META_SYMBOLS]
    for tok in (bpe, uni, char):
        bad = [t for t in texts if tok.decode(tok.encode(t)) != t]
        assert not bad, f"{tok.model_type}: {bad!r} do not round-trip"
        # U+2581 is its three UTF-8 byte pieces, never SentencePiece's space piece
        ids = tok.encode("a\u2581b")
        assert [tok.id_to_piece(i) for i in ids[1:4]] == ["<0xE2>", "<0x96>", "<0x81>"]
        # the batch paths (lists, and the numpy arrays prepare writes) give the same ids
        assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
        arrays = tok.encode_batch(texts, out_type="numpy")
        assert [a.tolist() for a in arrays] == [tok.encode(t) for t in texts]
    # text without U+2581 is encoded exactly as SentencePiece encodes it
    plain = "First Citizen:\nBefore we proceed any further, hear me speak.  \u2047 <s>"
    assert bpe.encode(plain) == bpe.sp.encode(plain)
