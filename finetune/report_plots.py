"""The report's scatter plots: score against size on disk and against CPU latency, one
marker per (model, task), with the 95% interval of each score (bootstrap over the test
examples and the seeds, finetune.compare.score_interval) as its error bar."""

from __future__ import annotations

from pathlib import Path

from finetune.latency import latency_at

MARKERS = "osD^v<>p*h"


def metric_of(report: dict, task: str) -> str:
    for row in report["models"].values():
        if task in row["tasks"]:
            return row["tasks"][task]["metric"]
    return "?"


def _points(report: dict, task: str, xvalue) -> list[tuple]:
    """(x, score %, error below, error above, model name) of every model with a score;
    no interval: a zero error bar."""
    points = []
    for name, row in report["models"].items():
        entry = row["tasks"].get(task)
        if entry is None:
            continue
        score = 100 * entry["score"]
        low, high = (100 * v for v in entry["ci95"]) if entry.get("ci95") else (score, score)
        points.append((xvalue(row), score, max(score - low, 0), max(high - score, 0), name))
    return points


def write_scatter_plots(report: dict, out_dir: Path) -> list[str]:
    """score_vs_size.png and score_vs_latency.png; returns the file names."""
    if not report["tasks"]:
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    batch = report["latency"]["batch_sizes"][0]
    axes_spec = [("score_vs_size.png", "Score vs size", "size on disk (MiB)",
                  lambda r: r["size_mib"]),
                 ("score_vs_latency.png", "Score vs latency",
                  f"CPU latency, batch {batch} (ms)", lambda r: latency_at(r, "cpu", batch))]
    written = []
    for filename, title, xlabel, xvalue in axes_spec:
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
        for task, marker in zip(report["tasks"], MARKERS):
            pts = _points(report, task, xvalue)
            if not pts:
                continue
            xs, ys, below, above, names = zip(*pts)
            ax.errorbar(xs, ys, yerr=[below, above], fmt=marker, ms=7, capsize=4,
                        label=f"{task} ({metric_of(report, task)})")
            for x, y, name in zip(xs, ys, names):
                weight = "bold" if name == report["teacher"] else "normal"
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4),
                            fontsize=8, fontweight=weight)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("score (%), 95% interval")
        ax.set_title(f"{title} (teacher: {report['teacher']})")
        ax.margins(x=0.2, y=0.2)  # room for the name labels
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / filename)
        plt.close(fig)
        written.append(filename)
    return written
