"""``llmscale generate SOURCE --prompt TEXT``: sample a continuation with a KV cache.

    llmscale generate exported/ --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 50 --seed 1
    llmscale generate exported/ --prompt "ROMEO:" --greedy --json        # ids and text as JSON

SOURCE (see :func:`load_for_inference`): a model folder (written by ``llmscale export`` / ``llmscale
import``), a plain transformers GPT2/Llama folder, or a finished run directory (RUN_DIR/final/model.pt).
The prompt is encoded as is (no bos: llmscale's GPT data has none; an empty prompt starts after an eos,
i.e. at a document start); generation stops at eos. The text printed is prompt + continuation.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from llmscale.log import get_logger

log = get_logger(__name__)


class TextTokenizer(Protocol):
    """What generation needs from a tokenizer (llmscale's Tokenizer has it; HFTokenizer wraps transformers')."""

    eos_id: Optional[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """A transformers tokenizer seen through llmscale's encode/decode (for imported folders whose tokenizer
    is not an llmscale SentencePiece model, e.g. GPT-2's byte-level BPE). No special tokens are added."""

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(folder))
        self.eos_id = self.hf.eos_token_id
        self.vocab_size = len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)


def _is_run_dir(p: Path) -> bool:
    from llmscale.jobs.train import CONFIG_FILE, FINAL_DIR, FINAL_WEIGHTS

    return (p / CONFIG_FILE).is_file() and (p / FINAL_DIR / FINAL_WEIGHTS).is_file()


def load_model_source(source: str | Path, *, device: str = "cpu"):
    """``(model in eval mode, resolved ModelConfig, tokenizer folder or None)`` from SOURCE: a model folder,
    a transformers folder or a finished run directory. The place to add more kinds of SOURCE."""
    from llmscale.models.hf import LLMSCALE_CONFIG, ExportError, llmscale_tokenizer_dir, load_model_folder

    p = Path(source)
    if not p.exists():
        raise ExportError(f"{source} does not exist: give a model folder (`llmscale export` / `llmscale import` "
                          f"output) or a finished run directory.")
    if p.is_dir() and ((p / LLMSCALE_CONFIG).is_file() or (p / "config.json").is_file()):
        model, cfg = load_model_folder(p, device=device)
        return model, cfg, llmscale_tokenizer_dir(p)
    if p.is_dir() and _is_run_dir(p):
        from llmscale.jobs.train import RUN_TOKENIZER, load_final_model

        model, _tok, _run_cfg = load_final_model(p, device=device)
        return model, model.config, p / RUN_TOKENIZER
    raise ExportError(
        f"{source} is neither a model folder (no {LLMSCALE_CONFIG} / config.json) nor a finished run directory "
        f"(config.yaml + final/model.pt). Export a run with `llmscale export RUN_DIR OUT`, or point at one.")


def load_for_inference(source: str | Path, *, device: str = "cpu") -> tuple[Any, TextTokenizer]:
    """``(model in eval mode, tokenizer)`` for SOURCE (see :func:`load_model_source`). The tokenizer is the
    llmscale one when SOURCE carries it, else the folder's transformers tokenizer."""
    from llmscale.data.tokenizer import Tokenizer
    from llmscale.models.hf import ExportError

    model, _cfg, tok_dir = load_model_source(source, device=device)
    if tok_dir is not None:
        return model, Tokenizer.load(tok_dir)
    if (Path(source) / "tokenizer.json").is_file() or (Path(source) / "tokenizer_config.json").is_file():
        return model, HFTokenizer(source)
    raise ExportError(f"{source} has no tokenizer (neither tokenizer/ nor tokenizer.json): re-export it with "
                      f"`llmscale export SOURCE OUT --tokenizer TOKENIZER_DIR`.")


def generate_text(model, tokenizer: TextTokenizer, prompt: str, *, max_new_tokens: int = 100,
                  temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  greedy: bool = False, seed: Optional[int] = None) -> dict:
    """``{"prompt_ids", "new_ids", "text", "completion"}`` for one prompt."""
    from llmscale.models.generate import generate

    eos = getattr(tokenizer, "eos_id", None)
    prompt_ids = tokenizer.encode(prompt)
    start = prompt_ids if prompt_ids else ([eos] if eos is not None else [])
    if not start:
        raise ValueError("the prompt is empty and the tokenizer has no eos token to start from: give --prompt TEXT.")
    out = generate(model, start, max_new_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                   top_k=top_k, top_p=top_p, seed=seed, eos_id=eos)
    from llmscale.models.generate import context_limit

    limit = context_limit(model)
    kept = len(start) if limit is None else min(len(start), limit)  # generate() keeps the prompt's last `limit`
    new = out[0].tolist()[kept:]
    if eos is not None and eos in new:
        new = new[:new.index(eos)]
    completion = tokenizer.decode(new)
    return {"prompt_ids": prompt_ids, "new_ids": new, "completion": completion, "text": prompt + completion}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="Model folder (llmscale export/import), transformers GPT2/Llama folder, or finished run dir.")
    p.add_argument("--prompt", default="", help="Text to continue (default: start a new document).")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="Softmax temperature (0 = greedy).")
    p.add_argument("--top-k", type=int, default=None, help="Sample among the k most likely tokens.")
    p.add_argument("--top-p", type=float, default=None, help="Nucleus sampling: smallest set with this probability.")
    p.add_argument("--greedy", action="store_true", help="Always take the most likely token (ignores temperature/top-k/top-p).")
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
    model, tokenizer = load_for_inference(args.source, device=args.device)
    if model.config.family == "bert":
        from llmscale.models.hf import ExportError

        raise ExportError(f"{args.source} is a BERT (masked LM) model; generate needs a causal LM (gpt family).")
    result = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           greedy=args.greedy, seed=args.seed)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(result["text"])
    return 0
