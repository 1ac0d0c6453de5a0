"""The command rule: `llmscale a b` is llmscale/jobs/a_b.py (add_arguments + main); library modules hold no
main, no add_arguments and no print; `llmscale --help` imports no command module."""
from __future__ import annotations

import argparse
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from llmscale.cli import COMMANDS, job_module

PKG = Path(__file__).resolve().parents[1] / "llmscale"


def test_module_names_follow_the_rule():
    assert job_module(("ckpt", "list")) == "llmscale.jobs.ckpt_list"
    assert job_module(("import",)) == "llmscale.jobs.import_"
    assert job_module(("tokenizer", "train")) == "llmscale.jobs.tokenizer_train"


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_command_is_a_job_module(path):
    module = importlib.import_module(job_module(path))
    assert callable(module.main)
    parser = argparse.ArgumentParser(prog="llmscale " + " ".join(path))
    module.add_arguments(parser)
    parser.format_help()


def test_every_job_module_is_a_command():
    commands = {job_module(p).rsplit(".", 1)[1] for p in COMMANDS}
    modules = {p.stem for p in (PKG / "jobs").glob("*.py") if not p.name.startswith("_")}
    assert modules == commands


def _library_files():
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG)
        if rel.parts[0] == "jobs" or rel == Path("cli.py") or rel == Path("__main__.py"):
            continue
        yield rel, p


def test_library_modules_do_not_print_or_define_commands():
    found = []
    for rel, p in _library_files():
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name in ("main", "add_arguments"):
                found.append(f"{rel}:{node.lineno} defines {node.name}()")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id == "print":
                    found.append(f"{rel}:{node.lineno} calls print()")
                elif (isinstance(f, ast.Attribute) and f.attr == "write" and isinstance(f.value, ast.Attribute)
                      and f.value.attr in ("stdout", "stderr") and isinstance(f.value.value, ast.Name)
                      and f.value.value.id == "sys"):
                    found.append(f"{rel}:{node.lineno} writes to sys.{f.value.attr}")
    assert not found, "library modules return values and log; the job prints:\n" + "\n".join(found)


def test_top_level_help_imports_no_command():
    code = ("import sys; from llmscale.cli import main; rc = main(['--help']); "
            "bad = [m for m in sys.modules if m.startswith('llmscale.jobs.') or m in ('torch', 'deepspeed', 'numpy')]; "
            "sys.exit(3 if bad or rc else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "data verify" in proc.stdout and "bench ckpt" in proc.stdout


def test_sizes_only_is_spelled_the_same_everywhere():
    for path in (("data", "verify"), ("ckpt", "verify")):
        parser = argparse.ArgumentParser()
        importlib.import_module(job_module(path)).add_arguments(parser)
        assert parser.parse_args(["x", "--no-checksums"]).no_checksums is True
        with pytest.raises(SystemExit):
            parser.parse_args(["x", "--quick"])


def test_output_into_a_closed_pipe_is_not_a_traceback():
    """`llmscale ... | head`: once the reader has left, writing raises BrokenPipeError; the command ends quietly
    with 141 (128 + SIGPIPE) instead of a traceback. Here stdout is a pipe whose read end is already closed."""
    import subprocess
    import sys

    code = ("import os, sys\n"
            "r, w = os.pipe()\n"
            "os.close(r)\n"
            "os.dup2(w, 1)\n"
            "from llmscale.cli import main\n"
            "sys.exit(main(['config', 'show']))\n")  # ~10 kB of output: more than one buffer flush inside main
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
