"""A lossless SentencePiece tokenizer with the special tokens GPT and BERT both need.

    tok = train_tokenizer(["books/"], "tok/", vocab_size=8000)        # or: llmscale tokenizer train ...
    tok = Tokenizer.load("tok/")
    assert tok.decode(tok.encode(text)) == text                        # for any valid UTF-8 text

Lossless: SentencePiece by default normalises text (NFKC), drops runs of spaces and adds a dummy
prefix space. Here normalisation is ``identity``, extra whitespace is kept, no dummy prefix, and
every character the vocabulary lacks (rare CJK, emoji, control characters) is spelled with the 256
byte pieces (``byte_fallback``), so decode(encode(t)) == t for newlines, tabs, runs of spaces and
everything else, SentencePiece's own whitespace symbol U+2581 included (spelled with its byte pieces,
since SentencePiece would decode it as a space). Training sees documents with their newlines (cut at line
ends into pieces of at most ``max_sentence_bytes``), so ``\\n`` is an ordinary piece, not a byte.

Fixed ids: pad=0 ``<pad>``, unk=1 ``<unk>``, bos=2 ``<s>``, eos=3 ``</s>``, cls=4 ``<cls>``,
sep=5 ``<sep>``, mask=6 ``<mask>``, then the 256 byte pieces, then the learned pieces. The special
pieces are SentencePiece *control* symbols: encoding never produces them (the text ``<mask>`` in a
document is spelled as ordinary pieces), collators insert them by id, and decode drops them.

Folder: ``tokenizer.model``, ``tokenizer.vocab`` (piece<TAB>score), ``tokenizer_meta.json``. The
hash (sha256 of ``tokenizer.model``) is recorded by every dataset and checkpoint.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from llmscale.errors import TokenizerError
from llmscale.log import get_logger, progress

log = get_logger(__name__)

MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"
META_FILE = "tokenizer_meta.json"
SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "cls": "<cls>", "sep": "<sep>",
                  "mask": "<mask>"}
SPECIAL_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "cls": 4, "sep": 5, "mask": 6}
NUM_SPECIAL = len(SPECIAL_IDS)
NUM_BYTES = 256
MODEL_TYPES = ("bpe", "unigram", "char")
DEFAULT_SAMPLE_BYTES = 64 << 20
# SentencePiece's whitespace meta symbol (U+2581): in text it is spelled with byte pieces (see encode).
META_SPACE = "\u2581"




class Tokenizer:
    """A loaded SentencePiece model with llmscale's fixed special ids."""

    def __init__(self, model_path: str | Path) -> None:
        import sentencepiece as spm

        self.path = Path(model_path)
        data = self.path.read_bytes()
        self.hash = hashlib.sha256(data).hexdigest()
        self.sp = spm.SentencePieceProcessor(model_proto=data)
        self.vocab_size = int(self.sp.get_piece_size())
        meta_path = self.path.parent / META_FILE
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
        self.model_type = meta.get("model_type", "unknown")
        self._meta_ids: Optional[list[int]] = None
        for name, i in SPECIAL_IDS.items():
            piece = self.sp.id_to_piece(i)
            if piece != SPECIAL_TOKENS[name]:
                raise TokenizerError(
                    f"{self.path} is not an llmscale tokenizer: id {i} is {piece!r}, "
                    f"expected {SPECIAL_TOKENS[name]!r}. "
                    f"Train one with `llmscale tokenizer train --input ... --output DIR --vocab-size N`.")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a tokenizer folder, a folder holding ``tokenizer/`` (a dataset), or the .model file."""
        p = Path(path)
        model = p / MODEL_FILE if p.is_dir() else p
        if p.is_dir() and not model.is_file() and (p / "tokenizer" / MODEL_FILE).is_file():
            model = p / "tokenizer" / MODEL_FILE  # a dataset or exported-model folder carrying its tokenizer
        if not model.is_file():
            raise TokenizerError(
                f"No tokenizer at {p} (expected {MODEL_FILE}). Train one with "
                f"`llmscale tokenizer train --input CORPUS --output {p} --vocab-size 8000`.")
        return cls(model)

    # ids
    pad_id = property(lambda self: SPECIAL_IDS["pad"])
    unk_id = property(lambda self: SPECIAL_IDS["unk"])
    bos_id = property(lambda self: SPECIAL_IDS["bos"])
    eos_id = property(lambda self: SPECIAL_IDS["eos"])
    cls_id = property(lambda self: SPECIAL_IDS["cls"])
    sep_id = property(lambda self: SPECIAL_IDS["sep"])
    mask_id = property(lambda self: SPECIAL_IDS["mask"])

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(SPECIAL_IDS)

    def encode(self, text: str) -> list[int]:
        if META_SPACE in text:
            return self._encode_with_meta(text)
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 1,
                     out_type: str = "list") -> list:
        """ids of each text: lists of ints, or int32 numpy arrays with ``out_type="numpy"`` (prepare's path)."""
        texts = list(texts)
        numpy = out_type == "numpy"
        out = self.sp.encode(texts, num_threads=num_threads, **({"out_type": "numpy"} if numpy else {}))
        for i, t in enumerate(texts):
            if META_SPACE in t:  # rare: the few texts holding U+2581 are re-encoded one by one
                ids = self._encode_with_meta(t)
                out[i] = np.asarray(ids, dtype=np.int32) if numpy else ids
        return out

    def _encode_with_meta(self, text: str) -> list[int]:
        # SentencePiece writes a space as U+2581 internally and decodes every U+2581 back to a space, so a
        # literal U+2581 in the text would come back as " ". Spell it with its three UTF-8 byte pieces
        # instead (the byte decoder yields the character itself); the text between is encoded as usual.
        if self._meta_ids is None:
            self._meta_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in META_SPACE.encode("utf-8")]
        out: list[int] = []
        for k, part in enumerate(text.split(META_SPACE)):
            if k:
                out.extend(self._meta_ids)
            if part:
                out.extend(self.sp.encode(part))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def save(self, output_dir: str | Path) -> Path:
        """Copy this tokenizer's folder (model, vocab, meta) to output_dir."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in (MODEL_FILE, VOCAB_FILE, META_FILE):
            src = self.path.parent / name
            if src.is_file():
                shutil.copyfile(src, out / name)
        if not (out / META_FILE).is_file():
            _write_meta(out, self.hash, self.vocab_size, self.model_type)
        return out

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, {self.model_type}, vocab_size={self.vocab_size}, hash={self.hash[:12]})"


# --------------------------------------------------------------------------- training


def _write_meta(out: Path, digest: str, vocab_size: int, model_type: str, extra: Optional[dict] = None) -> None:
    meta = {
        "hash": digest,
        "vocab_size": vocab_size,
        "model_type": model_type,
        "special_tokens": {name: {"id": SPECIAL_IDS[name], "piece": SPECIAL_TOKENS[name]} for name in SPECIAL_IDS},
        "normalization": "identity",
        "byte_fallback": True,
        "add_dummy_prefix": False,
        "remove_extra_whitespaces": False,
        **(extra or {}),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _sentences(text: str, max_bytes: int) -> Iterator[str]:
    """Cut a document at line ends into pieces of at most max_bytes UTF-8 bytes (SentencePiece trains
    on sentences and skips longer ones); a single longer line is cut at a character boundary."""
    if len(text) * 4 <= max_bytes or len(text.encode("utf-8")) <= max_bytes:
        yield text
        return
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if size + n > max_bytes and buf:
            yield "".join(buf)
            buf, size = [], 0
        while n > max_bytes:
            # max_bytes // 4 characters always fit in max_bytes bytes
            cut = max_bytes // 4
            yield line[:cut]
            line = line[cut:]
            n = len(line.encode("utf-8"))
        buf.append(line)
        size += n
    if buf:
        yield "".join(buf)


def _sample_sentences(
    inputs: Sequence[str | os.PathLike],
    *,
    sample_bytes: int,
    text_field: str,
    doc_split: str,
    max_sentence_bytes: int,
    seed: int,
    chars: Counter,
) -> list[str]:
    """A deterministic sample of about sample_bytes of training sentences, spread over the whole corpus."""
    from llmscale.data.sources import ReadStats, iter_document_records, resolve_inputs

    files = resolve_inputs(inputs)
    total = sum(f.stat().st_size * (4 if f.name.endswith(".gz") else 1) for f in files)
    keep = 1.0 if total <= sample_bytes else sample_bytes / total
    rng = random.Random(seed)
    out: list[str] = []
    taken = 0
    stats = ReadStats()
    docs = iter_document_records(inputs, text_field=text_field, doc_split=doc_split, stats=stats, files=files)
    for doc in progress(docs, desc="tokenizer sample", unit="doc"):
        for s in _sentences(doc.text, max_sentence_bytes):
            if keep < 1.0 and rng.random() >= keep:
                continue
            out.append(s)
            chars.update(s)
            taken += len(s.encode("utf-8"))
        if taken >= sample_bytes:
            break
    if not out:
        raise TokenizerError(
            f"No text to train a tokenizer on in {', '.join(map(str, inputs))} "
            f"(documents read: {stats.documents_read}, "
            f"skipped: {dict(stats.skipped)}). Check --input and --text-field.")
    log.info("tokenizer sample: %d sentences, %.1f MB of %.1f MB input, %d distinct characters",
             len(out), taken / 1e6, total / 1e6, len(chars))
    return out


def _explain(err: str, *, vocab_size: int, model_type: str, coverage: float) -> str:
    m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", err)
    if m:
        need = int(m.group(2))
        suggest = 1 << (need - 1).bit_length()
        lower = 0.995 if coverage > 0.995 else round(max(coverage - 0.02, 0.5), 3)
        return (f"--vocab-size {vocab_size} is too small for this corpus: its characters at "
                f"character_coverage={coverage} alone need {need} pieces (with the {NUM_SPECIAL} special and "
                f"{NUM_BYTES} byte pieces). Pass --vocab-size {suggest} or more, or lower --character-coverage "
                f"(e.g. {lower}: rarer characters are then spelled with byte pieces).")
    m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", err)
    if m:
        return (f"--vocab-size {vocab_size} is too large for this corpus: SentencePiece can learn at most "
                f"{m.group(2)} pieces from it. Pass --vocab-size {m.group(2)} or less, or give more text.")
    return (f"SentencePiece could not train a {model_type} model with vocab_size={vocab_size}: "
            f"{err.strip().splitlines()[-1]}")


def train_tokenizer(
    inputs: Sequence[str | os.PathLike] | str,
    output_dir: str | os.PathLike,
    *,
    vocab_size: Optional[int] = None,
    model_type: str = "bpe",
    sample_bytes: int = DEFAULT_SAMPLE_BYTES,
    character_coverage: Optional[float] = None,
    text_field: str = "text",
    doc_split: str = "chunk",
    max_sentence_bytes: int = 1 << 14,
    num_threads: Optional[int] = None,
    seed: int = 1234,
) -> Tokenizer:
    """Train a lossless SentencePiece tokenizer on (a sample of) ``inputs`` into ``output_dir``.

    ``vocab_size`` counts everything: 7 special + 256 byte pieces + learned pieces. For
    ``model_type="char"`` it may be omitted: the vocabulary is then every character of the sample.
    """
    import sentencepiece as spm

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if model_type not in MODEL_TYPES:
        raise TokenizerError(f"--model-type {model_type!r} is unknown; choose one of {', '.join(MODEL_TYPES)}.")
    base = NUM_SPECIAL + NUM_BYTES
    if vocab_size is None and model_type != "char":
        raise TokenizerError(f"--vocab-size is required for --model-type {model_type} (e.g. 8000; must exceed {base}).")
    if vocab_size is not None and vocab_size <= base:
        raise TokenizerError(
            f"--vocab-size {vocab_size} leaves no room for text pieces: {NUM_SPECIAL} special and {NUM_BYTES} byte "
            f"pieces come first. Pass --vocab-size {base + 64} or more (char models: omit it).")
    coverage = character_coverage if character_coverage is not None else (1.0 if model_type == "char" else 0.9995)
    chars: Counter = Counter()
    sentences = _sample_sentences(inputs, sample_bytes=sample_bytes, text_field=text_field, doc_split=doc_split,
                                  max_sentence_bytes=max_sentence_bytes, seed=seed, chars=chars)
    if model_type == "char":
        # Characters SentencePiece would keep at this coverage (most frequent first).
        total = sum(chars.values())
        kept, acc = 0, 0
        for _, c in chars.most_common():
            if acc >= coverage * total and kept:
                break
            acc += c
            kept += 1
        natural = base + kept
        if vocab_size is None:
            vocab_size = natural
        elif vocab_size != natural:
            if vocab_size > natural:
                log.warning("char model: the corpus has %d characters, so the vocabulary is %d (%d special + %d byte + "
                            "%d characters), not the requested %d. Pass --vocab-size %d or omit it.",
                            kept, natural, NUM_SPECIAL, NUM_BYTES, kept, vocab_size, natural)
                vocab_size = natural
            else:
                log.warning("char model: --vocab-size %d keeps only the %d most frequent of %d characters; the others "
                            "are spelled with byte pieces. Omit --vocab-size (or pass %d) to keep every character.",
                            vocab_size, vocab_size - base, kept, natural)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    threads = num_threads or min(os.cpu_count() or 1, 16)
    trainer_args = dict(
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        split_by_whitespace=True,
        split_digits=False,
        allow_whitespace_only_pieces=True,
        max_sentence_length=max_sentence_bytes,
        max_sentencepiece_length=16,
        input_sentence_size=0,  # the sample is already bounded by sample_bytes
        shuffle_input_sentence=False,
        pad_id=SPECIAL_IDS["pad"], unk_id=SPECIAL_IDS["unk"], bos_id=SPECIAL_IDS["bos"], eos_id=SPECIAL_IDS["eos"],
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        # control symbols, not user-defined ones: the text "<mask>" in a document stays text and never
        # becomes the mask id (user-defined symbols are matched inside the input).
        control_symbols=[SPECIAL_TOKENS["cls"], SPECIAL_TOKENS["sep"], SPECIAL_TOKENS["mask"]],
        hard_vocab_limit=model_type != "char",
        num_threads=threads,
        minloglevel=2,
    )
    log.info("training a %s tokenizer, vocab_size=%d, character_coverage=%s on %d sentences",
             model_type, vocab_size, coverage, len(sentences))
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **trainer_args)
    except RuntimeError as e:
        raise TokenizerError(_explain(str(e), vocab_size=vocab_size, model_type=model_type,
                                      coverage=coverage)) from None
    data = model.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=data)
    # vocab and meta first, the model last (atomically): a folder whose model loads is complete
    (out / MODEL_FILE).unlink(missing_ok=True)
    with open(out / VOCAB_FILE, "w", encoding="utf-8") as f:
        for i in range(sp.get_piece_size()):
            f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n")
    digest = hashlib.sha256(data).hexdigest()
    _write_meta(out, digest, sp.get_piece_size(), model_type, {
        "character_coverage": coverage,
        "trained_on": [str(i) for i in inputs],
        "sample_sentences": len(sentences),
    })
    tmp = out / (MODEL_FILE + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MODEL_FILE)
    tok = Tokenizer.load(out)
    log.info("tokenizer written to %s: %s", out, tok)
    return tok
