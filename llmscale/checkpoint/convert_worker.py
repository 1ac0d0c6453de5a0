"""The process that runs DeepSpeed's universal conversion (``python -m llmscale.checkpoint.convert_worker ARGS``,
ARGS as ``deepspeed.checkpoint.ds_to_universal`` takes them), with ``torch.load`` restricted to the allowlist of
:mod:`llmscale.checkpoint.safe_load` for the whole process and the extraction workers it forks: the converter
reads every file of the checkpoint with many bare ``torch.load(weights_only=False)`` calls, and none of them can
run code from a forged file here.

What does not live here: when to convert and how the result joins the manifest
(:func:`llmscale.checkpoint.universal.convert_to_universal`).
"""
from __future__ import annotations

import multiprocessing
import runpy
import sys


def run(argv: list[str]) -> None:
    """Restrict ``torch.load``, then run ds_to_universal as ``__main__`` with ``argv``."""
    from llmscale.checkpoint.safe_load import restrict_process

    multiprocessing.set_start_method("fork", force=True)  # the workers inherit the restricted torch.load
    restrict_process()
    sys.argv = ["ds_to_universal", *argv]
    runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    run(sys.argv[1:])
