"""Model-aware checks of the pretraining sections, before anything runs (`distill config
validate`, `distill launch`, and first thing in `distill pretrain`): they read the
teacher's config.json and the names in its weights file, never the weights themselves.

Each check lives beside what it checks (``student.check_student``,
``objective_checks.check_objective``); this module only runs them against one teacher. Value
ranges and choices that need no model are checked by the config dataclasses.
"""

from __future__ import annotations

from distill_pretrain.architectures import ARCHITECTURES
from distill_pretrain.config import ObjectiveConfig, StudentConfig, TeacherConfig
from distill_pretrain.layer_map import ModelShape
from distill_pretrain.objective_checks import check_objective
from distill_pretrain.student import check_student, student_hf_config
from distill_pretrain.teacher import has_mlm_head, read_teacher_config


def validate_models(teacher: TeacherConfig, student: StudentConfig,
                    objective: ObjectiveConfig) -> None:
    """The student can be built from the teacher and every objective fits both. Raises
    RecipeValidationError (naming the key, the teacher folder and the fix) on the first
    problem."""
    folder, hf_config, arch = read_teacher_config(teacher.path)
    check_student(student, hf_config, arch, folder)
    student_config = student_hf_config(student, hf_config, arch)
    student_arch = ARCHITECTURES[student_config.model_type]
    check_objective(objective, teacher_shape=ModelShape.of(hf_config, arch),
                    student_shape=ModelShape.of(student_config, student_arch),
                    teacher_has_head=has_mlm_head(folder, arch), teacher_folder=folder,
                    teacher_vocab=hf_config.vocab_size,
                    student_vocab=student_config.vocab_size,
                    student_pruned=student.init == "pruned")
