"""``llmscale config show [CONFIG] [key=value ...]``: the resolved run config as YAML, or, without
arguments, every config key with its type, default and doc. A config with a ``task`` key is a fine-tune
config (``llmscale finetune``), one with a ``tasks`` key an eval config (``llmscale eval``); ``--finetune`` and
``--eval`` list those trees' keys."""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config; without it, every key is listed with its doc.")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    p.add_argument("--finetune", action="store_true", help="The fine-tune config tree (`llmscale finetune`).")
    p.add_argument("--eval", action="store_true", help="The eval config tree (`llmscale eval`).")


def main(args: argparse.Namespace) -> int:
    import yaml

    from llmscale.config import RunConfig, describe, load_config, read_yaml, to_dict
    from llmscale.config_eval import EvalConfig
    from llmscale.config_finetune import FinetuneConfig

    raw = read_yaml(args.config) if args.config is not None else {}
    if args.eval or "tasks" in raw:
        tree = EvalConfig
    elif args.finetune or "task" in raw:
        tree = FinetuneConfig
    else:
        tree = RunConfig
    if args.config is None and not args.overrides:
        for key, tp, default, text in describe(tree):
            print(f"{key:<40} {tp:<28} default {default:<14} {text}")
        return 0
    cfg = load_config(tree, args.config, args.overrides)
    yaml.safe_dump(to_dict(cfg), sys.stdout, sort_keys=False)
    return 0
