"""A distillation run's score against the wall-clock time it was given: which checkpoint
was there after N minutes, and the plot of score against minutes.

Minutes of distillation are read from the run's ``metrics.jsonl`` timestamps (one record
every ``log_every`` steps): the time from the first optimizer step on, evaluation and
checkpoint writing included, the student's construction (pruning's calibration too)
and any downtime between a kill and its resume left out. A resume shows as one gap
between two records far longer than the steps between them take: that gap is counted
as those steps at the run's median pace.

Used by bench/pruning_study.py.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Mapping, Sequence

RESTART_SLACK_S = 300.0
"""A gap this much longer than its steps take at the median pace is a restart (an
evaluation of a few hundred sequences plus a checkpoint take well under a minute)."""


def elapsed_by_step(metrics_path: Path) -> dict[int, float]:
    """step -> seconds of distillation when that step's last record was written."""
    from distill_common.tracking import read_metrics  # skips a torn last line

    last: dict[int, float] = {}
    for record in read_metrics(metrics_path):
        if "step" in record and "time" in record:
            last[int(record["step"])] = float(record["time"])
    steps = sorted(last)
    if len(steps) < 2:
        raise ValueError(f"{metrics_path}: fewer than two timed records; the run has not "
                         f"logged enough steps to tell its pace")
    pairs = [(b - a, last[b] - last[a]) for a, b in zip(steps, steps[1:])]
    pace = statistics.median(dt / ds for ds, dt in pairs)  # seconds per step
    elapsed = {steps[0]: steps[0] * pace}
    for previous, step, (ds, dt) in zip(steps, steps[1:], pairs):
        if dt > ds * pace + RESTART_SLACK_S:
            dt = ds * pace
        elapsed[step] = elapsed[previous] + dt
    return elapsed


def elapsed_at(elapsed: Mapping[int, float], step: int) -> float:
    """Seconds of distillation at ``step``, interpolated between the nearest records."""
    if step in elapsed:
        return elapsed[step]
    steps = sorted(elapsed)
    below = [s for s in steps if s < step]
    above = [s for s in steps if s > step]
    if not below or not above:
        edge = below[-1] if below else above[0]
        pace = (elapsed[steps[-1]] - elapsed[steps[0]]) / max(steps[-1] - steps[0], 1)
        return elapsed[edge] + (step - edge) * pace
    a, b = below[-1], above[0]
    return elapsed[a] + (elapsed[b] - elapsed[a]) * (step - a) / (b - a)


def checkpoint_steps(root: Path) -> dict[int, Path]:
    """step -> folder of every complete checkpoint under ``root`` (the run's
    ``checkpoints/``)."""
    from distill_pretrain.checkpoint import is_complete, list_checkpoints

    return {int(p.name.split("-")[1]): p for p in list_checkpoints(Path(root))
            if is_complete(p)}


def nearest_checkpoints(checkpoints: Mapping[int, Path], elapsed: Mapping[int, float],
                        minutes: Sequence[float]) -> dict[float, dict]:
    """For each budget in ``minutes`` (> 0), the checkpoint written nearest to it:
    {minutes: {"step", "minutes" (its own), "path"}}."""
    chosen = {}
    for budget in minutes:
        step = min(checkpoints, key=lambda s: abs(elapsed_at(elapsed, s) / 60 - budget))
        chosen[budget] = {"step": step, "minutes": round(elapsed_at(elapsed, step) / 60, 2),
                          "path": str(checkpoints[step])}
    return chosen


def plot_budget_curve(curves: Mapping[str, Mapping[str, Sequence[dict]]],
                      teacher: Mapping[str, float], path: Path) -> Path:
    """One panel per task: each series' score (with its 95% interval as an error bar)
    against minutes of distillation, the teacher's score and 95% of it as lines.
    ``curves``: series name -> task -> [{"minutes", "score", "ci95"}, ...] (scores as
    fractions); ``teacher``: task -> score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(teacher)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, per_task in curves.items():
            points = sorted(per_task.get(task, []), key=lambda p: p["minutes"])
            if not points:
                continue
            xs = [p["minutes"] for p in points]
            ys = [100 * p["score"] for p in points]
            err = [[100 * (p["score"] - p["ci95"][0]) for p in points],
                   [100 * (p["ci95"][1] - p["score"]) for p in points]] \
                if all(p.get("ci95") for p in points) else None
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
        ax.axhline(100 * teacher[task], color="black", linewidth=1, label="teacher")
        ax.axhline(95 * teacher[task], color="gray", linestyle="--", linewidth=1,
                   label="95% of teacher")
        ax.set_title(task)
        ax.set_xlabel("minutes of distillation (2-core CPU)")
        ax.set_ylabel("test score (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
