"""``llmscale config presets``: the model presets (``model.preset``), one line each with their fields."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> int:
    from llmscale.models.presets import PRESETS

    for name, spec in PRESETS.items():
        print(f"{name:<16} " + " ".join(f"{k}={v}" for k, v in spec.items()))
    return 0
