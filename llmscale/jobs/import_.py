"""``llmscale import HF_FOLDER OUT``: a transformers GPT2 / Llama / BERT folder -> an llmscale model folder.

    llmscale import ~/hf/gpt2 models/gpt2
    llmscale generate models/gpt2 --prompt "Hello" --greedy

The ModelConfig is inferred from config.json and the weights are renamed exactly (no approximation:
rope scaling, other activations, biases on attention but not MLP, pickle-only weights ... are refused with
the reason). OUT is itself a transformers folder holding the same tensors, plus ``llmscale_config.json``.
"""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_folder", help="transformers folder: config.json + model.safetensors (+ tokenizer files).")
    p.add_argument("output", help="llmscale model folder to write.")
    p.add_argument("--overwrite", action="store_true", help="Replace OUTPUT if it exists.")


def main(args: argparse.Namespace) -> int:
    from llmscale.models.hf import LLMSCALE_CONFIG, import_hf_folder

    out = import_hf_folder(args.hf_folder, args.output, overwrite=args.overwrite)
    model_cfg = json.loads((out / LLMSCALE_CONFIG).read_text(encoding="utf-8"))
    print(json.dumps({"output": str(out), "model": model_cfg}, indent=2))
    return 0
