"""`llmscale config show` and `llmscale config presets`."""
from __future__ import annotations

import argparse
import sys

import yaml

from llmscale.config import RunConfig, describe, load_config, to_dict


def add_arguments(parser: argparse.ArgumentParser, which: str) -> None:
    if which == "show":
        parser.add_argument("config", nargs="?", help="YAML config; without it, every key is listed with its doc.")
        parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")


def main(args: argparse.Namespace) -> int:
    if args.command_path[-1] == "presets":
        from llmscale.models.presets import PRESETS

        for name, spec in PRESETS.items():
            print(f"{name:<16} " + " ".join(f"{k}={v}" for k, v in spec.items()))
        return 0
    if args.config is None and not args.overrides:
        for key, tp, default, text in describe(RunConfig):
            print(f"{key:<40} {tp:<28} default {default:<14} {text}")
        return 0
    cfg = load_config(RunConfig, args.config, args.overrides)
    yaml.safe_dump(to_dict(cfg), sys.stdout, sort_keys=False)
    return 0
