"""The recipe: one YAML file that every stage reads its own section of.

The launcher and the pipeline only pass recipes around; no stage re-declares another's
knobs. Paths a stage hands to the next default to folders under ``output_dir``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from data_prep.config import PrepConfig
from distill_common.config import check, load_config
from distill_pretrain.config import ObjectiveConfig, StudentConfig, TeacherConfig
from distill_pretrain.train_config import TrainConfig
from finetune.config import FinetuneConfig, ReportConfig


@dataclass
class Recipe:
    name: str = "debug"
    """Run name; used in folder names, job names and the model card."""
    output_dir: str = "runs/${name}"
    """Root folder of the run: shards, checkpoints, student, fine-tunes, report."""
    seed: int = 0
    """Seed for everything random (data order, masking, init)."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self):
        check(bool(self.name.strip()), "name", "must not be empty")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        root = self.output_dir.rstrip("/")
        if self.prep.output_dir is None:
            self.prep.output_dir = f"{root}/shards"
        if self.train.data_dir is None:
            self.train.data_dir = self.prep.output_dir
        if self.train.output_dir is None:
            self.train.output_dir = f"{root}/pretrain"
        if self.train.export_dir is None:
            self.train.export_dir = f"{root}/student"
        if self.finetune.output_dir is None:
            self.finetune.output_dir = f"{root}/finetune"
        if self.report.output_dir is None:
            self.report.output_dir = f"{root}/report"


def configs_dir() -> Path:
    """The shipped recipes: the repository's ``configs/`` (or ``DISTILL_CONFIGS_DIR``)."""
    env = os.environ.get("DISTILL_CONFIGS_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "configs"


def resolve_recipe_path(name_or_path: str) -> Path:
    """``debug`` -> configs/debug.yaml; anything with a suffix or a slash is a path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path or p.exists():
        return p
    return configs_dir() / f"{name_or_path}.yaml"


def load_recipe(name_or_path: str, overrides: Sequence[str] = ()) -> Recipe:
    return load_config(Recipe, resolve_recipe_path(name_or_path), overrides)
