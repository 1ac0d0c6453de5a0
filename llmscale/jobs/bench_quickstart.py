"""``llmscale bench quickstart [--output FILE] [--workdir DIR] [--steps N]``: the README's quickstart timed from
the command line to its last line in a fresh folder, as JSON (:func:`llmscale.bench.quickstart.run`)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default=None, help="Write the JSON here too (it is always printed).")
    p.add_argument("--workdir", default=None, help="Folder for the temporary run (default: ./runs).")
    p.add_argument("--steps", type=int, default=None, help="Fewer steps than the quickstart's config (a check).")
    p.add_argument("--keep", action="store_true", help="Keep the run folder afterwards.")


def main(args: argparse.Namespace) -> int:
    from llmscale.bench.quickstart import run
    from llmscale.files import json_report

    print(json_report(run(workdir=args.workdir, steps=args.steps, keep=args.keep), args.output))
    return 0
