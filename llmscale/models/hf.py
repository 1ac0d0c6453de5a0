"""Hugging Face transformers interoperability: llmscale models <-> GPT2 / Llama / BERT folders.

    export_model(model, cfg, "tok/", "out/")          # out/ loads with AutoModelForCausalLM/MaskedLM + AutoTokenizer
    model, cfg = load_model_folder("out/")             # back into llmscale (any folder export_model wrote)
    import_hf_folder("hf_gpt2/", "out/")               # a transformers GPT2/Llama/BERT folder -> llmscale model folder

Which transformers class expresses which ModelConfig (exactly — anything else raises ExportError):

    GPT2LMHeadModel   family=gpt, layernorm, learned positions, tanh-GELU, biases on, pre-norm, no GQA (tied or not)
    LlamaForCausalLM  family=gpt, rmsnorm, rope, SwiGLU, pre-norm (GQA allowed; biases on -> attention_bias and
                      mlp_bias both true)
    BertForMaskedLM   family=bert, layernorm, learned positions, exact GELU, biases on, post-norm, no GQA
    BertForPreTraining  the same with the next-sentence-prediction head (pooler + seq_relationship); its folder
                      also loads with AutoModelForMaskedLM (which ignores the NSP weights)

Untied BERT: transformers then keeps two output biases (``cls.predictions.decoder.bias``, used, and
``cls.predictions.bias``, unused); both are written with llmscale's bias, so its parameter count is ours + V.

A *model folder* is what export_model writes:

    config.json, generation_config.json, model.safetensors      the transformers model (HF parameter names)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   the transformers tokenizer
    llmscale_config.json                                        the resolved ModelConfig (exact round trip)
    tokenizer/                                                  the llmscale SentencePiece tokenizer folder

Weights are safetensors only: pickle files (pytorch_model.bin) can run code when loaded and are refused.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from llmscale.errors import ExportError
from llmscale.log import get_logger

log = get_logger(__name__)

LLMSCALE_CONFIG = "llmscale_config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_SUBDIR = "tokenizer"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                      "merges.txt", "vocab.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
# tanh-approximated GELU under its transformers names (all compute 0.5x(1+tanh(sqrt(2/pi)(x+0.044715x^3))))
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")




# --------------------------------------------------------------------------- which HF class


def _mismatches(cfg, want: dict[str, Any]) -> list[str]:
    out = []
    for key, value in want.items():
        have = getattr(cfg, key)
        if callable(value):
            ok, text = value(have)
            if not ok:
                out.append(f"{key}={have!r} ({text})")
        elif have != value:
            out.append(f"{key}={have!r} (needs {value!r})")
    return out


def _no_gqa(cfg) -> tuple[bool, str]:
    return (cfg.n_kv_heads in (None, cfg.n_heads), "no grouped-query attention: n_kv_heads must equal n_heads")


def hf_architecture(cfg) -> str:
    """The transformers class that computes exactly what ``cfg`` does, or ExportError naming the differences."""
    if cfg.family == "gpt":
        candidates = {
            "GPT2LMHeadModel": dict(norm="layernorm", position="learned", activation="gelu", bias=True,
                                    norm_position="pre"),
            "LlamaForCausalLM": dict(norm="rmsnorm", position="rope", activation="swiglu", norm_position="pre"),
        }
        gqa = {"GPT2LMHeadModel": _no_gqa(cfg)}
    elif cfg.family == "bert":
        arch = "BertForPreTraining" if cfg.nsp_head else "BertForMaskedLM"
        candidates = {arch: dict(norm="layernorm", position="learned", activation="gelu", bias=True,
                                 norm_position="post")}
        gqa = {arch: _no_gqa(cfg)}
    else:
        raise ExportError(
            f"model.family={cfg.family!r} has no transformers equivalent (only gpt and bert export). "
            f"Use `llmscale generate` / `llmscale eval` on the checkpoint itself.")
    problems = {}
    for arch, want in candidates.items():
        diff = _mismatches(cfg, want)
        if arch in gqa and not gqa[arch][0]:
            diff.append(f"n_kv_heads={cfg.n_kv_heads} ({gqa[arch][1]})")
        if not diff:
            return arch
        problems[arch] = diff
    detail = "; ".join(f"{arch} would need {', '.join(d)}" for arch, d in problems.items())
    raise ExportError(
        f"this {cfg.family} model cannot be written exactly as a transformers model: {detail}. "
        f"Export refuses to approximate; train with a preset of an exportable family "
        f"(gpt2-*, llama-*, bert-*) or keep using the llmscale checkpoint.")


# --------------------------------------------------------------------------- configs


def _special_ids() -> dict[str, int]:
    from llmscale.data.tokenizer import SPECIAL_IDS

    return SPECIAL_IDS


def hf_config(cfg, *, token_ids: Optional[dict[str, Optional[int]]] = None):
    """The transformers config object for a resolved ModelConfig (after :func:`hf_architecture` accepts it).
    ``token_ids`` ({"pad", "bos", "eos"}) default to llmscale's tokenizer ids."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    arch = hf_architecture(cfg)
    sp = {**_special_ids(), **(token_ids or {})}
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
                  architectures=[arch], pad_token_id=sp["pad"], bos_token_id=sp["bos"], eos_token_id=sp["eos"])
    if arch == "GPT2LMHeadModel":
        return GPT2Config(
            n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff, n_positions=cfg.max_seq_len,
            activation_function="gelu_pytorch_tanh", layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, **common)
    if arch == "LlamaForCausalLM":
        return LlamaConfig(
            hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads or cfg.n_heads, head_dim=cfg.d_model // cfg.n_heads,
            intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
            hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
            attention_bias=cfg.bias, mlp_bias=cfg.bias, attention_dropout=cfg.dropout, **common)
    return BertConfig(
        hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.type_vocab_size,
        hidden_act="gelu", layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout, **{**common, "bos_token_id": None, "eos_token_id": None})


def _refuse(problems: list[str], folder: Path, model_type: str) -> None:
    if problems:
        raise ExportError(
            f"{folder}: this {model_type} model uses {'; '.join(problems)}, which llmscale's models do not compute "
            f"exactly, so it is not imported. Import refuses to approximate.")


def model_config_from_hf(hf_cfg: dict, *, folder: Path = Path("."), nsp_head: bool = False):
    """The llmscale ModelConfig computing exactly what a GPT2 / Llama / BERT config.json describes."""
    from llmscale.config import ModelConfig

    model_type = hf_cfg.get("model_type")
    tie = bool(hf_cfg.get("tie_word_embeddings", True))
    problems: list[str] = []
    if model_type == "gpt2":
        act = hf_cfg.get("activation_function", "gelu_new")
        if act not in _TANH_GELU:
            problems.append(f"activation_function={act!r} (llmscale's GPT MLP is the tanh GELU: gelu_new)")
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
            if bool(hf_cfg.get(key, ok)) != ok:
                problems.append(f"{key}={hf_cfg.get(key)}")
        _refuse(problems, folder, model_type)
        d = hf_cfg["n_embd"]
        fields = dict(family="gpt", n_layers=hf_cfg["n_layer"], d_model=d, n_heads=hf_cfg["n_head"],
                      n_kv_heads=hf_cfg["n_head"], d_ff=hf_cfg.get("n_inner") or 4 * d, vocab_size=hf_cfg["vocab_size"],
                      max_seq_len=hf_cfg["n_positions"], norm="layernorm",
                      norm_eps=hf_cfg.get("layer_norm_epsilon", 1e-5),
                      position="learned", activation="gelu", bias=True, tie_embeddings=tie, norm_position="pre",
                      dropout=float(hf_cfg.get("resid_pdrop", 0.0)))
    elif model_type == "llama":
        rope = hf_cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", hf_cfg.get("rope_theta", 10000.0))
        scaling = hf_cfg.get("rope_scaling")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
            problems.append(f"rope scaling {scaling or rope} (llmscale implements plain RoPE only)")
        if hf_cfg.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={hf_cfg.get('hidden_act')!r} (llmscale's SwiGLU uses silu)")
        d, nh = hf_cfg["hidden_size"], hf_cfg["num_attention_heads"]
        if hf_cfg.get("head_dim") not in (None, d // nh):
            problems.append(f"head_dim={hf_cfg['head_dim']} != hidden_size/num_attention_heads={d // nh}")
        ab, mb = bool(hf_cfg.get("attention_bias", False)), bool(hf_cfg.get("mlp_bias", False))
        if ab != mb:
            problems.append(f"attention_bias={ab} with mlp_bias={mb} (llmscale's `bias` switches both)")
        if hf_cfg.get("pretraining_tp", 1) not in (1, None):
            problems.append(f"pretraining_tp={hf_cfg['pretraining_tp']}")
        _refuse(problems, folder, model_type)
        fields = dict(family="gpt", n_layers=hf_cfg["num_hidden_layers"], d_model=d, n_heads=nh,
                      n_kv_heads=hf_cfg.get("num_key_value_heads") or nh, d_ff=hf_cfg["intermediate_size"],
                      vocab_size=hf_cfg["vocab_size"], max_seq_len=hf_cfg["max_position_embeddings"], norm="rmsnorm",
                      norm_eps=hf_cfg.get("rms_norm_eps", 1e-6), position="rope", rope_theta=float(theta),
                      activation="swiglu", bias=ab, tie_embeddings=bool(hf_cfg.get("tie_word_embeddings", False)),
                      norm_position="pre", dropout=float(hf_cfg.get("attention_dropout", 0.0)))
    elif model_type == "bert":
        if hf_cfg.get("hidden_act", "gelu") != "gelu":
            problems.append(f"hidden_act={hf_cfg.get('hidden_act')!r} (llmscale's BERT MLP is the exact GELU)")
        if hf_cfg.get("position_embedding_type", "absolute") != "absolute":
            problems.append(f"position_embedding_type={hf_cfg['position_embedding_type']!r}")
        if hf_cfg.get("is_decoder") or hf_cfg.get("add_cross_attention"):
            problems.append("a decoder / cross-attention BERT")
        _refuse(problems, folder, model_type)
        d = hf_cfg["hidden_size"]
        fields = dict(family="bert", n_layers=hf_cfg["num_hidden_layers"], d_model=d,
                      n_heads=hf_cfg["num_attention_heads"], n_kv_heads=hf_cfg["num_attention_heads"],
                      d_ff=hf_cfg["intermediate_size"], vocab_size=hf_cfg["vocab_size"],
                      max_seq_len=hf_cfg["max_position_embeddings"], norm="layernorm",
                      norm_eps=hf_cfg.get("layer_norm_eps", 1e-12), position="learned", activation="gelu", bias=True,
                      tie_embeddings=tie, norm_position="post", type_vocab_size=hf_cfg.get("type_vocab_size", 2),
                      nsp_head=nsp_head, dropout=float(hf_cfg.get("hidden_dropout_prob", 0.0)))
    else:
        raise ExportError(
            f"{folder}: model_type={model_type!r} is not importable; llmscale imports gpt2, llama and bert folders.")
    if "initializer_range" in hf_cfg:
        fields["init_std"] = float(hf_cfg["initializer_range"])
    from llmscale.config import from_dict

    return from_dict(ModelConfig, fields)


# --------------------------------------------------------------------------- weights


def _layer_pairs(cfg, arch: str, *, heads: bool = True) -> list[tuple[str, str, bool]]:
    """(llmscale name, HF name, transpose) for every 1:1 tensor (GPT-2's fused c_attn is handled apart);
    ``heads=False``: the backbone only (no LM / MLM / NSP head), as sequence classifiers use it."""
    pairs: list[tuple[str, str, bool]] = []
    bias = ("weight", "bias")
    if arch == "GPT2LMHeadModel":
        pairs += [("tok_embed.weight", "transformer.wte.weight", False),
                  ("pos_embed.weight", "transformer.wpe.weight", False)]
        for i in range(cfg.n_layers):
            ls, hf = f"blocks.{i}.", f"transformer.h.{i}."
            for p in bias:
                pairs += [(ls + f"attn_norm.{p}", hf + f"ln_1.{p}", False),
                          (ls + f"mlp_norm.{p}", hf + f"ln_2.{p}", False),
                          (ls + f"attn.o_proj.{p}", hf + f"attn.c_proj.{p}", p == "weight"),
                          (ls + f"mlp.up_proj.{p}", hf + f"mlp.c_fc.{p}", p == "weight"),
                          (ls + f"mlp.down_proj.{p}", hf + f"mlp.c_proj.{p}", p == "weight")]
        pairs += [(f"final_norm.{p}", f"transformer.ln_f.{p}", False) for p in bias]
        if heads and not cfg.tie_embeddings:
            pairs.append(("lm_head.weight", "lm_head.weight", False))
    elif arch == "LlamaForCausalLM":
        pairs.append(("tok_embed.weight", "model.embed_tokens.weight", False))
        lin = [p for p in bias if p == "weight" or cfg.bias]
        for i in range(cfg.n_layers):
            ls, hf = f"blocks.{i}.", f"model.layers.{i}."
            pairs += [(ls + "attn_norm.weight", hf + "input_layernorm.weight", False),
                      (ls + "mlp_norm.weight", hf + "post_attention_layernorm.weight", False)]
            for p in lin:
                pairs += [(ls + f"attn.{n}_proj.{p}", hf + f"self_attn.{n}_proj.{p}", False) for n in "qkvo"]
                pairs += [(ls + f"mlp.{n}_proj.{p}", hf + f"mlp.{n}_proj.{p}", False) for n in ("gate", "up", "down")]
        pairs.append(("final_norm.weight", "model.norm.weight", False))
        if heads and not cfg.tie_embeddings:
            pairs.append(("lm_head.weight", "lm_head.weight", False))
    else:
        pairs += _bert_pairs(cfg, arch, heads=heads)
    return pairs


def _bert_pairs(cfg, arch: str, *, heads: bool = True) -> list[tuple[str, str, bool]]:
    e = "bert.embeddings."
    pairs = [("tok_embed.weight", e + "word_embeddings.weight", False),
             ("embed.pos_embed.weight", e + "position_embeddings.weight", False),
             ("embed.type_embed.weight", e + "token_type_embeddings.weight", False),
             ("embed.norm.weight", e + "LayerNorm.weight", False), ("embed.norm.bias", e + "LayerNorm.bias", False)]
    for i in range(cfg.n_layers):
        ls, hf = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        for p in ("weight", "bias"):
            pairs += [(ls + f"attn.q_proj.{p}", hf + f"attention.self.query.{p}", False),
                      (ls + f"attn.k_proj.{p}", hf + f"attention.self.key.{p}", False),
                      (ls + f"attn.v_proj.{p}", hf + f"attention.self.value.{p}", False),
                      (ls + f"attn.o_proj.{p}", hf + f"attention.output.dense.{p}", False),
                      (ls + f"attn_norm.{p}", hf + f"attention.output.LayerNorm.{p}", False),
                      (ls + f"mlp.up_proj.{p}", hf + f"intermediate.dense.{p}", False),
                      (ls + f"mlp.down_proj.{p}", hf + f"output.dense.{p}", False),
                      (ls + f"mlp_norm.{p}", hf + f"output.LayerNorm.{p}", False)]
    if not heads:
        return pairs
    h = "cls.predictions."
    for p in ("weight", "bias"):
        pairs += [(f"mlm_head.transform.dense.{p}", h + f"transform.dense.{p}", False),
                  (f"mlm_head.transform.norm.{p}", h + f"transform.LayerNorm.{p}", False)]
    if cfg.tie_embeddings:
        pairs.append(("mlm_head.decoder.bias", h + "bias", False))  # HF ties decoder.bias to it
    else:
        # Untied, HF keeps decoder.bias (used) and cls.predictions.bias (unused) apart; see to_hf_state_dict.
        pairs += [("mlm_head.decoder.weight", h + "decoder.weight", False),
                  ("mlm_head.decoder.bias", h + "decoder.bias", False)]
    if cfg.nsp_head:
        for p in ("weight", "bias"):
            pairs += [(f"nsp_head.pooler.{p}", f"bert.pooler.dense.{p}", False),
                      (f"nsp_head.classifier.{p}", f"cls.seq_relationship.{p}", False)]
    return pairs


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg, *, heads: bool = True) -> dict[str, torch.Tensor]:
    """llmscale single-device state dict -> the HF class's names (tied weights once, contiguous, detached).
    ``heads=False``: a backbone's state dict (GPTBackbone / BertBackbone names) -> the HF base model's tensors
    under the head class's prefix (``transformer.`` / ``model.`` / ``bert.``)."""
    arch = hf_architecture(cfg)
    out: dict[str, torch.Tensor] = {}
    used = set()
    for ls, hf, transpose in _layer_pairs(cfg, arch, heads=heads):
        if ls not in state:
            raise ExportError(f"the model has no parameter {ls!r} that {arch} needs for {hf!r} "
                              f"(a model built from a different ModelConfig than the one given?).")
        t = state[ls].detach()
        out[hf] = (t.t() if transpose else t).contiguous()
        used.add(ls)
    if arch == "GPT2LMHeadModel":
        for i in range(cfg.n_layers):
            a = f"blocks.{i}.attn."
            names = [a + f"{n}_proj.{p}" for p in ("weight", "bias") for n in "qkv"]
            q, k, v = (state[a + f"{n}_proj.weight"].detach() for n in "qkv")
            out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([q, k, v], 0).t().contiguous()  # (C, 3C) Conv1D
            out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(
                [state[a + f"{n}_proj.bias"].detach() for n in "qkv"], 0).contiguous()
            used.update(names)
    if heads and arch.startswith("Bert") and not cfg.tie_embeddings:
        out["cls.predictions.bias"] = out["cls.predictions.decoder.bias"].clone()  # HF's otherwise unused copy
    tied = {"lm_head.weight", "mlm_head.decoder.weight"}
    left = sorted(k for k in state if k not in used and not (cfg.tie_embeddings and k in tied))
    if left:
        raise ExportError(f"{arch} has no place for these parameters: {', '.join(left[:8])}"
                          f"{' ...' if len(left) > 8 else ''}; export refuses to drop weights.")
    return out


_BASE_PREFIX = {"GPT2LMHeadModel": "transformer.", "LlamaForCausalLM": "model.", "BertForMaskedLM": "bert.",
                "BertForPreTraining": "bert."}


def _canonical_names(hf_state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Names as the head model saves them: base-model checkpoints (GPT-2's hub files: ``h.0.attn...``,
    ``wte.weight``) get the base prefix, and old BERT files' ``LayerNorm.gamma/beta`` become weight/bias."""
    prefix = _BASE_PREFIX[arch]
    if not any(k.startswith(prefix) for k in hf_state):
        hf_state = {(k if k.startswith(("lm_head.", "cls.")) else prefix + k): v for k, v in hf_state.items()}
    return {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
            for k, v in hf_state.items()}


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg, *, heads: bool = True) -> dict[str, torch.Tensor]:
    """HF names -> llmscale names (the inverse of :func:`to_hf_state_dict`, ``heads`` likewise); every HF
    tensor must be used."""
    arch = hf_architecture(cfg)
    hf_state = _canonical_names(hf_state, arch)
    out: dict[str, torch.Tensor] = {}
    used = set()

    def take(name: str) -> torch.Tensor:
        if name not in hf_state:
            raise ExportError(f"the {arch} weights lack {name!r} (a truncated or different model?).")
        used.add(name)
        return hf_state[name]

    for ls, hf, transpose in _layer_pairs(cfg, arch, heads=heads):
        t = take(hf)
        out[ls] = t.t().contiguous() if transpose else t
    if arch == "GPT2LMHeadModel":
        C = cfg.d_model
        for i in range(cfg.n_layers):
            w = take(f"transformer.h.{i}.attn.c_attn.weight").t()  # (3C, C)
            b = take(f"transformer.h.{i}.attn.c_attn.bias")
            for j, n in enumerate("qkv"):
                out[f"blocks.{i}.attn.{n}_proj.weight"] = w[j * C:(j + 1) * C].contiguous()
                out[f"blocks.{i}.attn.{n}_proj.bias"] = b[j * C:(j + 1) * C].contiguous()
    # Tied copies and buffers HF may also have stored.
    ignorable = {"lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    if arch.startswith("Bert") and not cfg.tie_embeddings:
        ignorable.add("cls.predictions.bias")  # untied: HF's forward uses decoder.bias only
    left = sorted(k for k in hf_state if k not in used and k not in ignorable
                  and not k.endswith((".attn.bias", ".attn.masked_bias", "position_ids", "rotary_emb.inv_freq")))
    if left:
        raise ExportError(f"these {arch} weights have no place in the llmscale model: {', '.join(left[:8])}"
                          f"{' ...' if len(left) > 8 else ''}; import refuses to drop weights.")
    return out


# --------------------------------------------------------------------------- folders


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _model_config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def export_model(model: torch.nn.Module, model_cfg, tokenizer_dir: Optional[str | Path], out_dir: str | Path, *,
                 state_dict: Optional[dict[str, torch.Tensor]] = None, overwrite: bool = False,
                 dtype: Optional[torch.dtype] = None, metadata: Optional[dict[str, str]] = None,
                 token_ids: Optional[dict[str, Optional[int]]] = None) -> Path:
    """Write ``model`` (single-device llmscale model, resolved ModelConfig) as a model folder.

    ``state_dict`` overrides ``model.state_dict()`` (e.g. a consolidated checkpoint; ``model`` may then be
    None). ``tokenizer_dir`` is an llmscale tokenizer folder (or None: weights and configs only). The folder
    is written to ``out_dir.tmp`` and renamed, so a folder that exists is complete. ``token_ids``
    ({"pad", "bos", "eos"}) override llmscale's special ids in config.json / generation_config.json (for
    imported models that keep their own tokenizer)."""
    from llmscale.config import ModelConfig

    if not isinstance(model_cfg, ModelConfig):
        raise TypeError(f"model_cfg must be a ModelConfig, got {type(model_cfg).__name__}")
    if model_cfg.vocab_size is None:
        raise ExportError("model_cfg.vocab_size is unset: pass the resolved config (model.config).")
    arch = hf_architecture(model_cfg)
    out = check_out_dir(out_dir, overwrite=overwrite)
    tok = load_tokenizer_for(tokenizer_dir, model_cfg)
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = safetensors_ready(to_hf_state_dict(state, model_cfg), dtype)
    write_atomically(out, lambda tmp: _write_folder(tmp, tensors, model_cfg, arch, tok, dtype=dtype,
                                                    metadata=metadata, token_ids=token_ids))
    log.info("exported %s (%s, %.2fM parameters) to %s", arch, model_cfg.family,
             sum(t.numel() for t in tensors.values()) / 1e6, out)
    return out


def check_out_dir(out_dir: str | Path, *, overwrite: bool) -> Path:
    """``out_dir`` as a Path; ExportError if it holds files and ``overwrite`` is off."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} already exists and is not empty: choose a new folder or pass --overwrite.")
    return out


def load_tokenizer_for(tokenizer_dir: Optional[str | Path], model_cfg):
    """The llmscale Tokenizer at ``tokenizer_dir`` (None stays None), checked to fit the model's vocabulary."""
    if tokenizer_dir is None:
        return None
    from llmscale.data.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ExportError(f"the tokenizer at {tokenizer_dir} has {tok.vocab_size} pieces but the model embeds only "
                          f"{model_cfg.vocab_size}: export with the tokenizer the model was trained with.")
    return tok


def safetensors_ready(tensors: dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """Cast (optionally), moved to the CPU, and no two tensors sharing storage (safetensors refuses views of
    one flat buffer)."""
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    tensors = {k: v.detach().cpu() for k, v in tensors.items()}
    seen: set[int] = set()
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            tensors[k] = v.clone()
        seen.add(ptr)
    return tensors


def write_atomically(out: Path, write) -> Path:
    """``write(tmp)`` fills ``out.tmp``, which then replaces ``out``: a folder that exists is complete."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _write_folder(tmp: Path, tensors: dict[str, torch.Tensor], model_cfg, arch: str, tok, *,
                  dtype: Optional[torch.dtype], metadata: Optional[dict[str, str]],
                  token_ids: Optional[dict[str, Optional[int]]]) -> None:
    from safetensors.torch import save_file

    hf_cfg = hf_config(model_cfg, token_ids=token_ids)
    if dtype is not None:
        hf_cfg.dtype = str(dtype).replace("torch.", "")
    hf_cfg.save_pretrained(tmp)
    if arch == "LlamaForCausalLM":
        # transformers 5 keeps the RoPE base under rope_parameters; 4.x reads the top-level rope_theta and would
        # silently fall back to 10000 without it. Write both, so every version in the supported range agrees.
        written = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        written.setdefault("rope_theta", float(model_cfg.rope_theta))
        _write_json(tmp / "config.json", written)
    if model_cfg.family == "gpt":
        from transformers import GenerationConfig

        sp = {**_special_ids(), **(token_ids or {})}
        GenerationConfig(bos_token_id=sp["bos"], eos_token_id=sp["eos"], pad_token_id=sp["pad"]).save_pretrained(tmp)
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "llmscale_architecture": arch, **(metadata or {})})
    _write_json(tmp / LLMSCALE_CONFIG, _model_config_dict(model_cfg))
    if tok is not None:
        from llmscale.data.hf_tokenizer import write_hf_tokenizer

        tok.save(tmp / TOKENIZER_SUBDIR)
        write_hf_tokenizer(tok, tmp, kind=model_cfg.family, model_max_length=model_cfg.max_seq_len)


def read_hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's model.safetensors (or its shards); pickle-only folders are refused."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / WEIGHTS).is_file():
        return load_file(str(folder / WEIGHTS))
    if (folder / WEIGHTS_INDEX).is_file():
        index = json.loads((folder / WEIGHTS_INDEX).read_text(encoding="utf-8"))
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            out.update(load_file(str(folder / shard)))
        return out
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles:
        raise ExportError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); llmscale reads safetensors only "
            f"(pickle can run code when loaded). Convert them once in transformers: "
            f"`AutoModel.from_pretrained(folder).save_pretrained(new_folder, safe_serialization=True)`.")
    raise ExportError(f"{folder} has no {WEIGHTS} (nor {WEIGHTS_INDEX}); is it a transformers model folder?")


def _hf_is_nsp(weights: dict[str, torch.Tensor]) -> bool:
    return "cls.seq_relationship.weight" in weights or "seq_relationship.weight" in weights


def read_model_folder(folder: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(resolved ModelConfig, llmscale state dict) of a model folder or a plain transformers folder."""
    from llmscale.config import ModelConfig, from_dict

    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder; give a model folder written by `llmscale export` / "
                          f"`llmscale import`.")
    weights = read_hf_weights(folder)
    if (folder / LLMSCALE_CONFIG).is_file():
        raw = json.loads((folder / LLMSCALE_CONFIG).read_text(encoding="utf-8"))
        cfg = from_dict(ModelConfig, raw)
    elif (folder / "config.json").is_file():
        hf_cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        cfg = model_config_from_hf(hf_cfg, folder=folder, nsp_head=_hf_is_nsp(weights))
    else:
        raise ExportError(f"{folder} has neither {LLMSCALE_CONFIG} nor config.json; it is not a model folder.")
    return cfg, from_hf_state_dict(weights, cfg)


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict that fills tied aliases (lm_head.weight when tied) and reports what is missing."""
    own = model.state_dict()
    full = dict(state)
    ptr_to_name = {}
    for name, t in own.items():
        ptr_to_name.setdefault(t.data_ptr(), name)
    for name, t in own.items():
        if name not in full and ptr_to_name[t.data_ptr()] in full:
            full[name] = full[ptr_to_name[t.data_ptr()]]
    missing = sorted(set(own) - set(full))
    unexpected = sorted(set(full) - set(own))
    if missing or unexpected:
        raise ExportError(f"weights do not fit the model built from the config: missing {missing[:6]}, "
                          f"unexpected {unexpected[:6]}.")
    for name, t in full.items():
        if own[name].shape != t.shape:
            raise ExportError(f"{name}: the folder has shape {tuple(t.shape)}, the model {tuple(own[name].shape)}.")
    model.load_state_dict(full, strict=True)


def load_model_folder(folder: str | Path, *, device: str | torch.device = "cpu",
                      dtype: Optional[torch.dtype] = None) -> tuple[torch.nn.Module, Any]:
    """(llmscale model in eval mode, resolved ModelConfig) from a model folder or a transformers folder."""
    from llmscale.models import build_model

    cfg, state = read_model_folder(folder)
    model = build_model(cfg)
    _load_state(model, state)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), model.config


def llmscale_tokenizer_dir(folder: str | Path) -> Optional[Path]:
    """The llmscale tokenizer folder a model folder carries (tokenizer/), if any."""
    sub = Path(folder) / TOKENIZER_SUBDIR
    return sub if (sub / "tokenizer.model").is_file() else None


def import_hf_folder(hf_folder: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """A transformers GPT2 / Llama / BERT folder -> an llmscale model folder (ModelConfig inferred, weights
    renamed exactly, the tokenizer carried over). The result is written by :func:`export_model`, so it is
    itself a transformers folder with the same tensors."""
    from llmscale.models import build_model

    src = Path(hf_folder)
    cfg, state = read_model_folder(src)
    model = build_model(cfg)
    _load_state(model, state)
    tok_dir = llmscale_tokenizer_dir(src)
    if tok_dir is None and (src / "tokenizer.model").is_file():
        from llmscale.data.tokenizer import Tokenizer, TokenizerError

        try:
            Tokenizer.load(src / "tokenizer.model")
            tok_dir = src / "tokenizer.model"
        except TokenizerError as e:
            log.info("the folder's tokenizer.model is not an llmscale tokenizer (%s); copying the HF tokenizer files",
                     e)
    token_ids = None
    if tok_dir is None and (src / "config.json").is_file():  # it keeps its own tokenizer, hence its own ids
        src_cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
        token_ids = {k: src_cfg.get(f"{k}_token_id") for k in ("pad", "bos", "eos")}
    out = export_model(model, model.config, tok_dir, out_dir, overwrite=overwrite, token_ids=token_ids)
    if tok_dir is None:
        copied = [n for n in HF_TOKENIZER_FILES if (src / n).is_file()]
        for name in copied:
            shutil.copyfile(src / name, out / name)
        if not copied:
            log.warning("%s has no tokenizer files; %s has weights and configs only", src, out)
    log.info("imported %s as %s", src, out)
    return out
