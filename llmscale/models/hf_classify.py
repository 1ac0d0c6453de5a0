"""Sequence classifiers as model folders, and the transformers classes they export to exactly.

    export_classifier(clf, clf.config, clf.clf_config, "tok/", "out/")   # see below for what "out/" becomes
    clf, model_cfg, clf_cfg = load_classifier_folder("out/")            # either kind of folder, back into llmscale

Which transformers class (AutoModelForSequenceClassification and ``pipeline("text-classification")`` then load
the folder, AutoTokenizer its tokenizer):

    BertForSequenceClassification   family=bert, pooling=cls_pooler, a BERT that exports at all (post-norm, ...;
                                    the conditions of BertForMaskedLM in :mod:`llmscale.models.hf`)
    GPT2ForSequenceClassification   family=gpt, GPT-2 style (GPT2LMHeadModel's conditions)
    LlamaForSequenceClassification  family=gpt, Llama style (LlamaForCausalLM's conditions; GQA allowed)

No transformers class computes the rest: BERT with pooling cls or mean (transformers' BERT classifier always
applies its pooler), the BiLSTM, and a GPT/BERT whose blocks no transformers class expresses. Those are written
as an *llmscale-only* folder — no config.json, model.safetensors under llmscale's own state-dict names
(:mod:`llmscale.models.classify`) — and a warning says so; ``require_transformers=True`` makes it an
ExportError instead. Nothing is approximated.

Folder files (both kinds unless noted):

    config.json                 transformers kind only: the HF config with id2label / label2id (from the label
                                names), num_labels, problem_type="single_label_classification", pad_token_id (the
                                tokenizer's pad id, with which transformers finds GPT's last non-pad token) and,
                                for BERT, classifier_dropout
    model.safetensors           HF names (transformers kind) or llmscale names (llmscale kind)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   the HF tokenizer (``<cls> text <sep>`` for
                                BERT; the plain text ids for GPT and the BiLSTM), with a tokenizer only
    tokenizer/                  the llmscale tokenizer, with a tokenizer only
    llmscale_config.json        the resolved ModelConfig
    llmscale_classifier.json    {"format": "transformers" | "llmscale", "architecture": HF class or null,
                                 "pad_id": int, "classifier": ClassifierConfig.to_dict()}
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import torch

from llmscale.errors import ExportError
from llmscale.log import get_logger
from llmscale.models.hf import (
    LLMSCALE_CONFIG,
    TOKENIZER_SUBDIR,
    WEIGHTS,
    _load_state,
    _write_json,
    check_out_dir,
    from_hf_state_dict,
    hf_architecture,
    hf_config,
    load_tokenizer_for,
    read_hf_weights,
    safetensors_ready,
    to_hf_state_dict,
    write_atomically,
)

log = get_logger(__name__)

CLASSIFIER_CONFIG = "llmscale_classifier.json"
_CLASSIFIER_ARCH = {"GPT2LMHeadModel": "GPT2ForSequenceClassification",
                    "LlamaForCausalLM": "LlamaForSequenceClassification",
                    "BertForMaskedLM": "BertForSequenceClassification",
                    "BertForPreTraining": "BertForSequenceClassification"}
# llmscale head name -> HF name, per HF class (the backbone goes through llmscale.models.hf's mapping)
_HEAD_NAMES = {
    "BertForSequenceClassification": {"pooler.dense.weight": "bert.pooler.dense.weight",
                                      "pooler.dense.bias": "bert.pooler.dense.bias",
                                      "classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"},
    "GPT2ForSequenceClassification": {"score.weight": "score.weight"},
    "LlamaForSequenceClassification": {"score.weight": "score.weight"},
}


def classifier_architecture(model_cfg, clf_cfg) -> str:
    """The transformers class computing exactly this classifier, or ExportError saying why there is none (the
    folder is then llmscale-only; see the module docstring)."""
    if model_cfg.family == "bilstm":
        raise ExportError("the BiLSTM classifier (model.family=bilstm) has no transformers class: its folder is "
                          "llmscale-only (load it with llmscale.models.hf_classify.load_classifier_folder).")
    if model_cfg.family == "bert" and clf_cfg.pooling != "cls_pooler":
        raise ExportError(
            f"classifier pooling={clf_cfg.pooling!r} has no transformers class: BertForSequenceClassification always "
            f"pools [CLS] through its pooler (pooling=cls_pooler). The folder is llmscale-only; fine-tune with "
            f"pooling=cls_pooler for a transformers export.")
    arch = _CLASSIFIER_ARCH.get(hf_architecture(model_cfg))  # ExportError naming the block differences
    if arch is None:
        raise ExportError(f"no transformers sequence-classification class for model.family={model_cfg.family}.")
    return arch


def classifier_to_hf(state: dict[str, torch.Tensor], model_cfg, clf_cfg) -> dict[str, torch.Tensor]:
    """SequenceClassifier state dict -> the transformers class's names (a rename, GPT-2's q/k/v fused)."""
    arch = classifier_architecture(model_cfg, clf_cfg)
    heads = _HEAD_NAMES[arch]
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    out = to_hf_state_dict(backbone, model_cfg, heads=False)
    left = sorted(k for k in state if not k.startswith("backbone.") and k not in heads)
    missing = sorted(k for k in heads if k not in state)
    if left or missing:
        raise ExportError(f"{arch} expects the head {sorted(heads)}; the state dict lacks {missing} and has "
                          f"{left} besides (a state dict of a different classifier config?).")
    out.update({hf: state[ls].detach().contiguous() for ls, hf in heads.items()})
    return out


def classifier_from_hf(hf_state: dict[str, torch.Tensor], model_cfg, clf_cfg) -> dict[str, torch.Tensor]:
    """The inverse of :func:`classifier_to_hf`; every HF tensor must find its place."""
    arch = classifier_architecture(model_cfg, clf_cfg)
    heads = _HEAD_NAMES[arch]
    hf_state = dict(hf_state)
    missing = [hf for hf in heads.values() if hf not in hf_state]
    if missing:
        raise ExportError(f"the {arch} weights lack {missing} (a truncated or different model?).")
    head = {ls: hf_state.pop(hf) for ls, hf in heads.items()}
    out = {"backbone." + k: v for k, v in from_hf_state_dict(hf_state, model_cfg, heads=False).items()}
    out.update(head)
    return out


def _hf_classifier_config(model_cfg, clf_cfg, arch: str, pad_id: int, dtype: Optional[torch.dtype]):
    hf_cfg = hf_config(model_cfg, token_ids={"pad": pad_id})
    hf_cfg.architectures = [arch]
    hf_cfg.id2label = dict(enumerate(clf_cfg.labels))
    hf_cfg.label2id = {name: i for i, name in enumerate(clf_cfg.labels)}
    hf_cfg.problem_type = "single_label_classification"
    hf_cfg.pad_token_id = pad_id
    if model_cfg.family == "bert":
        hf_cfg.classifier_dropout = clf_cfg.dropout
    if dtype is not None:
        hf_cfg.dtype = str(dtype).replace("torch.", "")
    return hf_cfg


def export_classifier(model: torch.nn.Module, model_cfg, clf_cfg, tokenizer_dir: Optional[str | Path],
                      out_dir: str | Path, *, overwrite: bool = False, dtype: Optional[torch.dtype] = None,
                      require_transformers: bool = False) -> Path:
    """Write a SequenceClassifier as a model folder: a transformers folder where a transformers class computes
    it exactly, else an llmscale-only folder (a warning says which and why; ``require_transformers=True``
    raises ExportError instead). Both reload exactly with :func:`load_classifier_folder`. ``model_cfg`` is
    the resolved ModelConfig (``model.config``), ``clf_cfg`` the ClassifierConfig (``model.clf_config``);
    ``tokenizer_dir`` an llmscale tokenizer folder or None (weights and configs only). Written to
    ``out_dir.tmp`` and renamed, so a folder that exists is complete."""
    from llmscale.config import ModelConfig

    if not isinstance(model_cfg, ModelConfig) or model_cfg.vocab_size is None:
        raise ExportError("model_cfg must be the classifier's resolved ModelConfig (model.config).")
    clf_cfg.validate()
    clf_cfg.check_family(model_cfg.family)
    try:
        arch: Optional[str] = classifier_architecture(model_cfg, clf_cfg)
    except ExportError as e:
        if require_transformers:
            raise
        arch = None
        log.warning("%s Writing %s as an llmscale-only model folder (no config.json; transformers cannot load it).",
                    e, out_dir)
    out = check_out_dir(out_dir, overwrite=overwrite)
    tok = load_tokenizer_for(tokenizer_dir, model_cfg)
    pad_id = tok.pad_id if tok is not None else getattr(model, "pad_id", 0)
    state = model.state_dict()
    tensors = safetensors_ready(state if arch is None else classifier_to_hf(state, model_cfg, clf_cfg), dtype)
    meta = {"format": "llmscale" if arch is None else "transformers", "architecture": arch, "pad_id": pad_id,
            "classifier": clf_cfg.to_dict()}

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        if arch is not None:
            _hf_classifier_config(model_cfg, clf_cfg, arch, pad_id, dtype).save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "llmscale_format": meta["format"],
                                                         "llmscale_architecture": arch or "SequenceClassifier"})
        _write_json(tmp / LLMSCALE_CONFIG, dataclasses.asdict(model_cfg))
        _write_json(tmp / CLASSIFIER_CONFIG, meta)
        if tok is not None:
            from llmscale.data.hf_tokenizer import write_hf_tokenizer

            tok.save(tmp / TOKENIZER_SUBDIR)
            kind = "bert" if model_cfg.family == "bert" else "gpt"
            write_hf_tokenizer(tok, tmp, kind=kind, model_max_length=model_cfg.max_seq_len)

    write_atomically(out, write)
    log.info("exported the %s classifier (%s, %d labels, %.2fM parameters) to %s", model_cfg.family,
             arch or "llmscale-only folder", clf_cfg.num_labels, sum(t.numel() for t in tensors.values()) / 1e6, out)
    return out


def read_classifier_meta(folder: str | Path) -> dict[str, Any]:
    """llmscale_classifier.json of a classifier folder, its "classifier" entry as a ClassifierConfig."""
    from llmscale.models.classify import ClassifierConfig

    path = Path(folder) / CLASSIFIER_CONFIG
    if not path.is_file():
        raise ExportError(
            f"{folder} has no {CLASSIFIER_CONFIG}, so it is not a classifier folder written by export_classifier: "
            f"a language-model folder loads with llmscale.models.hf.load_model_folder (and a classifier is then "
            f"built on it with SequenceClassifier.from_pretrained_lm).")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") not in ("transformers", "llmscale") or "classifier" not in meta:
        raise ExportError(f"{path} is not a classifier description ({sorted(meta)}); re-export the model.")
    return {**meta, "classifier": ClassifierConfig.from_dict(meta["classifier"])}


def load_classifier_folder(folder: str | Path, *, device: str | torch.device = "cpu",
                           dtype: Optional[torch.dtype] = None) -> tuple[torch.nn.Module, Any, Any]:
    """(SequenceClassifier in eval mode, resolved ModelConfig, ClassifierConfig) from a folder that
    :func:`export_classifier` wrote, of either kind."""
    from llmscale.config import ModelConfig, from_dict
    from llmscale.models.classify import SequenceClassifier

    folder = Path(folder)
    meta = read_classifier_meta(folder)
    clf_cfg = meta["classifier"]
    if not (folder / LLMSCALE_CONFIG).is_file():
        raise ExportError(f"{folder} lacks {LLMSCALE_CONFIG} (the ModelConfig); re-export the classifier.")
    model_cfg = from_dict(ModelConfig, json.loads((folder / LLMSCALE_CONFIG).read_text(encoding="utf-8")))
    weights = read_hf_weights(folder)
    state = classifier_from_hf(weights, model_cfg, clf_cfg) if meta["format"] == "transformers" else weights
    model = SequenceClassifier(model_cfg, clf_cfg, pad_id=int(meta.get("pad_id", 0)))
    _load_state(model, state)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), model_cfg, clf_cfg
