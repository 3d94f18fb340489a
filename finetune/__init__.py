"""Downstream fine-tuning of any Hugging Face encoder folder, and the comparison report.

Public API (heavy imports happen on first use, so `distill --help` stays fast):
    run_task(model_dir, task, out_dir, cfg=None, task_overrides=()) -> dict
    build_report(models, results, out_dir, teacher, cfg=None) -> dict
    run_tasks(model_dir, out_dir, cfg=None) -> dict[task name, dict]
    run_models(models, out_dir, cfg=None) -> dict[model name, dict[task name, dict]]
    heldout_doc_hashes(task) -> set[str]
    write_holdout_file(tasks, path) -> int
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "run_task": "finetune.train",
    "run_tasks": "finetune.train",
    "run_models": "finetune.train",
    "write_holdout_file": "finetune.holdout",
    "build_report": "finetune.report",
    "heldout_doc_hashes": "finetune.holdout",
    "load_task": "finetune.tasks",
    "TaskError": "finetune.tasks",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
