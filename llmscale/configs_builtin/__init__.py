"""Configs shipped inside the package (found by `llmscale quickstart` however llmscale is installed)."""
from pathlib import Path

DIR = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """The shipped config ``name`` (e.g. "quickstart.yaml")."""
    p = DIR / name
    if not p.is_file():
        raise FileNotFoundError(f"llmscale ships no config {name!r}; "
                                f"shipped: {sorted(x.name for x in DIR.glob('*.yaml'))}")
    return p
