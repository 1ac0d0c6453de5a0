"""`llmscale report`: several runs' curves on one PNG, against steps, tokens or wall time (llmscale/plots.py).

The runs here are metrics.jsonl files written with the trainer's record fields, so the figures each row
reports can be checked exactly, a resumed run's stop included; test_train.py draws a real run's curves.
"""
import json
from pathlib import Path

import pytest

from llmscale.testing import run_cli

PNG = b"\x89PNG\r\n\x1a\n"


def _run(path: Path, losses: list[float], *, step_time: float, tokens_per_step: int, val: dict, t0: float = 1e9,
         stop_after: int | None = None, stop_s: float = 0.0) -> Path:
    """A run dir whose train records are logged every 10 steps; a stop of stop_s seconds after step stop_after."""
    path.mkdir(parents=True)
    recs, t = [], t0
    for i, loss in enumerate(losses):
        step = 10 * (i + 1)
        t += 10 * step_time
        if stop_after is not None and step == stop_after + 10:
            t += stop_s  # preempted, requeued, resumed
        recs.append({"kind": "train", "step": step, "time": t, "loss": loss, "tokens_seen": step * tokens_per_step,
                     "step_time_s": step_time})
        if step in val:
            recs.append({"kind": "val", "step": step, "time": t + 1, "val_loss": val[step], "accuracy": 0.5})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_report_compares_runs_by_step_tokens_and_wall_time(tmp_path):
    from llmscale.plots import compare_runs

    a = _run(tmp_path / "gpt", [5.0, 4.0, 3.5, 3.2], step_time=0.5, tokens_per_step=1000, val={20: 3.9, 40: 3.1})
    b = _run(tmp_path / "lstm", [5.5, 4.8, 4.4, 4.2, 4.1, 4.0], step_time=0.25, tokens_per_step=500,
             val={30: 4.5, 60: 4.05}, stop_after=30, stop_s=3600.0)
    pngs = {}
    for x in ("step", "tokens", "time"):
        out, rows = compare_runs([a, b], tmp_path / f"{x}.png", x=x)
        assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
        pngs[x] = out.read_bytes()
        ra, rb = rows
        assert (ra["run"], ra["steps"], ra["final_train_loss"], ra["val_loss"], ra["best_val_loss"]) == \
            ("gpt", 40, 3.2, 3.1, 3.1)
        assert (rb["run"], rb["steps"], rb["tokens"], rb["val_loss"]) == ("lstm", 60, 30_000, 4.05)
        # wall minutes: 4 windows of 10 steps x 0.5 s = 20 s (the first record counts from 0) ...
        assert ra["minutes"] == pytest.approx(15 / 60, abs=0.01)
        # ... and the hour the LSTM run spent stopped after step 30 is not training time
        assert rb["minutes"] == pytest.approx(12.5 / 60, abs=0.01)
    assert len(set(pngs.values())) == 3  # three different axes, three different figures
    one, _ = compare_runs([a], tmp_path / "one.png")
    assert one.read_bytes() != pngs["step"]

    # another validation metric, legend labels, through the CLI
    proc = run_cli(["report", str(a), str(b), "--metric", "accuracy", "--label", "GPT", "--label", "LSTM",
                    "--x", "tokens", "--output", str(tmp_path / "acc.png")])
    lines = proc.stdout.strip().splitlines()
    assert [json.loads(line)["run"] for line in lines[:2]] == ["GPT", "LSTM"]
    assert json.loads(lines[0])["accuracy"] == 0.5
    assert Path(lines[-1]).read_bytes()[:8] == PNG


def test_report_refuses_what_it_cannot_draw(tmp_path):
    from llmscale.errors import PlotError
    from llmscale.plots import compare_runs

    a = _run(tmp_path / "a", [1.0, 0.9], step_time=0.1, tokens_per_step=10, val={})
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlotError, match="no loss records"):
        compare_runs([a, tmp_path / "empty"], tmp_path / "x.png")
    with pytest.raises(PlotError, match="one --label per run"):
        compare_runs([a], tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(PlotError, match="x axis"):
        compare_runs([a], tmp_path / "x.png", x="epochs")
    proc = run_cli(["report", str(tmp_path / "empty"), "--output", str(tmp_path / "x.png")], check=False)
    assert proc.returncode == 1 and "Train first" in proc.stderr
    assert not (tmp_path / "x.png").exists()
