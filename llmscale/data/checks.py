"""Checks that the datasets of a run fit together and fit the run, before any work starts.

:func:`check_datasets` reads every dataset's manifest (``data.path`` or ``data.blend``) and refuses a
dataset of the wrong format, a blend of different tokenizers, a ``model.vocab_size`` other than the
tokenizer's, and data whose tokenizer differs from the one a run directory already trained with; each
error names both sides and the command that fixes it. Every job that trains (pretraining, fine-tuning,
continued pretraining) calls it first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llmscale.artifacts import RUN_TOKENIZER, read_tokenizer_meta
from llmscale.data.shards import read_manifest
from llmscale.errors import DatasetError, TokenizerError


def check_datasets(cfg: Any) -> list:
    """Read every dataset's manifest and check tokenizers before any work; fill ``model.vocab_size``.

    Raises DatasetError / TokenizerError whose message names both sides and the command that fixes it."""
    entries = cfg.data.sources()
    if not entries:
        raise DatasetError("No dataset given: set data.path (or data.blend) to a folder written by `llmscale prepare`, "
                           "e.g. `llmscale train CONFIG data.path=data/mycorpus`.")
    manifests = [read_manifest(e.path) for e in entries]
    for e, m in zip(entries, manifests):
        if m.kind != cfg.data.format:
            raise DatasetError(
                f"{e.path} was prepared with --format {m.kind}, but data.format={cfg.data.format}. Re-run "
                f"`llmscale prepare --format {cfg.data.format} --input ... --output {e.path}-{cfg.data.format}` "
                f"(or use a {cfg.data.format.upper()} dataset).")
    first, m0 = entries[0], manifests[0]
    for e, m in zip(entries[1:], manifests[1:]):
        if m.tokenizer_hash != m0.tokenizer_hash or m.vocab_size != m0.vocab_size:
            raise TokenizerError(
                f"The blend mixes tokenizers: {first.path} has tokenizer {m0.tokenizer_hash[:12]} "
                f"(vocab {m0.vocab_size}), "
                f"{e.path} has {m.tokenizer_hash[:12]} (vocab {m.vocab_size}); token ids would mean different things. "
                f"Re-prepare it with the first one's tokenizer: `llmscale prepare --tokenizer {m0.tokenizer_dir()} "
                f"--input ... --output {e.path}`.")
    vocab = m0.vocab_size
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size != vocab:
        raise TokenizerError(
            f"model.vocab_size={cfg.model.vocab_size} does not match the tokenizer of {first.path} "
            f"(vocab {vocab}, hash {m0.tokenizer_hash[:12]}). Set model.vocab_size={vocab} "
            f"(or null: taken from the dataset), or prepare the "
            f"data with the model's tokenizer: `llmscale prepare --tokenizer TOKENIZER_DIR --input ... --output "
            f"{first.path}`.")
    run_tok = Path(cfg.run_dir) / RUN_TOKENIZER
    meta = read_tokenizer_meta(run_tok)
    if meta and (meta.get("hash") != m0.tokenizer_hash or int(meta.get("vocab_size", vocab)) != vocab):
        raise TokenizerError(
            f"The run directory {cfg.run_dir} was trained with tokenizer {str(meta.get('hash'))[:12]} "
            f"(vocab {meta.get('vocab_size')}), but {first.path} was made with tokenizer {m0.tokenizer_hash[:12]} "
            f"(vocab {vocab}): resuming would feed the model ids it never learned. Re-prepare the data with the run's "
            f"tokenizer: `llmscale prepare --tokenizer {run_tok} --input ... --output {first.path}-retok`, "
            f"or train into a new run_dir=...")
    return manifests
