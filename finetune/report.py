"""The comparison report: what each student kept (score, retention) and what it saved
(parameters, bytes, latency, speed-up), against the teacher.

``build_report`` measures every model folder the same way (finetune.latency: the models'
CPU runs interleaved, so that a changing load falls on all alike), joins the
fine-tuning results, and writes report.json, report.md and PNG plots: score against size
and latency with each score's 95% interval as error bars (report_plots), and each
distilled model's training curves (finetune.curves). Sizes are in MiB (2**20 bytes).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Optional

import torch

from distill_common.fsio import atomic_write_json, atomic_write_text
from finetune.config import ReportConfig
from distill_common.progress import Progress
from finetune.curves import find_run_metrics, plot_curves, read_curves
from finetune.latency import latency_at, measure_all
from finetune.loading import export_record
from finetune.onnx_report import onnx_section, ort_cells, ort_header
from finetune.report_notes import distillation_lines, pooler_lines
from finetune.report_plots import metric_of, write_scatter_plots
from finetune.tasks import TaskConfig, TaskError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or den is None or den == 0:
        return None
    return round(num / den, 3)


def _task_entry(result: Mapping, draws: int) -> dict:
    return {"metric": result["metric"], "score": result["score"],
            "std": result.get("score_std", 0.0), "split": result.get("score_split"),
            "ci95": _score_interval(result, draws),
            "seeds": [r["seed"] for r in result.get("seeds", [])],
            "mean": result.get("mean", {}), "saved_model": result.get("saved_model"),
            "pooler": result.get("pooler"), "unseen_labels": result.get("unseen_labels"),
            "learning_rate": result.get("learning_rate"),
            "lr_validation": result.get("lr_validation")}


def _score_interval(result: Mapping, draws: int) -> Optional[list[float]]:
    """The score's 95% interval (bootstrap over the examples and seeds), or None."""
    from finetune.compare import score_interval

    if draws < 1:
        return None
    try:
        return score_interval(dict(result), draws=draws)["ci95"]
    except (ValueError, KeyError) as err:
        log.info("report: no interval for %s on %s: %s", result.get("model_dir"),
                 result.get("task"), err)
        return None


def _gap_to_teacher(student: Optional[Mapping], teacher: Optional[Mapping],
                    draws: int) -> Optional[dict]:
    """Student - teacher score with a 95% interval (paired bootstrap over the test
    examples and the seeds, finetune.compare), when both results kept their predictions
    on the same examples; None otherwise (results from an older version, or another
    split)."""
    from finetune.compare import compare_results

    if not student or not teacher or draws < 1:
        return None
    try:
        return compare_results(student, teacher, draws=draws)
    except (ValueError, KeyError) as err:
        log.info("report: no interval for %s vs the teacher on %s: %s",
                 student.get("model_dir"), student.get("task"), err)
        return None


def build_report(models: Mapping[str, "str | Path"], results: Mapping[str, Mapping[str, Mapping]],
                 out_dir: "str | Path", teacher: str, cfg: Optional[ReportConfig] = None,
                 task_configs: Optional[Mapping[str, "TaskConfig"]] = None,
                 pretrain_metrics: Optional[Mapping[str, "str | Path"]] = None) -> dict:
    """Compare ``models`` (name -> HF folder or model asset name) on the tasks in ``results`` (model name ->
    task name -> run_task dict; a missing pair shows as no score). Retention and
    speed-up are relative to ``models[teacher]``. Writes report.json, report.md,
    score_vs_size.png and score_vs_latency.png into ``out_dir``; returns the report.
    ``task_configs``: task name -> TaskConfig for tasks that are not built-in (the ONNX
    check re-reads their test split). ``pretrain_metrics``: model name -> the
    metrics.jsonl of the run that distilled it (default: found from the folder's
    distill_run.json, finetune.curves)."""
    cfg = cfg or ReportConfig()
    if teacher not in models:
        raise TaskError(f"report: teacher {teacher!r} is not one of the models "
                        f"{sorted(models)}; pass --teacher NAME with a --model NAME=DIR")
    unknown = sorted(set(results) - set(models))
    if unknown:
        raise TaskError(f"report: results for {unknown} but no such model; models are "
                        f"{sorted(models)}")
    if cfg.onnx:
        from distill_common.onnx_export import require_onnx

        require_onnx()  # before the PyTorch measurements, not after
    out_dir = Path(out_dir)
    threads = cfg.threads or torch.get_num_threads()
    gpu = cfg.gpu == "auto" and torch.cuda.is_available()
    tasks = sorted({t for per_model in results.values() for t in per_model})
    folders: dict[str, Path] = {}
    progress = Progress("report latency", unit="runs", total=len(models)
                        * len(cfg.latency_batch_sizes) * (2 if gpu else 1))
    from distill_common.assets import resolve_model_dir

    for name, folder in models.items():
        folder = folders[name] = Path(folder) if Path(folder).is_dir() \
            else resolve_model_dir(str(folder))
        if not (folder / "config.json").is_file():
            raise TaskError(f"report: model {name!r}: {folder} is not a Hugging Face model "
                            f"folder (no config.json)")
    log.info("report: measuring %s at %d CPU thread(s)%s", ", ".join(folders), threads,
             ", their runs interleaved" if cfg.latency_interleave else "")
    rows = measure_all(folders, cfg.latency_batch_sizes, cfg.latency_seq_len,
                       cfg.latency_warmup, cfg.latency_repeats, threads, gpu,
                       interleave=cfg.latency_interleave, progress=progress)
    for name, row in rows.items():
        folder = folders[name]
        row["path"] = str(folder)
        row["size_mib"] = round(row["size_bytes"] / 2**20, 2)
        row["export"] = export_record(folder)
        row["tasks"] = {t: _task_entry(r, cfg.bootstrap_draws)
                        for t, r in results.get(name, {}).items()}
    progress.close()
    if cfg.onnx:
        from finetune.onnx_report import add_onnx

        add_onnx(rows, folders, results, cfg, out_dir, threads, task_configs)
    base = rows[teacher]
    for name, row in rows.items():
        row["compression"] = _ratio(base["parameters"], row["parameters"])
        row["speedup"] = {}
        for where in ("cpu", "gpu"):
            for b in cfg.latency_batch_sizes:
                value = _ratio(latency_at(base, where, b), latency_at(row, where, b))
                if value is not None:
                    row["speedup"][f"{where}_b{b}"] = value
        for task, entry in row["tasks"].items():
            ref = base["tasks"].get(task)
            entry["retention_pct"] = round(100 * entry["score"] / ref["score"], 2) \
                if ref and ref["score"] else None
            if name != teacher:
                entry["vs_teacher"] = _gap_to_teacher(results.get(name, {}).get(task),
                                                      results.get(teacher, {}).get(task),
                                                      cfg.bootstrap_draws)
    report = {"format_version": FORMAT_VERSION, "teacher": teacher, "tasks": tasks,
              "latency": {"batch_sizes": cfg.latency_batch_sizes, "seq_len": cfg.latency_seq_len,
                          "warmup": cfg.latency_warmup, "repeats": cfg.latency_repeats,
                          "interleaved": cfg.latency_interleave,
                          "cpu_threads": threads, "statistic": "median",
                          "gpu": torch.cuda.get_device_name() if gpu else None,
                          "cpu_count": os.cpu_count(), "torch": torch.__version__},
              "models": rows, "plots": [],
              "distillation": _curves(folders, pretrain_metrics or {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.plots:
        report["plots"] = write_scatter_plots(report, out_dir) + [
            plot_curves(name, c, out_dir) for name, c in report["distillation"].items()]
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", to_markdown(report))
    log.info("report written to %s", out_dir)
    return report


def _curves(folders: Mapping[str, Path], given: Mapping[str, "str | Path"]) -> dict:
    """model name -> its distillation curves, for the models whose run's metrics.jsonl
    is given or found."""
    out = {}
    for name, folder in folders.items():
        path = Path(given[name]) if name in given else find_run_metrics(folder)
        if path is not None and path.is_file():
            out[name] = read_curves(path)
    return out


# ------------------------------------------------------------------ rendering

def _fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def to_markdown(report: dict) -> str:
    lat = report["latency"]
    batches = lat["batch_sizes"]
    has_gpu = lat["gpu"] is not None
    teacher = report["teacher"]
    lines = ["# Distillation report", "",
             f"Teacher: **{teacher}**. Latency: bare encoder forward, {lat['seq_len']} tokens, "
             f"median of {lat['repeats']} runs after {lat['warmup']} warm-up"
             + (", the models' runs interleaved" if lat.get("interleaved") else "") + ", "
             f"{lat['cpu_threads']} CPU thread(s)"
             + (f"; GPU: {lat['gpu']} (bf16)" if has_gpu else "; no GPU") + ".", "",
             "## Size and speed", ""]
    head = ["model", "params (M)", "size (MiB)", "compression"] + \
        [f"CPU b{b} (ms)" for b in batches] + [f"CPU seq/s b{batches[-1]}"] + \
        [f"speed-up CPU b{b}" for b in batches] + ort_header(report)
    if has_gpu:
        head += [f"GPU b{b} (ms)" for b in batches] + [f"speed-up GPU b{b}" for b in batches]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in report["models"].items():
        cells = [f"**{name}**" if name == teacher else name,
                 _fmt(row["parameters"] / 1e6, ".2f"), _fmt(row["size_mib"], ".1f"),
                 _fmt(row["compression"], ".2f", "x")]
        cells += [_fmt(latency_at(row, "cpu", b), ".1f") for b in batches]
        cells += [_fmt(row["cpu"][-1]["throughput_seq_per_s"], ".1f")]
        cells += [_fmt(row["speedup"].get(f"cpu_b{b}"), ".2f", "x") for b in batches]
        cells += ort_cells(report, row, _fmt)
        if has_gpu:
            cells += [_fmt(latency_at(row, "gpu", b), ".2f") for b in batches]
            cells += [_fmt(row["speedup"].get(f"gpu_b{b}"), ".2f", "x") for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Scores", ""]
    if not report["tasks"]:
        lines.append("No fine-tuning results were given.")
    else:
        lines += ["Score: mean over seeds (± population std) of the task metric on the test "
                  "split; retention: % of the teacher's score.", ""]
        head = ["model"] + [f"{t} ({metric_of(report, t)})" for t in report["tasks"]] + \
            [f"{t} retention" for t in report["tasks"]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, row in report["models"].items():
            cells = [name]
            for t in report["tasks"]:
                e = row["tasks"].get(t)
                cells.append("-" if e is None else
                             f"{100 * e['score']:.2f} ± {100 * e['std']:.2f} (n={len(e['seeds'])})"
                             + (f", lr {e['learning_rate']:g}" if e.get("lr_validation") else ""))
            for t in report["tasks"]:
                e = row["tasks"].get(t)
                cells.append(_fmt(e and e.get("retention_pct"), ".1f", "%"))
            lines.append("| " + " | ".join(cells) + " |")
        grids = sorted({rate for row in report["models"].values() for e in row["tasks"].values()
                        for rate in (e.get("lr_validation") or {})}, key=float)
        if grids:
            lines += ["", f"lr: the fine-tuning learning rate, chosen per model and task from "
                      f"{', '.join(grids)} on the seeds' mean validation score (test scores "
                      f"play no part)."]
        gaps = [(name, t, row["tasks"][t]["vs_teacher"]) for name, row in report["models"].items()
                for t in report["tasks"]
                if t in row["tasks"] and row["tasks"][t].get("vs_teacher")]
        if gaps:
            lines += ["", "Gap to the teacher, in points, with a 95% interval (paired "
                      "bootstrap over the test examples and the seeds): an interval that "
                      "holds 0 means this test set cannot tell the two apart.", "",
                      "| model | task | gap | 95% interval | draws with the student ahead |",
                      "|---|---|---|---|---|"]
            for name, t, g in gaps:
                low, high = g["ci95"]
                lines.append(f"| {name} | {t} | {100 * g['diff']:+.2f} | "
                             f"[{100 * low:+.2f}, {100 * high:+.2f}] | "
                             f"{100 * g['p_a_ahead']:.0f}% |")
    lines += pooler_lines(report) + distillation_lines(report) + onnx_section(report)
    scatter = [p for p in report["plots"] if not p.startswith("distillation_")]
    if scatter:
        lines += ["", "## Plots", "", "Error bars: each score's 95% interval (bootstrap over "
                  "the test examples and the seeds).", ""] + [f"![{p}]({p})" for p in scatter]
    return "\n".join(lines) + "\n"
