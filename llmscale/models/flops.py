"""Closed-form parameter counts and training FLOPs per token, for every family, from a resolved ModelConfig.

Notation: V vocab, C d_model, L layers, nh heads, nkv key/value heads, hd = C/nh, F d_ff, P max_seq_len,
T the training sequence length, b = 1 if biases else 0, n = norm parameters (2C LayerNorm with bias, C
otherwise).

Parameters (each tied weight once):
  attention per block  = C*nh*hd + 2*C*nkv*hd + nh*hd*C        + b*(nh*hd + 2*nkv*hd + C)
  MLP per block        = 2*C*F (GELU) | 3*C*F (SwiGLU)          + b*(F + C) | b*(2F + C)
  block                = attention + MLP + 2n
  GPT   = V*C + [P*C learned positions] + L*block + n + [V*C untied head]
  BERT  = V*C + P*C + types*C + n (embedding norm, post-norm; pre-norm: final norm instead) + L*block
          + MLM head (C*C + b*C + n + V [decoder bias] + [V*C untied]) + NSP (C*C + b*C + 2C + 2b)
  LSTM  = V*C + L*(8*C*C + 8*b*C) + [V*C untied head]

Training FLOPs per token (forward + backward = 3 x forward, a multiply-add = 2 FLOPs):
  6 * M + 12 * L * nh * hd * T
where M is the number of weights in matrix multiplications a token goes through (every q/k/v/o/MLP matrix,
the output head V*C even when tied; BERT also its MLM transform C*C and, per sequence, the pooler and NSP
classifier (C*C + 2C)/T; LSTM 8*C*C per layer), and 12*L*nh*hd*T counts the attention scores QK^T and the
weighted sum AV over the *full* T x T matrix (PaLM's convention, also nanoGPT's MFU): causal masking is not
halved, so MFU figures are comparable with PaLM/Megatron reports. Embedding lookups, norms, biases, softmax
and activations are not counted (they are not matmuls).

Classifiers (:func:`classifier_flops_per_token`): the backbone's blocks without any LM head, plus per
sequence the pooler (C*C, cls_pooler and attention) and classifier (K*C), divided by T; the BiLSTM's matmuls
per token are 8*H*(C + H) per layer (two directions, 4 gates, H = C/2 units, input C) and its attention
projection C*C + C, with no T x T term.
"""
from __future__ import annotations


def _norm(cfg) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" and cfg.bias else 1)


def _block_matmul(cfg) -> int:
    C, nh, nkv, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.d_ff
    hd = C // nh
    attn = C * nh * hd + 2 * C * nkv * hd + nh * hd * C
    mlp = (3 if cfg.activation == "swiglu" else 2) * C * F
    return attn + mlp


def _block_params(cfg) -> int:
    C, nh, nkv, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads, cfg.d_ff
    hd = C // nh
    b = int(cfg.bias)
    biases = b * (nh * hd + 2 * nkv * hd + C) + b * ((2 if cfg.activation == "swiglu" else 1) * F + C)
    return _block_matmul(cfg) + biases + 2 * _norm(cfg)


def param_count(cfg) -> int:
    """Exact parameter count of the model ``build_model(cfg)`` makes (cfg resolved: vocab_size, d_ff set)."""
    V, C, L = cfg.vocab_size, cfg.d_model, cfg.n_layers
    b = int(cfg.bias)
    untied = 0 if cfg.tie_embeddings else V * C
    if cfg.family == "lstm":
        return V * C + L * (8 * C * C + 8 * b * C) + untied
    if cfg.family == "gpt":
        pos = cfg.max_seq_len * C if cfg.position == "learned" else 0
        return V * C + pos + L * _block_params(cfg) + _norm(cfg) + untied
    # bert
    emb = V * C + cfg.max_seq_len * C + cfg.type_vocab_size * C + _norm(cfg)  # embed norm or final norm
    mlm = C * C + b * C + _norm(cfg) + V + untied
    nsp = (C * C + b * C + 2 * C + 2 * b) if cfg.nsp_head else 0
    return emb + L * _block_params(cfg) + mlm + nsp


def embedding_count(cfg) -> int:
    """Parameters in nn.Embedding tables (token, position, token type): num_params(exclude_embeddings=True)
    is param_count - embedding_count."""
    V, C = cfg.vocab_size, cfg.d_model
    if cfg.family == "lstm":
        return V * C
    if cfg.family == "gpt":
        return V * C + (cfg.max_seq_len * C if cfg.position == "learned" else 0)
    return V * C + cfg.max_seq_len * C + cfg.type_vocab_size * C


def matmul_weights_per_token(cfg, seq_len: int) -> float:
    """M of the module docstring: weights each token is multiplied by (forward)."""
    V, C, L = cfg.vocab_size, cfg.d_model, cfg.n_layers
    if cfg.family == "lstm":
        return L * 8 * C * C + V * C
    m = L * _block_matmul(cfg) + V * C
    if cfg.family == "bert":
        m += C * C
        if cfg.nsp_head:
            m += (C * C + 2 * C) / seq_len
    return float(m)


def attention_flops_per_token(cfg, seq_len: int) -> float:
    """Forward+backward FLOPs of QK^T and AV per token over the full (not causal-halved) T x T matrix."""
    if cfg.family in ("lstm", "bilstm"):
        return 0.0
    hd = cfg.d_model // cfg.n_heads
    return 12.0 * cfg.n_layers * cfg.n_heads * hd * seq_len


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 * M + 12 * L * nh * hd * T (see the module docstring)."""
    return 6.0 * matmul_weights_per_token(cfg, seq_len) + attention_flops_per_token(cfg, seq_len)


def classifier_flops_per_token(cfg, seq_len: int, *, num_labels: int, pooling: str) -> float:
    """Training FLOPs per token of a SequenceClassifier (see the module docstring)."""
    C, L = cfg.d_model, cfg.n_layers
    if cfg.family == "bilstm":
        H = C // 2
        m = L * 8 * H * (C + H) + C * C + C
    else:
        m = L * _block_matmul(cfg)
    head = (C * C if pooling in ("cls_pooler", "attention") else 0) + num_labels * C
    return 6.0 * (m + head / seq_len) + attention_flops_per_token(cfg, seq_len)
