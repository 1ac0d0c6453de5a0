"""The `llmscale` command: one entry point, subcommands.

One rule: the command ``a b`` lives in ``llmscale/jobs/a_b.py`` (a word that is a Python keyword gets a
trailing underscore: ``import`` -> ``jobs/import_.py``), which defines ``add_arguments(parser)`` and
``main(args) -> int | None``. Jobs parse, call the library and print; library modules return values and
log. Only the module of the command being run is imported, so ``llmscale --help`` is instant and a
broken optional dependency only affects its command.
"""
from __future__ import annotations

import argparse
import importlib
import keyword
import os
import sys
from collections.abc import Sequence
from typing import Optional

# command path -> one-line help; the module is job_module(path)
COMMANDS: dict[tuple[str, ...], str] = {
    ("tokenizer", "train"): "Train a lossless SentencePiece tokenizer on local text.",
    ("prepare",): "Tokenize local txt/jsonl/parquet/csv into sharded Arrow datasets.",
    ("data", "inspect"): "Counts, shards and a decoded sample of a dataset.",
    ("data", "order"): "Which sample ids every rank reads at every step (JSON).",
    ("data", "verify"): "Check a dataset's shards against its manifest checksums.",
    ("data", "merge"): "Join the parts written by `prepare --part I/N` into one dataset with one manifest.",
    ("train",): "Pretrain a GPT or BERT model from a YAML config on DeepSpeed.",
    ("finetune",): "Fine-tune (classify, sft, lm) from any checkpoint or model folder on DeepSpeed.",
    ("eval",): "Evaluate any model: perplexity, bits/byte, MLM, classification, generation, lm-eval-harness.",
    ("generate",): "Generate text from a checkpoint or an exported model.",
    ("export",): "Write a checkpoint as a Hugging Face transformers folder.",
    ("import",): "Import a Hugging Face folder as an llmscale model.",
    ("ckpt", "list"): "List the checkpoints of a run directory.",
    ("ckpt", "verify"): "Verify a checkpoint's files against its manifest.",
    ("ckpt", "convert"): "Convert a checkpoint to the universal (layout-free) format.",
    ("plot",): "Draw a run's loss curves to a PNG.",
    ("report",): "Draw several runs' loss (or metric) curves on the same axes to one PNG.",
    ("quickstart",): "Prepare the bundled corpus, pretrain a tiny GPT on 2 CPU processes, sample.",
    ("bench", "data"): "Benchmark prepare and the loader against raw limits (JSON).",
    ("bench", "model"): "Benchmark model forward+backward throughput (JSON).",
    ("bench", "train"): "Benchmark training steps on DeepSpeed against plain PyTorch (JSON).",
    ("bench", "ckpt"): "Benchmark checkpoint save/load against raw disk speed (JSON).",
    ("bench", "finetune"): "Benchmark fine-tuning throughput against pretraining of the same model (JSON).",
    ("bench", "eval"): "Benchmark eval (perplexity) throughput against training of the same model (JSON).",
    ("bench", "quickstart"): "Time the README's quickstart from the command line to its last line (JSON).",
    ("config", "show"): "Print a resolved config, or every config key with its doc.",
    ("config", "presets"): "List the model presets.",
}


def job_module(path: Sequence[str]) -> str:
    """The module of a command: ``("ckpt", "list")`` -> ``llmscale.jobs.ckpt_list``, ``("import",)`` ->
    ``llmscale.jobs.import_``."""
    name = "_".join(path)
    if keyword.iskeyword(name):
        name += "_"
    return "llmscale.jobs." + name


def _groups() -> dict[str, list[tuple[str, ...]]]:
    groups: dict[str, list[tuple[str, ...]]] = {}
    for path in COMMANDS:
        groups.setdefault(path[0], []).append(path)
    return groups


def _top_parser() -> argparse.ArgumentParser:
    lines = []
    for path, help_ in COMMANDS.items():
        lines.append(f"  {' '.join(path):<18} {help_}")
    p = argparse.ArgumentParser(
        prog="llmscale",
        description="Distributed pretraining of GPT and BERT models: data -> tokenizer -> Arrow shards -> DeepSpeed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun `llmscale COMMAND --help` for a command's options.",
    )
    from llmscale import __version__

    p.add_argument("--version", action="version", version=f"llmscale {__version__}")
    p.add_argument("command", nargs="?", help=argparse.SUPPRESS)
    return p


def _resolve(argv: list[str]) -> tuple[Optional[tuple[str, ...]], list[str]]:
    groups = _groups()
    if not argv or argv[0] not in groups:
        return None, argv
    paths = groups[argv[0]]
    if (argv[0],) in COMMANDS:
        return (argv[0],), argv[1:]
    if len(argv) > 1 and (argv[0], argv[1]) in COMMANDS:
        return (argv[0], argv[1]), argv[2:]
    subs = ", ".join(p[1] for p in paths)
    where = f"'{argv[1]}'" if len(argv) > 1 else "nothing"
    raise SystemExit(f"llmscale {argv[0]}: got {where}; choose one of: {subs} "
                     f"(e.g. `llmscale {' '.join(paths[0])} --help`).")


def _take_local_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher inserts ``--local_rank=N`` before the command (``deepspeed --module llmscale train
    ...`` runs ``python -m llmscale --local_rank=N train ...``); the rank also comes in LOCAL_RANK, which
    llmscale.dist reads. Take it out here; refuse it when it disagrees with LOCAL_RANK."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        value = None
        if a.startswith(("--local_rank=", "--local-rank=")):
            value = a.split("=", 1)[1]
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            value, i = argv[i + 1], i + 1
        if value is None:
            out.append(a)
        else:
            env = os.environ.get("LOCAL_RANK")
            if env is not None and env != value:
                raise SystemExit(f"llmscale: --local_rank={value} but LOCAL_RANK={env}: the launcher disagrees with "
                                 f"itself; launch with one of them.")
            os.environ.setdefault("LOCAL_RANK", value)
        i += 1
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = _take_local_rank(list(sys.argv[1:] if argv is None else argv))
    path, rest = _resolve(argv)
    if path is None:
        top = _top_parser()
        if argv and not argv[0].startswith("-"):
            top.print_usage(sys.stderr)
            print(f"llmscale: unknown command {argv[0]!r}. Run `llmscale --help` for the list.", file=sys.stderr)
            return 2
        top.parse_args(argv)
        top.print_help()
        return 0
    module = importlib.import_module(job_module(path))
    parser = argparse.ArgumentParser(prog="llmscale " + " ".join(path), description=COMMANDS[path])
    module.add_arguments(parser)
    run = module.main
    args = parser.parse_args(rest)
    args.command_path = path

    from llmscale.errors import ConfigError, UserError
    from llmscale.log import setup_logging

    setup_logging(all_ranks=bool(getattr(args, "log_all_ranks", False)))
    try:
        rc = run(args)
    except ConfigError as e:
        print(f"llmscale {' '.join(path)}: config error: {e}", file=sys.stderr)
        return 2
    except UserError as e:  # its message names the fix; anything else is a bug and keeps its traceback
        print(f"llmscale {' '.join(path)}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmscale ... | head`: the reader left; no traceback, no second error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
