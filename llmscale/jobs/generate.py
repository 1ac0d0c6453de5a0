"""``llmscale generate SOURCE --prompt TEXT``: sample a continuation with a KV cache.

    llmscale generate exported/ --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 50 --seed 1
    llmscale generate exported/ --prompt "ROMEO:" --greedy --json        # ids and text as JSON

SOURCE is anything :func:`llmscale.artifacts.load_model` takes: a model folder (``llmscale export`` /
``llmscale import``), a plain transformers GPT2/Llama folder, a run directory or a checkpoint of any layout.
The prompt is encoded as is (no bos: llmscale's GPT data has none; an empty prompt starts after an eos,
i.e. at a document start); generation stops at eos. The text printed is prompt + continuation.
"""
from __future__ import annotations

import argparse
import json

from llmscale.log import get_logger

log = get_logger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source",
                   help="Model folder (llmscale export/import), transformers GPT2/Llama folder, run dir or checkpoint.")
    p.add_argument("--prompt", default="", help="Text to continue (default: start a new document).")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="Softmax temperature (0 = greedy).")
    p.add_argument("--top-k", type=int, default=None, help="Sample among the k most likely tokens.")
    p.add_argument("--top-p", type=float, default=None, help="Nucleus sampling: smallest set with this probability.")
    p.add_argument("--greedy", action="store_true",
                   help="Always take the most likely token (ignores temperature/top-k/top-p).")
    p.add_argument("--seed", type=int, default=None, help="Seed of the sampler (same seed, model, device: same text).")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--json", action="store_true", help="Print {prompt_ids, new_ids, completion, text} as JSON.")


def main(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 0:
        raise SystemExit(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}.")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise SystemExit(f"--top-p must be in (0, 1], got {args.top_p}.")
    if args.top_k is not None and args.top_k < 1:
        raise SystemExit(f"--top-k must be >= 1, got {args.top_k}.")
    from llmscale.artifacts import load_model
    from llmscale.errors import ExportError
    from llmscale.models.generate import generate_text

    loaded = load_model(args.source, device=args.device)
    model, tokenizer = loaded.model, loaded.require_tokenizer()
    if model.config.family == "bert":
        raise ExportError(f"{args.source} is a BERT (masked LM) model; generate needs a causal LM (gpt family).")
    result = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           greedy=args.greedy, seed=args.seed)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(result["text"])
    return 0
