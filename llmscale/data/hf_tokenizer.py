"""Write an llmscale SentencePiece tokenizer as Hugging Face ``tokenizers``/``transformers`` files.

    write_hf_tokenizer("tok/", "export/", kind="gpt")     # tokenizer.json + tokenizer_config.json + ...
    AutoTokenizer.from_pretrained("export/")               # offline; same ids as Tokenizer.load("tok/")

The SentencePiece model is rebuilt piece by piece as a ``tokenizers`` pipeline that does exactly
what llmscale's trainer options ask of SentencePiece (see llmscale/data/tokenizer.py):

- normalizer: only ``" " -> "▁"`` (identity normalisation, no dummy prefix, extra spaces kept);
- no pre-tokenizer: SentencePiece segments the whole escaped string, so does ours;
- model: ``bpe`` -> a byte-fallback BPE whose merges are every split of every learned piece into two
  pieces, ranked by the merged piece's score (SentencePiece merges the adjacent pair whose result
  scores highest, leftmost first; a BPE with these ranks makes the same choices); ``unigram`` -> a
  byte-fallback Unigram with the same scores (same Viterbi); ``char`` -> a BPE without merges.
  One known difference, unigram only: the tokenizers Unigram matches every vocabulary string, so the
  literal text of a special or byte piece ("<mask>", "<0x41>") inside a document becomes that id in
  transformers, while SentencePiece spells it with ordinary pieces. BPE (the default) and char models
  are exact for all text;
- the special pieces ``<pad> <unk> <s> </s> <cls> <sep> <mask>`` are SentencePiece control symbols: their
  text inside a document is spelled with ordinary pieces. GPT exports do the same
  (``split_special_tokens``), so their ids equal llmscale's for every text. BERT exports follow the
  transformers convention instead: "<mask>" written in the text is the mask id (what fill-mask needs);
  set ``tokenizer.split_special_tokens = True`` for llmscale's spelling. Either way they are special
  tokens that templates insert by id and ``skip_special_tokens`` drops;
- decoder: ``"▁" -> " "``, byte pieces -> UTF-8 (``ByteFallback`` + ``Fuse``), no prefix stripping.

The file declares the generic ``TokenizersBackend`` class, which loads tokenizer.json as written
(model-specific classes such as LlamaTokenizer rebuild their own pipeline and would add a dummy
prefix). GPT exports add no special tokens when encoding (llmscale's GPT data has none but the eos
between documents); BERT exports wrap text as ``<cls> A <sep> [B <sep>]`` with token types 0/1, as
llmscale's BERT batches are built; pass ``add_special_tokens=False`` for the bare ids.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from llmscale.data.tokenizer import SPECIAL_IDS, SPECIAL_TOKENS, Tokenizer, TokenizerError
from llmscale.log import get_logger

log = get_logger(__name__)

# sentencepiece_model.proto ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# ModelProto.TrainerSpec.ModelType
_SPM_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


def _proto(tok: Tokenizer):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(tok.path.read_bytes())
    return m


def _check_options(m, path: Path) -> str:
    """The SentencePiece options this conversion reproduces exactly; anything else is refused."""
    model_type = _SPM_TYPES.get(m.trainer_spec.model_type, str(m.trainer_spec.model_type))
    problems = []
    if model_type not in ("bpe", "unigram", "char"):
        problems.append(f"model_type={model_type}")
    ns = m.normalizer_spec
    if ns.precompiled_charsmap or ns.name not in ("identity", ""):
        problems.append(f"normalization={ns.name!r} (not identity)")
    if ns.add_dummy_prefix:
        problems.append("add_dummy_prefix=true")
    if ns.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces=true")
    if not ns.escape_whitespaces:
        problems.append("escape_whitespaces=false")
    if not m.trainer_spec.byte_fallback:
        problems.append("byte_fallback=false")
    if m.trainer_spec.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix=true")
    if problems:
        raise TokenizerError(
            f"{path} cannot be converted to an equivalent Hugging Face tokenizer: {', '.join(problems)}. "
            f"Train an llmscale tokenizer with `llmscale tokenizer train --input ... --output DIR --vocab-size N`.")
    return model_type


def _bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """Every (left, right) with left+right a learned piece, both halves pieces, best merged score first."""
    normal = {p for p, _, t in pieces if t == _NORMAL}
    ranked = []
    for i, (piece, score, typ) in enumerate(pieces):
        if typ != _NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_hf_tokenizer(tok: Tokenizer, *, kind: Literal["gpt", "bert"] = "gpt"):
    """A ``tokenizers.Tokenizer`` giving the same ids as ``tok.encode`` and decoding them losslessly."""
    from tokenizers import AddedToken, decoders, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE, Unigram

    m = _proto(tok)
    model_type = _check_options(m, tok.path)
    pieces = [(p.piece, float(p.score), int(p.type)) for p in m.pieces]
    unk = SPECIAL_TOKENS["unk"]
    if model_type == "unigram":
        model = Unigram([(p, s) for p, s, _ in pieces], unk_id=SPECIAL_IDS["unk"], byte_fallback=True)
    else:
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        merges = _bpe_merges(pieces) if model_type == "bpe" else []
        model = BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None)
    hf = HFTokenizer(model)
    hf.normalizer = normalizers.Replace(" ", "▁")
    hf.pre_tokenizer = None
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # llmscale's special pieces are SentencePiece control symbols: the text "<mask>" in a document is spelled
    # with ordinary pieces, never turned into the mask id. transformers registers every named special token
    # as an added token matched in text, so for GPT matching is switched off (encode_special_tokens /
    # split_special_tokens); the ids stay known, so templates and skip_special_tokens work. BERT keeps
    # transformers' convention (text "<mask>" -> mask id) for fill-mask. A user-defined symbol (matched in
    # text by SentencePiece) would stay a normal added token.
    specials = [AddedToken(p, special=True, normalized=False) for p, _, t in pieces if t in (_CONTROL, _UNKNOWN)]
    hf.add_special_tokens(specials)
    hf.add_tokens([AddedToken(p, special=False, normalized=False) for p, _, t in pieces if t == _USER_DEFINED])
    hf.encode_special_tokens = kind != "bert"
    if kind == "bert":
        cls, sep = SPECIAL_TOKENS["cls"], SPECIAL_TOKENS["sep"]
        hf.post_processor = processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0",
            pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, SPECIAL_IDS["cls"]), (sep, SPECIAL_IDS["sep"])],
        )
    return hf


def write_hf_tokenizer(tokenizer: Tokenizer | str | Path, out_dir: str | Path, *,
                       kind: Literal["gpt", "bert"] = "gpt", model_max_length: int | None = None) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out_dir``."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = build_hf_tokenizer(tok, kind=kind)
    hf.save(str(out / "tokenizer.json"))
    special = {
        "bos_token": SPECIAL_TOKENS["bos"], "eos_token": SPECIAL_TOKENS["eos"], "unk_token": SPECIAL_TOKENS["unk"],
        "pad_token": SPECIAL_TOKENS["pad"], "cls_token": SPECIAL_TOKENS["cls"], "sep_token": SPECIAL_TOKENS["sep"],
        "mask_token": SPECIAL_TOKENS["mask"],
    }
    config = {
        "tokenizer_class": "TokenizersBackend",
        **special,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": kind != "bert",
        "model_max_length": model_max_length or 1_000_000_000_000_000_019_884_624_838_656,
        "llmscale_tokenizer_hash": tok.hash,
    }
    if kind == "bert":
        config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    log.info("wrote Hugging Face tokenizer files (%s, %d pieces) to %s", tok.model_type, tok.vocab_size, out)
    return out
