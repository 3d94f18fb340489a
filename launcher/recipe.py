"""The recipe: one YAML file that every stage reads its own section of.

The recipe type composes the stages' own config types, so it lives above them, here; the
launcher, the pipeline and the CLI pass recipes around and hand each stage only its
sections (``pretrain_job()``, ``recipe.prep``...). No stage re-declares another's knobs.
Paths a stage hands to the next default to folders under ``output_dir``. Checks that
span stages (the shards' tokenizer is the teacher's) are here too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from data_prep.config import PrepConfig
from distill_common.config import check, load_config, to_dict
from distill_common.resources import shipped_folder
from distill_pretrain.config import ObjectiveConfig, PretrainJob, StudentConfig, TeacherConfig
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

    def pretrain_job(self) -> PretrainJob:
        """The sections `distill pretrain` reads, plus the whole recipe for the record."""
        return PretrainJob(name=self.name, seed=self.seed, teacher=self.teacher,
                           student=self.student, objective=self.objective, train=self.train,
                           recipe=to_dict(self))


def configs_dir() -> Path:
    """The shipped recipes (distill_common.resources: installed with the package, or the
    repository's ``configs/``; ``DISTILL_CONFIGS_DIR`` overrides)."""
    return shipped_folder("configs")


def resolve_recipe_path(name_or_path: str) -> Path:
    """``debug`` -> configs/debug.yaml; anything with a suffix or a slash is a path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path or p.exists():
        return p
    return configs_dir() / f"{name_or_path}.yaml"


def load_recipe(name_or_path: str, overrides: Sequence[str] = ()) -> Recipe:
    return load_config(Recipe, resolve_recipe_path(name_or_path), overrides)


def validate_recipe(recipe: Recipe) -> None:
    """Every check that needs the teacher's files: the pretraining sections against the
    teacher, then the shards' tokenizer (when the recipe names one) against it."""
    from distill_pretrain.validate import validate_models

    validate_models(recipe.teacher, recipe.student, recipe.objective)
    _check_data_tokenizer(recipe)
    train = recipe.train
    if train.export and (train.export_onnx or train.export_onnx_int8):
        from distill_common.onnx_export import OnnxUserError, require_onnx
        from distill_pretrain.config import fail

        try:  # now, not after hours of training
            require_onnx()
        except OnnxUserError as err:
            fail("train.export_onnx", f"{err}; or set train.export_onnx=false")


def _check_data_tokenizer(recipe: Recipe) -> None:
    """When the recipe names the tokenizer of its shards, it must be the teacher's."""
    if not recipe.prep.tokenizer:
        return
    from transformers import AutoTokenizer

    from distill_common.assets import resolve_model_dir
    from distill_common.textnorm import vocab_hash
    from distill_pretrain.config import fail

    teacher = resolve_model_dir(recipe.teacher.path)
    try:
        data_tokenizer = resolve_model_dir(str(recipe.prep.tokenizer))
    except Exception:  # not a model folder / asset: prep checks its own field
        return
    if Path(data_tokenizer).resolve() == Path(teacher).resolve():
        return
    if vocab_hash(AutoTokenizer.from_pretrained(teacher)) != \
            vocab_hash(AutoTokenizer.from_pretrained(data_tokenizer)):
        fail("prep.tokenizer", f"{data_tokenizer} has another vocabulary than the teacher "
                               f"{teacher}; the teacher and student read the same token ids, "
                               f"so tokenize with the teacher's tokenizer")
