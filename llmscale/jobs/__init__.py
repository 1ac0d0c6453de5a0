"""The commands: ``llmscale a b`` is ``llmscale/jobs/a_b.py`` (``add_arguments(parser)``, ``main(args) -> int``).

Jobs parse arguments, call the library and print; the library returns values and logs. What several
jobs print the same way lives here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def print_json(obj: Any, output: Optional[str] = None) -> None:
    """Print ``obj`` as indented JSON; with ``output`` (the benchmarks' ``--output FILE``), write it there too."""
    text = json.dumps(obj, indent=2)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n", encoding="utf-8")
    print(text)
