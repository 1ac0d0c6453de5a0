"""``llmscale ckpt list RUN_DIR``: the checkpoints of a run, newest last, with step, size, layout and state."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="Run directory (or its checkpoints/ folder).")
    p.add_argument("--json", action="store_true", help="Print one JSON object instead of a table.")


def main(args: argparse.Namespace) -> int:
    from llmscale.checkpoint import CheckpointError, checkpoints_dir, list_checkpoints, read_latest

    d = checkpoints_dir(args.run_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d} does not exist: {args.run_dir} has no checkpoints yet "
                              f"(set checkpoint.every_steps in the run config).")
    infos = list_checkpoints(d)
    latest = read_latest(d)
    rows = []
    for i in infos:
        m = i.manifest
        lay = m.get("layout", {})
        rows.append({
            "name": i.name, "step": i.step, "complete": i.complete, "latest": i.name == latest,
            "bytes": m.get("total_bytes"), "files": len(m.get("files", {})), "created": m.get("created"),
            "layout": {k: lay.get(k) for k in ("dp", "tp", "pp", "zero_stage")} if lay else None,
            "universal": bool(m.get("universal")),
            "tokens_seen": (m.get("state_summary") or {}).get("trainer", {}).get("tokens_seen"),
        })
    others = sorted(c.name for c in d.iterdir() if c.name not in {r["name"] for r in rows} and c.name != "latest")
    if args.json:
        print(json.dumps({"dir": str(d), "latest": latest, "checkpoints": rows, "other_entries": others}, indent=1))
        return 0
    print(f"{d}  (latest: {latest or '-'})")
    print(f"{'name':<14} {'step':>8} {'state':<10} {'size MB':>9} {'layout':<22} {'tokens':>12}  created")
    for r in rows:
        lay = r["layout"]
        lay_s = f"dp{lay['dp']} tp{lay['tp']} pp{lay['pp']} z{lay['zero_stage']}" if lay else "-"
        state = ("complete" if r["complete"] else "INCOMPLETE") + ("*" if r["latest"] else "")
        size = f"{r['bytes'] / 1e6:.1f}" if r["bytes"] is not None else "-"
        print(f"{r['name']:<14} {r['step']:>8} {state:<10} {size:>9} {lay_s:<22} {r['tokens_seen'] or '-':>12}  "
              f"{r['created'] or '-'}")
    if others:
        print("not checkpoints (interrupted saves, damaged ones set aside): " + ", ".join(others))
    return 0
