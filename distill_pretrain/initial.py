"""`distill init RECIPE OUT`: the student exactly as `distill pretrain` would start it
(any ``student.init``: random, teacher_layers, pruned), written as a Hugging Face folder
(``model.safetensors``, ``config.json``, the teacher's tokenizer) plus ``init.json``: how
it was initialised and what it kept of the teacher (layer map, heads, hidden channels,
FFN neurons, importance scores). It can be inspected, fine-tuned as a baseline (the
quality benchmark's undistilled students), or distilled further.

It carries the teacher's pooler exactly as `distill export` would (export_heads: copied,
SVD-projected or cut to the kept channels), so that the undistilled baseline and the
distilled student start fine-tuning alike: without it the baseline's sequence classifier
reads a random pooler and the distilled one the teacher's trained pooler, and a
comparison of the two measures the pooler as much as the distillation.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _shape(config, arch) -> dict:
    from distill_pretrain.architectures import dims, embedding_width

    layers, hidden, heads = dims(config, arch)
    return {"layers": layers, "hidden_size": hidden, "heads": heads,
            "intermediate_size": getattr(config, arch.intermediate_size_key),
            "embedding_size": embedding_width(config, arch)}


def init_record(job, teacher, student, record: dict) -> dict:
    """The content of init.json."""
    from distill_common.config import to_dict

    params = sum(p.numel() for p in student.base_model.parameters())
    return {"recipe": job.name, "seed": job.seed,
            "teacher": {"path": str(teacher.path), **_shape(teacher.config, teacher.arch),
                        "has_mlm_head": teacher.has_mlm_head},
            "student": {**_shape(student.config, teacher.arch),
                        "parameters_without_head": params},
            "student_recipe": to_dict(job.student), **record}


def write_initial_student(job, out_dir: str | Path) -> Path:
    """Check the recipe's pretraining sections (``job``: a PretrainJob), build its student
    (measuring the teacher on the training shards when init=pruned) and write it to
    ``out_dir`` atomically; returns the folder."""
    from transformers import AutoTokenizer

    from distill_common import manifest as shards
    from distill_common.assets import resolve_model_dir
    from distill_common.fsio import atomic_dir, atomic_write_json
    from distill_pretrain.calibration import calibration_for
    from distill_pretrain.data import check_tokenizer
    from distill_pretrain.student import initialise_student
    from distill_pretrain.teacher import load_teacher
    from distill_pretrain.validate import validate_models

    validate_models(job.teacher, job.student, job.objective)
    calibration = calibration_for(job.student, job.train.data_dir, job.seed)
    if calibration is not None:  # before loading the teacher: shards of its vocabulary
        folder = resolve_model_dir(job.teacher.path)
        check_tokenizer(shards.load_manifest(calibration.data_dir),
                        AutoTokenizer.from_pretrained(folder), calibration.data_dir,
                        str(folder))
    teacher = load_teacher(job.teacher)
    student, record = initialise_student(job.student, teacher, seed=job.seed,
                                         calibration=calibration)
    record["pooler"] = _attach_teacher_pooler(student, teacher, record)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        teacher.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "init.json", init_record(job, teacher, student, record))
    log.info("initial student (%s) -> %s", record["init"], out_dir)
    return out_dir


def _attach_teacher_pooler(student, teacher, record: dict) -> dict:
    """Give the masked-LM ``student`` the pooler its export would carry (export_heads's
    plan); returns the plan's record for init.json (``pooler``: teacher, teacher_svd,
    teacher_pruned, fresh or none, and why)."""
    from dataclasses import replace

    from distill_pretrain.architectures import dims
    from distill_pretrain.export_heads import (export_model, plan_heads, read_teacher_parts,
                                               student_pooler)
    from distill_pretrain.prune import TEACHER_CHANNELS_KEY

    arch = teacher.arch
    # The SVD basis is recomputed from the embeddings in the dtype the student was built
    # from, as the export does.
    dtype = teacher.base.get_submodule(arch.embeddings).get_submodule(
        arch.word_embeddings).weight.dtype
    parts = read_teacher_parts(teacher.path, dtype)
    plan = plan_heads({}, record, arch, parts)
    pooler = student_pooler(plan, parts, dims(student.config, arch)[1],
                            getattr(student.config, TEACHER_CHANNELS_KEY, None))
    if pooler is not None:
        # A plan that keeps the masked-LM class: the folder stays the student as
        # pretraining starts it, MLM head included, with the pooler beside it.
        export_model(student, arch, replace(plan, mlm_head="teacher"), pooler)
    log.info("initial student: pooler %s (%s)", plan.pooler, plan.note)
    return {"pooler": plan.pooler, "note": plan.note}
