"""``llmscale export SOURCE OUT``: write a model as a Hugging Face transformers folder (and llmscale model folder).

    llmscale export runs/gpt/ exported/                 # a run (final/model.pt, else its newest checkpoint)
    llmscale export runs/gpt/checkpoints/step-000200 e/ # one checkpoint of any layout
    llmscale export exported/ copy/ --dtype bf16        # any model folder again, e.g. in bf16

OUT then loads offline with ``AutoModelForCausalLM`` (GPT-2 style -> GPT2LMHeadModel, RoPE/RMSNorm/SwiGLU ->
LlamaForCausalLM) or ``AutoModelForMaskedLM`` (BERT; with the NSP head it is a BertForPreTraining folder) and
``AutoTokenizer``; ``llmscale generate OUT`` and ``llmscale import`` read it too. A model no transformers
class computes exactly is refused (ExportError names what differs). See :mod:`llmscale.models.hf`.
"""
from __future__ import annotations

import argparse
import json

from llmscale.log import get_logger

log = get_logger(__name__)

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source",
                   help="Run directory, checkpoint (any layout), or model folder (llmscale export/import output).")
    p.add_argument("output", help="Folder to write (must not exist or be empty unless --overwrite).")
    p.add_argument("--tokenizer", default=None,
                   help="llmscale tokenizer folder to include (default: the one SOURCE carries).")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="Cast the weights (default: as stored).")
    p.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists.")


def main(args: argparse.Namespace) -> int:
    import torch

    from llmscale.artifacts import load_model
    from llmscale.models.hf import export_model, hf_architecture

    # a training checkpoint of any layout (or a run directory without final weights) is consolidated first
    loaded = load_model(args.source)
    model, cfg, tok_dir = loaded.model, loaded.config, loaded.tokenizer_dir
    if loaded.classifier is not None:
        from llmscale.errors import ExportError
        from llmscale.models.hf_classify import classifier_architecture

        try:
            arch = classifier_architecture(cfg, loaded.classifier)
        except ExportError as e:  # no transformers class: export_classifier writes an llmscale-only folder
            log.warning("%s", e)
            arch = None
    else:
        arch = hf_architecture(cfg)  # refuse before anything is written
    tokenizer = args.tokenizer or tok_dir
    if tokenizer is None:
        log.warning("%s carries no llmscale tokenizer and --tokenizer was not given: %s gets weights and configs "
                    "only (AutoTokenizer will not load it)", args.source, args.output)
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    if loaded.classifier is not None:
        from llmscale.models.hf_classify import export_classifier

        out = export_classifier(model, cfg, loaded.classifier, tokenizer, args.output, overwrite=args.overwrite,
                                dtype=dtype)
    else:
        out = export_model(model, cfg, tokenizer, args.output, overwrite=args.overwrite, dtype=dtype)
    print(json.dumps({"output": str(out), "architecture": arch, "family": cfg.family,
                      "num_params": model.num_params(), "tokenizer": str(tokenizer) if tokenizer else None}, indent=2))
    return 0
