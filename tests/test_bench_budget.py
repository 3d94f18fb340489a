"""bench/budget_curve.py and bench/pruning_table.py (the pruning study's budget points
and targets): minutes of distillation from metrics.jsonl timestamps, a resume's downtime
left out; the checkpoint nearest each budget; the targets and the table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def _metrics(path: Path, records: list[tuple[int, float]]) -> Path:
    path.write_text("".join(json.dumps({"step": s, "time": t, "train/total": 1.0}) + "\n"
                            for s, t in records))
    return path


def test_elapsed_counts_steps_and_leaves_a_restart_out(tmp_path):
    from budget_curve import elapsed_at, elapsed_by_step

    # 2 s a step, logged every 10 steps from t=1000; an eval record at step 20 (10 s);
    # killed after step 40, resumed an hour later.
    records = [(10, 1020.0), (20, 1040.0), (20, 1050.0), (30, 1070.0), (40, 1090.0),
               (50, 1090.0 + 3600 + 20), (60, 1090.0 + 3600 + 40)]
    elapsed = elapsed_by_step(_metrics(tmp_path / "m.jsonl", records))
    assert elapsed[10] == pytest.approx(20.0)  # the first 10 steps at the median pace
    assert elapsed[20] == pytest.approx(50.0)  # the evaluation's 10 s counted
    assert elapsed[40] == pytest.approx(90.0)
    assert elapsed[50] == pytest.approx(110.0)  # the hour of downtime is not
    assert elapsed[60] == pytest.approx(130.0)
    assert elapsed_at(elapsed, 25) == pytest.approx(60.0)  # between two records
    assert elapsed_at(elapsed, 70) == pytest.approx(130.0 + 10 * 110 / 50)  # beyond them
    with pytest.raises(ValueError, match="fewer than two"):
        elapsed_by_step(_metrics(tmp_path / "one.jsonl", [(10, 5.0)]))


def test_nearest_checkpoint_to_each_budget(tmp_path):
    from budget_curve import nearest_checkpoints

    elapsed = {s: s * 6.0 for s in range(10, 1001, 10)}  # 6 s a step: 10 steps a minute
    checkpoints = {s: tmp_path / f"step-{s:08d}" for s in (90, 160, 300, 450, 600)}
    chosen = nearest_checkpoints(checkpoints, elapsed, [15, 30, 60])
    assert {b: c["step"] for b, c in chosen.items()} == {15: 160, 30: 300, 60: 600}
    assert chosen[15]["minutes"] == 16.0 and chosen[60]["path"].endswith("step-00000600")


def _summary(p_scores: dict, speedup: dict, gap_low: float) -> dict:
    tasks = list(p_scores)
    row = lambda score, ret: {"mean": score, "std": 0.01, "retention_pct": ret,  # noqa: E731
                              "ci95": [score - 0.02, score + 0.02], "vs_teacher": None}
    models = {"teacher": {"minutes": 0, "step": 0, "parameters_M": 109.5, "size_mib": 418.0,
                          "cpu_ms": {"b1": 100.0, "b32": 2700.0},
                          "speedup": {"cpu_b1": 1.0, "cpu_b32": 1.0},
                          "tasks": {t: row(0.9, 100.0) for t in tasks}}}
    for name, minutes in (("p0", 0), ("p@60", 58.7), ("s0", 0), ("s@60", 59.1)):
        models[name] = {"minutes": minutes, "step": 10 * int(minutes), "parameters_M": 22.7,
                        "size_mib": 86.8, "cpu_ms": {"b1": 18.0, "b32": 400.0},
                        "speedup": speedup,
                        "tasks": {t: row(0.9 * r / 100, r) for t, r in p_scores.items()}}
    gap = {"diff": 0.05, "ci95": [gap_low, 0.08], "p_a_ahead": 0.99}
    return {"tasks": tasks, "budgets": [60.0], "models": models,
            "p_minus_s": {"0": {t: gap for t in tasks}, "60": {t: gap for t in tasks}},
            "distillation_gain": {"p@60": {t: {"diff": -0.01, "ci95": [-0.03, 0.01]}
                                           for t in tasks}}}


def test_targets_and_table():
    from pruning_table import markdown_table, targets

    summary = _summary({"sst": 96.0, "pos": 93.5}, {"cpu_b1": 5.9, "cpu_b32": 6.7}, 0.01)
    t = summary["targets"] = targets(summary)
    assert t["at_minutes"] == 58.7 and not t["retention_ok"]
    assert t["retention_short_by_points"] == {"pos": 1.5}
    assert t["speedup_ok"] and t["p_beats_s_ok"] and t["p_beats_s_ci95"]["sst"]
    table = markdown_table(summary)
    assert "| (p) 58.7 min (step 580) |" in table and "| (p0) not distilled |" in table
    assert "| (p) - (s) at 60 min | +5.00 [+1.00, +8.00] |" in table
    assert "| (p) 58.7 min (step 580) - (p0) | -1.00 [-3.00, +1.00] |" in table
    assert "86.40 ± 1.00 (96.0%) [84.4, 88.4]" in table
    assert "learning rate" not in table
    summary["finetune"] = {"student_lr": [3e-4, 1e-3]}  # --student-lr: the table says so
    for name, row in summary["models"].items():
        for entry in row["tasks"].values():
            entry["learning_rate"] = 1e-4 if name == "teacher" else 1e-3
    table = markdown_table(summary)
    assert "at its task's learning rate and at 0.0003, 0.001, and scored" in table
    assert "86.40 ± 1.00 (96.0%) [84.4, 88.4] lr 0.001 |" in table
    assert "(100.0%) [88.0, 92.0] |" in table  # the teacher's rate is not shown
    slow = _summary({"sst": 96.0}, {"cpu_b1": 5.9, "cpu_b32": 4.8}, -0.01)
    t = targets(slow)
    assert t["retention_ok"] and not t["speedup_ok"] and not t["p_beats_s_ok"]
    slow["speedup_target"] = 4.0  # the MiniLM-L6 -> 4 x 256 recipe's target
    assert targets(slow)["speedup_ok"] and "speed-up >= 4x" in markdown_table(
        {**slow, "targets": targets(slow)})


def test_targets_with_p_alone_or_s_at_a_smaller_budget():
    """`--runs p`: no (s), so no margins and the target is not measured (None, not
    False); (s) scored only at a smaller budget: compared there, and the table says so."""
    from pruning_table import markdown_table, targets

    alone = _summary({"sst": 96.0}, {"cpu_b1": 5.9, "cpu_b32": 6.7}, 0.01)
    alone["p_minus_s"] = {}
    for name in ("s0", "s@60"):
        del alone["models"][name]
    t = alone["targets"] = targets(alone)
    assert t["p_beats_s_ok"] is None and t["p_beats_s_at_minutes"] is None
    assert t["retention_ok"] and t["speedup_ok"]
    assert "(p) against (s): not measured ((s) was not run)." in markdown_table(alone)
    earlier = _summary({"sst": 96.0}, {"cpu_b1": 5.9, "cpu_b32": 6.7}, 0.01)
    earlier["p_minus_s"] = {"0": earlier["p_minus_s"]["0"],
                            "30": {"sst": {"diff": 0.03, "ci95": [0.01, 0.05]}}}
    t = earlier["targets"] = targets(earlier)
    assert t["p_beats_s_ok"] and t["p_beats_s_at_minutes"] == 30.0
    assert "(p) beats (s) at 30 min with an interval above zero" in markdown_table(earlier)


def test_budget_curve_plot_is_written(tmp_path):
    from budget_curve import plot_budget_curve

    curves = {"(p)": {"sst": [{"minutes": 0, "score": 0.7, "ci95": [0.68, 0.72]},
                              {"minutes": 30, "score": 0.8, "ci95": [0.78, 0.82]}]},
              "(s)": {"sst": [{"minutes": 0, "score": 0.5, "ci95": None}]}}
    path = plot_budget_curve(curves, {"sst": 0.85}, tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_unknown_run_is_refused_before_anything_is_written(tmp_path):
    import subprocess

    bench = Path(__file__).resolve().parent.parent / "bench" / "pruning_study.py"
    out = tmp_path / "study"
    done = subprocess.run([sys.executable, str(bench), "--runs", "p,x", "--steps", "1",
                           "--save-every", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "--runs 'p,x': give p,s (both runs), p or s" in done.stderr
    assert not out.exists()


def test_holdout_tasks_hold_out_more_than_the_tasks_fine_tuned(tmp_path):
    """--holdout-tasks: a study fine-tuned on a subset of the tasks still keeps every
    listed task's evaluation text out of its shards (the same shards as the full study);
    by default only --tasks' text is held out."""
    import pandas as pd

    from quality import task_inputs  # what pruning_study.py and quality.py call

    tasks = {}
    for name, word in (("rivers", "river"), ("songs", "song")):
        rows = [{"text": f"{word} number {i} is {'good' if i % 2 else 'bad'}",
                 "label": i % 2} for i in range(100)]
        pd.DataFrame(rows).to_csv(tmp_path / f"{name}.csv", index=False)
        tasks[name] = tmp_path / f"{name}.yaml"
        tasks[name].write_text(f"name: {name}\nsource: {{path: {name}.csv}}\n"
                               "columns: {text: text, label: label}\n")

    def held_out(tasks_, held, out):
        files, shared = task_inputs([str(tasks[t]) for t in tasks_],
                                    [str(tasks[t]) for t in held], [], [0], out)
        assert set(files) == {str(tasks[t]) for t in {*tasks_, *held}}
        assert f"prep.holdout={out / 'holdout.txt'}" in shared
        assert f"finetune.tasks=[{tasks['rivers']}]" in shared  # fine-tuned: --tasks only
        lines = (out / "holdout.txt").read_text().splitlines()
        return lines[0], set(lines[1:])

    header, both = held_out(["rivers"], ["rivers", "songs"], tmp_path / "both")
    assert "rivers, songs" in header and len(both) == 40  # 20% of each task: val + test
    header, alone = held_out(["rivers"], ["rivers"], tmp_path / "one")
    assert "songs" not in header and len(alone) == 20 and alone < both
