"""The shape of the package, checked from its source: each concern has one home, jobs never import jobs,
library code never imports test helpers, models stay single-device, no import cycle, one user-error base."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "llmscale"


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """llmscale modules imported anywhere in the file (module level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("llmscale")}
        elif (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmscale")
              and node.level == 0):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return {m for m in found if m in MODULES}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_the_homes_exist_and_say_what_lives_there():
    for name in ("llmscale.checkpoint", "llmscale.checkpoint.store", "llmscale.checkpoint.codec",
                 "llmscale.checkpoint.universal", "llmscale.checkpoint.manager", "llmscale.checkpoint.consolidate",
                 "llmscale.parallel", "llmscale.parallel.plan", "llmscale.parallel.tensor",
                 "llmscale.parallel.pipeline", "llmscale.parallel.topology", "llmscale.artifacts", "llmscale.errors",
                 "llmscale.files", "llmscale.dist", "llmscale.scoring", "llmscale.eval_tasks", "llmscale.config_eval",
                 "llmscale.harness"):
        doc = ast.get_docstring(ast.parse(MODULES[name].read_text(encoding="utf-8")))
        assert doc and len(doc) > 80, f"{name} needs a module docstring saying what lives there"
    for name in ("llmscale.checkpoint", "llmscale.parallel", "llmscale.artifacts", "llmscale.scoring",
                 "llmscale.eval_tasks", "llmscale.config_eval", "llmscale.harness"):
        doc = ast.get_docstring(ast.parse(MODULES[name].read_text(encoding="utf-8")))
        assert "does not live here" in doc, name
    big = {n: len(p.read_text().splitlines()) for n, p in MODULES.items() if n.startswith("llmscale.checkpoint")}
    assert max(big.values()) <= 420, big


def test_jobs_never_import_jobs():
    for name, deps in GRAPH.items():
        if name.startswith("llmscale.jobs."):
            assert not {d for d in deps if d.startswith("llmscale.jobs")}, name  # the package face included


def test_library_code_never_imports_the_test_helpers():
    for name, deps in GRAPH.items():
        if name != "llmscale.testing":
            assert "llmscale.testing" not in deps, name


def test_models_stay_single_device():
    for name, path in MODULES.items():
        if name.startswith("llmscale.models"):
            text = path.read_text(encoding="utf-8")
            assert "import deepspeed" not in text and "from deepspeed" not in text, name
            assert not {d for d in GRAPH[name] if d.startswith(("llmscale.parallel", "llmscale.engine"))}, name


def test_no_import_cycle():
    # package faces (__init__) re-export their submodules; an arrow into a package counts as into its face only
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(GRAPH[n]):
            if d.startswith(n + "."):  # a package importing its own submodules
                continue
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(d) is None:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(GRAPH):
        if state.get(n) is None:
            visit(n)


def test_deepspeed_privates_only_in_the_marked_adapter():
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        if name != "llmscale.engine":
            assert "_config.load_universal_checkpoint" not in text, name
            assert "._name_map" not in text, name
    engine = MODULES["llmscale.engine"].read_text(encoding="utf-8")
    tree = ast.parse(engine)
    users = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
             and "load_universal_checkpoint" in ast.get_source_segment(engine, f)}
    assert users == {"_deepspeed_loads_universal"}, users


def test_every_error_is_a_user_error_and_the_cli_prints_it_plainly(capsys):
    from llmscale import cli, errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == "llmscale.errors"]
    assert len(classes) >= 10
    assert all(issubclass(c, errors.UserError) for c in classes)
    # a real command failing with a UserError: one line naming the fix, exit 1, no traceback
    rc = cli.main(["ckpt", "list", "/nonexistent/run"])
    err = capsys.readouterr().err
    assert rc == 1 and "error:" in err and "Traceback" not in err and "checkpoint.every_steps" in err


def test_readme_layout_and_launch_docs_name_what_exists():
    import re

    root = PKG.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index("## Layout"):]
    block = block[block.index("```") + 3:]
    block = block[:block.index("```")]
    for line in block.splitlines():
        m = re.match(r"^  (\S.*?)\s{2,}(.*)$", line)
        if not m:
            continue
        names, what = m.group(1).split(), m.group(2)
        for name in names:
            assert (PKG / name).exists(), f"README Layout names llmscale/{name}, which does not exist"
            if name.endswith("/"):
                listed = [w.strip(",") for w in re.split(r"[ ,]+", what.split("(")[0]) if re.fullmatch(r"[a-z_]+,?", w)]
                if name in ("data/", "models/", "parallel/", "checkpoint/", "bench/"):
                    for mod in listed:
                        assert (PKG / name / f"{mod}.py").is_file(), f"README Layout: {name}{mod}.py does not exist"
    docs = [root / "README.md", *(p for d in ("launch", "slurm") for p in (root / d).rglob("*") if p.is_file())]
    for doc in docs:
        for cfg in re.findall(r"configs/[A-Za-z0-9_]+\.yaml", doc.read_text(encoding="utf-8")):
            assert (root / cfg).is_file(), f"{doc.name} names {cfg}, which does not exist"
