"""The distillation itself, in the report: each objective part (``train/part/*``), the
total loss, the student's MLM accuracy and the teacher-student agreement on held-out
data (``eval/mlm_accuracy``, ``eval/agreement``) against the pretraining step.

They are read from the pretraining run's ``metrics.jsonl`` (the file; fine-tuning does
not import pretraining code). Which run made a student is recorded in the student's
``distill_run.json`` (the recipe's ``train.output_dir``); a relative output_dir is looked
up from the folders above the student first (the pipeline's layout is
``<output_dir>/student`` beside ``<output_dir>/pretrain``), then from the current folder
(a student exported elsewhere). The pipeline passes the file explicitly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from distill_common.tracking import read_metrics

log = logging.getLogger(__name__)

TRAIN_TAGS = ("train/total",)
TRAIN_PREFIX = "train/part/"
EVAL_TAGS = ("eval/mlm_accuracy", "eval/agreement")
MAX_POINTS = 400
"""Points kept per curve in report.json (evenly thinned; the last is always kept)."""


def find_run_metrics(model_dir: Path) -> Optional[Path]:
    """The metrics.jsonl of the pretraining run that made ``model_dir``; None when the
    folder is not a student of ours or the run's folder is not here."""
    record = Path(model_dir) / "distill_run.json"
    if not record.is_file():
        return None
    try:
        recipe = json.loads(record.read_text()).get("recipe") or {}
    except ValueError:
        return None
    output_dir = (recipe.get("train") or {}).get("output_dir")
    if not output_dir:
        return None
    rel = Path(output_dir)
    candidates = [rel] if rel.is_absolute() else \
        [up / rel for up in Path(model_dir).resolve().parents] + [Path.cwd() / rel]
    found = next((c / "metrics.jsonl" for c in candidates if (c / "metrics.jsonl").is_file()),
                 None)
    if found is None:
        log.info("report: %s was distilled in %s, whose metrics.jsonl is not here; no "
                 "distillation curves for it", model_dir, output_dir)
    return found


def read_curves(path: Path) -> dict:
    """``{"metrics": path, "series": {tag: [[step, value], ...]}}`` for the objective
    parts, the total, MLM accuracy and agreement that the file has."""
    series: dict[str, list] = {}
    for record in read_metrics(path):
        step = record.get("step")
        for tag, value in record.items():
            wanted = tag in TRAIN_TAGS or tag in EVAL_TAGS or tag.startswith(TRAIN_PREFIX)
            if wanted and isinstance(value, (int, float)) and step is not None:
                series.setdefault(tag, []).append([step, value])
    return {"metrics": str(path), "series": {t: _thin(v) for t, v in sorted(series.items())}}


def _thin(points: list) -> list:
    if len(points) <= MAX_POINTS:
        return points
    stride = len(points) / (MAX_POINTS - 1)
    kept = [points[int(i * stride)] for i in range(MAX_POINTS - 1)]
    return kept + [points[-1]]


def plot_curves(name: str, curves: dict, out_dir: Path) -> str:
    """``distillation_<name>.png``: the losses (log scale) on the left, MLM accuracy and
    agreement on the right; returns the file name."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    series = curves["series"]
    fig, (loss_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for tag, points in series.items():
        if tag in TRAIN_TAGS or tag.startswith(TRAIN_PREFIX):
            label = "total" if tag == "train/total" else tag[len(TRAIN_PREFIX):]
            loss_ax.plot(*zip(*points), label=label, lw=2.2 if tag == "train/total" else 1.2)
    loss_ax.set_yscale("log")
    loss_ax.set(xlabel="pretraining step", ylabel="training loss (parts unweighted)",
                title=f"{name}: objective parts")
    for tag in EVAL_TAGS:
        if tag in series:
            eval_ax.plot(*zip(*series[tag]), marker="o", ms=3, label=tag.split("/")[1])
    eval_ax.set(xlabel="pretraining step", ylabel="on held-out shards", ylim=(0, 1),
                title=f"{name}: student MLM accuracy, teacher agreement")
    for ax in (loss_ax, eval_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    filename = f"distillation_{name}.png"
    fig.savefig(out_dir / filename)
    plt.close(fig)
    return filename
