"""Tiny recipes for the launcher tests (teacher and corpus from tests/conftest.py)."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import yaml


def write_tiny_recipe(folder: Path, teacher_dir: Path, corpus_dir: Path, *,
                      output_dir: Path | None = None, max_steps: int = 4,
                      filename: str = "tiny.yaml") -> Path:
    """A recipe that distils the 4x64 tiny teacher into 2 layers in a few CPU seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {
        "name": "launchtest",
        "output_dir": str(output_dir or folder / "run"),
        "seed": 0,
        "teacher": {"path": str(teacher_dir)},
        "student": {"num_layers": 2},
        "objective": {"logit_kl": {"weight": 1.0}, "mlm": {"weight": 1.0}},
        "prep": {"sources": [str(corpus_dir)], "seq_len": 32, "doc_split": "blank_line",
                 "validation_fraction": 0.1, "docs_per_shard": 40, "workers": 0},
        "train": {"max_steps": max_steps, "micro_batch_size": 4, "zero_stage": 1,
                  "precision": "fp32", "device": "cpu", "num_workers": 0,
                  "log_every": 1, "eval_every": 0, "save_every": 0, "eval_samples": 16,
                  "tensorboard": False, "export": False},
    }
    path = folder / filename
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_distill(args: list[str], *, env: dict | None = None, cwd: Path | None = None,
                timeout: float = 300) -> "subprocess.CompletedProcess[str]":
    """`python -m distill_cli ARGS` as the user would run it; output captured."""
    return subprocess.run([sys.executable, "-m", "distill_cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def prepared_shards(base: Path, recipe: Path) -> Path:
    """Shards of the tiny corpus (in-process prep, no Ray), made once per test session
    and shared by the Slurm and torchrun tests."""
    out = base / "launch-shards"
    if not (out / "manifest.json").is_file():
        r = run_distill(["prep", str(recipe), f"prep.output_dir={out}", "prep.workers=0"])
        assert r.returncode == 0, r.stderr[-3000:]
    return out


def write_executable(path: Path, text: str) -> Path:
    """A script (a stand-in for sbatch, srun, pdsh, ...) at ``path``, executable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path
