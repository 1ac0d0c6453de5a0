"""``llmscale config show [CONFIG] [key=value ...]``: the resolved run config as YAML, or, without
arguments, every config key with its type, default and doc. A config with a ``task`` key is a fine-tune
config (``llmscale finetune``); ``--finetune`` lists the fine-tune keys."""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config; without it, every key is listed with its doc.")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    p.add_argument("--finetune", action="store_true", help="The fine-tune config tree (`llmscale finetune`).")


def main(args: argparse.Namespace) -> int:
    import yaml

    from llmscale.config import RunConfig, describe, load_config, read_yaml, to_dict
    from llmscale.config_finetune import FinetuneConfig

    finetune = args.finetune or (args.config is not None and "task" in read_yaml(args.config))
    tree = FinetuneConfig if finetune else RunConfig
    if args.config is None and not args.overrides:
        for key, tp, default, text in describe(tree):
            print(f"{key:<40} {tp:<28} default {default:<14} {text}")
        return 0
    cfg = load_config(tree, args.config, args.overrides)
    yaml.safe_dump(to_dict(cfg), sys.stdout, sort_keys=False)
    return 0
