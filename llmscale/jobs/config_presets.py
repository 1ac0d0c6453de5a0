"""``llmscale config presets``: the model presets (``model.preset``), one line each with their fields; the
classifier-only presets (``bilstm-*``, for ``llmscale finetune``) after the language models."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command takes no options."""


def main(args: argparse.Namespace) -> int:
    from llmscale.models.presets import CLASSIFIER_PRESETS, PRESETS

    for name, spec in {**PRESETS, **CLASSIFIER_PRESETS}.items():
        print(f"{name:<16} " + " ".join(f"{k}={v}" for k, v in spec.items()))
    return 0
