"""Stage fingerprints: a stage's output is reused only when it was made from the same
config (and the same upstream outputs). The record sits next to the run's outputs in
``<output_dir>/.pipeline/<stage>.json``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from distill_common.fsio import atomic_write_json, sha256_file

STAGES = ["prep", "pretrain", "export", "finetune", "report"]

# Fields that say *where* or *how to run*, not *what* is computed: changing them must not
# invalidate finished work.
_NOT_CONTENT = {"output_dir", "data_dir", "export_dir", "resume", "log_every",
                "progress_every_s", "workers", "num_workers", "ray_address", "on_error_log"}


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in sorted(obj.items()) if k not in _NOT_CONTENT}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _section(recipe, name: str) -> Any:
    return _strip(dataclasses.asdict(getattr(recipe, name)))


def stage_inputs(recipe, stage: str) -> dict:
    """What a stage's output depends on (its own sections and its upstream stage)."""
    if stage == "prep":
        inputs = {"prep": _section(recipe, "prep"), "tokenizer": recipe.teacher.path,
                  "seed": recipe.seed}
        holdout = recipe.prep.holdout
        if holdout and Path(holdout).is_file():  # what is held out, not where it is
            inputs["prep"].pop("holdout", None)
            inputs["holdout_sha256"] = sha256_file(holdout)
        return inputs
    if stage == "pretrain":
        return {"up": fingerprint(recipe, "prep"), "teacher": _section(recipe, "teacher"),
                "student": _section(recipe, "student"),
                "objective": _section(recipe, "objective"),
                "train": _section(recipe, "train"), "seed": recipe.seed}
    if stage == "export":
        return {"up": fingerprint(recipe, "pretrain")}
    if stage == "finetune":
        return {"up": fingerprint(recipe, "export"), "teacher": recipe.teacher.path,
                "finetune": _section(recipe, "finetune")}
    if stage == "report":
        return {"up": fingerprint(recipe, "finetune"), "report": _section(recipe, "report")}
    raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")


def fingerprint(recipe, stage: str) -> str:
    blob = json.dumps(stage_inputs(recipe, stage), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def record_path(recipe, stage: str) -> Path:
    return Path(recipe.output_dir) / ".pipeline" / f"{stage}.json"


def read_record(recipe, stage: str) -> dict | None:
    p = record_path(recipe, stage)
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_record(recipe, stage: str, seconds: float, outputs: dict) -> None:
    atomic_write_json(record_path(recipe, stage), {
        "stage": stage, "fingerprint": fingerprint(recipe, stage),
        "inputs": stage_inputs(recipe, stage), "seconds": round(seconds, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "outputs": outputs})


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (for 'made from a different config' messages)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".") or "<root>"]
