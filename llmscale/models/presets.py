"""Named model presets: ModelConfig field values (family included), merged under the user's own fields.

Presets never fix ``vocab_size``: the vocabulary comes from the dataset's tokenizer (``build_model(cfg,
vocab_size=...)``). :data:`REFERENCE_VOCAB` records the vocabulary each preset was published with, which the
parameter-count checks and ``llmscale bench model`` use.

Shapes: GPT-2 from Radford et al. 2019 (GPT-2 uses the tanh-approximated GELU, learned positions, biases and
tied embeddings); ``llama-1b`` is TinyLlama-1.1B's shape (22 layers, width 2048, 32 query / 4 key-value heads,
SwiGLU 5632, RoPE, RMSNorm, untied); BERT tiny..large from Turc et al. 2019 / Devlin et al. 2019 (post-norm,
exact GELU, LayerNorm eps 1e-12, 512 positions, 2 token types).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

_GPT2 = dict(family="gpt", norm="layernorm", norm_eps=1e-5, position="learned", activation="gelu", bias=True,
             tie_embeddings=True, norm_position="pre", max_seq_len=1024, dropout=0.0)
_LLAMA = dict(family="gpt", norm="rmsnorm", norm_eps=1e-5, position="rope", rope_theta=10000.0, activation="swiglu",
              bias=False, tie_embeddings=False, norm_position="pre", dropout=0.0)
_BERT = dict(family="bert", norm="layernorm", norm_eps=1e-12, position="learned", activation="gelu", bias=True,
             tie_embeddings=True, norm_position="post", max_seq_len=512, type_vocab_size=2, dropout=0.1)


def _bert(layers: int, width: int, heads: int) -> dict:
    return dict(_BERT, n_layers=layers, d_model=width, n_heads=heads, d_ff=4 * width)


PRESETS: dict[str, dict] = {
    # GPT-2 family (published sizes with vocab 50257 and 1024 positions)
    "gpt2-124m": dict(_GPT2, n_layers=12, d_model=768, n_heads=12),
    "gpt2-350m": dict(_GPT2, n_layers=24, d_model=1024, n_heads=16),
    "gpt2-774m": dict(_GPT2, n_layers=36, d_model=1280, n_heads=20),
    "gpt2-1.5b": dict(_GPT2, n_layers=48, d_model=1600, n_heads=25),
    # Llama-style ~1.1B (TinyLlama shape)
    "llama-1b": dict(_LLAMA, n_layers=22, d_model=2048, n_heads=32, n_kv_heads=4, d_ff=5632, max_seq_len=2048),
    # tiny presets that train in seconds to minutes on a CPU
    "gpt-tiny": dict(_GPT2, n_layers=2, d_model=64, n_heads=4, max_seq_len=256),
    "gpt-char": dict(_GPT2, n_layers=4, d_model=128, n_heads=4, max_seq_len=256),
    "llama-tiny": dict(_LLAMA, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=192, max_seq_len=256),
    "bert-tiny-cpu": dict(_bert(2, 64, 2), max_seq_len=128, dropout=0.0),
    "lstm-tiny": dict(family="lstm", n_layers=2, d_model=128, n_heads=1, bias=True, tie_embeddings=True,
                      max_seq_len=256, dropout=0.0),
    # BERT family (Turc et al. 2019 compact models + the originals)
    "bert-tiny": _bert(2, 128, 2),
    "bert-mini": _bert(4, 256, 4),
    "bert-small": _bert(4, 512, 8),
    "bert-medium": _bert(8, 512, 8),
    "bert-base": _bert(12, 768, 12),
    "bert-large": _bert(24, 1024, 16),
}

# Presets of classifier-only families (model.family=bilstm): `model.preset` accepts them like the others, but
# they are kept out of PRESETS because build_model (a language model) cannot build them; build them with
# llmscale.models.classify.SequenceClassifier.from_config. bilstm-imdb: 300-wide embeddings, one bidirectional
# layer of 150 units each way (300 out), additive self-attention over the sequence (Lin et al. 2017's shape).
CLASSIFIER_PRESETS: dict[str, dict] = {
    "bilstm-imdb": dict(family="bilstm", n_layers=1, d_model=300, n_heads=1, bias=True, tie_embeddings=False,
                        max_seq_len=512, dropout=0.1),
}

# The vocabulary each preset is usually quoted with (parameter counts, benchmarks). Not applied by presets.
REFERENCE_VOCAB: dict[str, int] = {
    **{k: 50257 for k in PRESETS if k.startswith("gpt2-")},
    "llama-1b": 32000,
    **{k: 30522 for k in PRESETS if k.startswith("bert-") and k != "bert-tiny-cpu"},
    "gpt-tiny": 512, "gpt-char": 128, "llama-tiny": 512, "bert-tiny-cpu": 512, "lstm-tiny": 128,
}


def default_d_ff(d_model: int, activation: str) -> int:
    """4*d_model for GELU; for SwiGLU the multiple of 256 at or above 8/3*d_model (same parameter count as a
    4x GELU MLP, rounded for matmul efficiency: 2048 -> 5632 as in TinyLlama)."""
    if activation == "swiglu":
        return 256 * math.ceil(8 * d_model / 3 / 256)
    return 4 * d_model


def resolve_config(cfg: Any, vocab_size: Optional[int] = None) -> Any:
    """The ModelConfig a model is built from: vocab_size, d_ff and n_kv_heads filled in, checked. (``cfg`` is
    an :class:`llmscale.config.ModelConfig`; not imported here, because config.py imports the presets.)

    ``vocab_size`` is the dataset tokenizer's. An explicit ``model.vocab_size`` wins when it is at least as
    large (padding the vocabulary, e.g. to a multiple of 64, is allowed); a smaller one cannot embed every id."""
    from llmscale.errors import ConfigError

    vocab = cfg.vocab_size
    if vocab is None:
        vocab = vocab_size
    elif vocab_size is not None and vocab < vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab} is smaller than the dataset tokenizer's vocabulary ({vocab_size}): remove "
            f"model.vocab_size (it defaults to the tokenizer's) or set it >= {vocab_size}.")
    if vocab is None or vocab < 1:
        raise ConfigError(
            "model.vocab_size is unknown: set model.vocab_size or build the model with the dataset's tokenizer "
            "vocabulary (build_model(cfg, vocab_size=tokenizer.vocab_size)).")
    return dataclasses.replace(
        cfg,
        vocab_size=int(vocab),
        d_ff=cfg.d_ff or default_d_ff(cfg.d_model, cfg.activation),
        n_kv_heads=cfg.n_kv_heads or cfg.n_heads,
    )
