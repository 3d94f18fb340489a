"""The report's ONNX part (``report.onnx: true``): each model's encoder timed under ONNX
Runtime (fp32 and dynamic int8) at the PyTorch rows' settings, and each fine-tuned model
checked to score its test split under ONNX Runtime as under PyTorch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Optional

from finetune.config import ReportConfig
from finetune.latency import latency_at
from finetune.tasks import TaskConfig, TaskError

log = logging.getLogger(__name__)

ORT_KEYS = ("ort", "ort_int8")


def add_onnx(rows: dict[str, dict], folders: Mapping[str, Path],
             results: Mapping[str, Mapping[str, Mapping]], cfg: ReportConfig, out_dir: Path,
             threads: int, tasks: Optional[Mapping[str, TaskConfig]] = None) -> None:
    """Fill ``row["ort"]``/``row["ort_int8"]`` (latency rows) and each task entry's
    ``onnx`` (the score check) in place; exports go under ``out_dir/onnx/<model>``."""
    from finetune.latency import onnx_latency
    from finetune.onnx_check import onnx_task_check

    for name, row in rows.items():
        log.info("report: ONNX Runtime latency of %s at %d thread(s)", name, threads)
        row.update(onnx_latency(folders[name], cfg.latency_batch_sizes, cfg.latency_seq_len,
                                warmup=cfg.latency_warmup, repeats=cfg.latency_repeats,
                                threads=threads, onnx_dir=out_dir / "onnx" / name))
        for task_name, entry in row["tasks"].items():
            result = results[name][task_name]
            task = _task(task_name, tasks)
            if not result.get("saved_model") or task is None:
                entry["onnx"] = {"skipped": "no saved model (finetune.save_model=none)"
                                 if task else f"task recipe {task_name!r} not found"}
                continue
            entry["onnx"] = onnx_task_check(result, task,
                                            out_dir / "onnx" / name / task_name,
                                            cfg.onnx_tolerance, threads)


def _task(name: str, tasks: Optional[Mapping[str, TaskConfig]]) -> Optional[TaskConfig]:
    from finetune.tasks import load_task

    if tasks and name in tasks:
        return tasks[name]
    try:
        return load_task(name)  # a built-in task
    except TaskError:
        return None


def ort_header(report: dict) -> list[str]:
    if not _has_ort(report):
        return []
    batches = report["latency"]["batch_sizes"]
    return [f"ORT b{b} (ms)" for b in batches] + [f"ORT int8 b{b} (ms)" for b in batches]


def ort_cells(report: dict, row: dict, fmt) -> list[str]:
    if not _has_ort(report):
        return []
    batches = report["latency"]["batch_sizes"]
    return [fmt(latency_at(row, key, b), ".1f") for key in ORT_KEYS for b in batches]


def _has_ort(report: dict) -> bool:
    return any(row.get("ort") for row in report["models"].values())


def onnx_section(report: dict) -> list[str]:
    """The markdown table of the ONNX score checks (none: no lines)."""
    checks = [(name, task, e["onnx"]) for name, row in report["models"].items()
              for task, e in row["tasks"].items() if e.get("onnx")]
    if not checks:
        return []
    lines = ["", "## ONNX Runtime", "",
             "Each fine-tuned model exported to ONNX and scored on its test split by ONNX "
             "Runtime (CPU), against PyTorch fp32 on the same examples; latency columns "
             "above are the bare encoder under ONNX Runtime, fp32 and dynamic int8.", "",
             "| model | task | PyTorch fp32 | ONNX fp32 | ONNX int8 | same predictions "
             "(fp32 / int8) | ONNX = PyTorch |", "|---|---|---|---|---|---|---|"]
    for name, task, c in checks:
        if "skipped" in c:
            lines.append(f"| {name} | {task} | - | - | - | - | skipped: {c['skipped']} |")
            continue
        int8_score, int8_same = ("-", "-") if c.get("onnx_int8") is None else \
            (f"{100 * c['onnx_int8']:.2f}", f"{100 * c['onnx_int8_agreement']:.1f}%")
        lines.append(
            f"| {name} | {task} | {100 * c['pytorch_fp32']:.2f} | {100 * c['onnx']:.2f} | "
            f"{int8_score} | {100 * c['onnx_agreement']:.1f}% / {int8_same} | "
            f"{'yes' if c['equal'] else 'NO'} (±{100 * c['tolerance']:.2f} points) |")
    return lines
