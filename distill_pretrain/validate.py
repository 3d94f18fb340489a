"""Model-aware checks of a recipe, before anything runs (`distill config validate`, and
first thing in `distill pretrain`): they read the teacher's config.json and the names in
its weights file, never the weights themselves.

Structural checks that need no model (value ranges, choices) are in the dataclasses of
``config.py``; these are the ones that need to know the teacher.
"""

from __future__ import annotations

from pathlib import Path

from distill_pretrain.architectures import dims
from distill_pretrain.config import ObjectiveConfig, RecipeValidationError, StudentConfig
from distill_pretrain.objective import ModelShape, objective_layer_pairs

__all__ = ["RecipeValidationError", "validate_recipe", "check_objective", "check_student"]

REPRESENTATION_HINT = ("use a representation recipe instead, e.g. configs/minilmv2.yaml "
                       "(objective.qkv_relation_kl) or configs/minilm.yaml "
                       "(objective.attention_kl + value_relation_kl), or point teacher.path "
                       "at a checkpoint with a masked-LM head (e.g. a *ForMaskedLM folder)")


def _fail(key: str, message: str) -> None:
    raise RecipeValidationError(f"{key}: {message}")


def check_objective(cfg: ObjectiveConfig, *, teacher_shape: ModelShape,
                    student_shape: ModelShape, teacher_has_head: bool,
                    teacher_folder: Path | str, teacher_vocab: int,
                    student_vocab: int) -> None:
    """Every active term fits this teacher and student; raises RecipeValidationError."""
    active = cfg.active()
    if not active:
        _fail("objective", "no objective is set; set at least one section, e.g. "
                           "objective.qkv_relation_kl.weight=1, or start from configs/*.yaml")
    if "logit_kl" in active and not teacher_has_head:
        _fail("objective.logit_kl", f"needs the teacher's masked-LM head, but the weights in "
                                    f"{teacher_folder} have none (a head would be random "
                                    f"and its soft targets noise); {REPRESENTATION_HINT}")
    for name in ("logit_kl", "mlm"):
        if name in active and teacher_vocab != student_vocab:
            _fail(f"objective.{name}", f"teacher vocabulary ({teacher_vocab} in "
                                       f"{teacher_folder}) and student vocabulary "
                                       f"({student_vocab}) differ; logits cannot be compared. "
                                       f"Build the student with the teacher's tokenizer")
    s_layers, t_layers = student_shape.num_layers, teacher_shape.num_layers
    for name, pairs in objective_layer_pairs(cfg, s_layers, t_layers).items():
        low = 0 if name == "embedding_mse" else 1
        for s, t in pairs:
            if not low <= s <= s_layers:
                _fail(f"objective.{name}", f"student layer {s} is outside 1..{s_layers} "
                                           f"(student.num_layers={s_layers})")
            if not low <= t <= t_layers:
                _fail(f"objective.{name}", f"teacher layer {t} is outside 1..{t_layers} "
                                           f"(the teacher {teacher_folder} has {t_layers} "
                                           f"layers)")
    for name in ("attention_score_mse", "attention_kl", "value_relation_kl"):
        if name in active and student_shape.num_heads != teacher_shape.num_heads:
            _fail(f"objective.{name}",
                  f"compares attention per head and needs equal head counts, but the "
                  f"teacher ({teacher_folder}) has {teacher_shape.num_heads} and the student "
                  f"{student_shape.num_heads}; set student.num_heads="
                  f"{teacher_shape.num_heads} if it divides the student width, or use "
                  f"objective.qkv_relation_kl (MiniLMv2), which works across head counts")
    if "hidden_cosine" in active and student_shape.hidden_size != teacher_shape.hidden_size:
        _fail("objective.hidden_cosine",
              f"needs equal widths (teacher {teacher_shape.hidden_size}, student "
              f"{student_shape.hidden_size}); use objective.hidden_mse, which learns a "
              f"projection")
    relation = cfg.qkv_relation_kl
    if relation is not None:
        r = relation.relation_heads
        for who, width in (("teacher", teacher_shape.hidden_size),
                           ("student", student_shape.hidden_size)):
            if width % r:
                divisors = [d for d in range(1, width + 1)
                            if teacher_shape.hidden_size % d == 0
                            and student_shape.hidden_size % d == 0]
                _fail("objective.qkv_relation_kl.relation_heads",
                      f"{who} width {width} is not divisible by relation_heads={r}; choose "
                      f"a common divisor of {teacher_shape.hidden_size} and "
                      f"{student_shape.hidden_size}, e.g. "
                      f"{[d for d in divisors if d <= 64][-3:]}")


def check_student(cfg: StudentConfig, teacher_config, arch, teacher_folder) -> None:
    """The student can be built from this teacher."""
    from distill_pretrain.student import copies_teacher_layers, embedding_init_mode, \
        student_dims

    t_layers, t_hidden, t_heads = dims(teacher_config, arch)
    t_inter = getattr(teacher_config, arch.intermediate_size_key)
    d = student_dims(cfg, teacher_config, arch)
    if d["hidden_size"] % d["num_heads"]:
        _fail("student.num_heads", f"{d['num_heads']} heads do not divide hidden_size="
                                   f"{d['hidden_size']}; set student.num_heads to a divisor")
    if copies_teacher_layers(cfg, teacher_config, arch):
        same = (d["hidden_size"], d["num_heads"], d["intermediate_size"]) == \
            (t_hidden, t_heads, t_inter)
        if not same:
            _fail("student.init", f"teacher_layers copies teacher layers, which needs the "
                                  f"teacher's shape (hidden {t_hidden}, heads {t_heads}, "
                                  f"intermediate {t_inter}; {teacher_folder}), got "
                                  f"{d['hidden_size']}/{d['num_heads']}/"
                                  f"{d['intermediate_size']}; use init=random for a "
                                  f"narrower student")
        if cfg.teacher_layers is not None:
            bad = [k for k in cfg.teacher_layers if not 1 <= k <= t_layers]
            if bad:
                _fail("student.teacher_layers", f"layers {bad} are outside 1..{t_layers} "
                                                f"(the teacher {teacher_folder})")
        if cfg.num_layers > t_layers:
            _fail("student.num_layers", f"{cfg.num_layers} layers cannot be copied from a "
                                        f"{t_layers}-layer teacher; use init=random")
    elif cfg.teacher_layers is not None:
        _fail("student.teacher_layers", "is set, but the student is not initialised from "
                                        "teacher layers (its shape differs from the "
                                        "teacher's); drop it or set init=teacher_layers")
    mode = embedding_init_mode(cfg, teacher_config, arch)
    if mode == "copy" and d["hidden_size"] != t_hidden:
        _fail("student.embedding_init", f"copy needs the teacher's width {t_hidden}, the "
                                        f"student has {d['hidden_size']}; use svd or random")
    if mode == "svd" and d["hidden_size"] > t_hidden:
        _fail("student.embedding_init", f"svd gives at most the teacher's width {t_hidden}, "
                                        f"the student has {d['hidden_size']}; use random")


def _check_data_tokenizer(recipe, folder: Path) -> None:
    """When the recipe names the tokenizer of its shards, it must be the teacher's."""
    tokenizer = getattr(getattr(recipe, "prep", None), "tokenizer", None)
    if not tokenizer:
        return
    from transformers import AutoTokenizer

    from distill_common.assets import resolve_model_dir
    from distill_common.textnorm import vocab_hash

    try:
        data_dir = resolve_model_dir(str(tokenizer))
    except Exception:  # not a model folder / asset: prep checks its own field
        return
    if Path(data_dir).resolve() == Path(folder).resolve():
        return
    ours = vocab_hash(AutoTokenizer.from_pretrained(folder))
    theirs = vocab_hash(AutoTokenizer.from_pretrained(data_dir))
    if ours != theirs:
        _fail("prep.tokenizer", f"{data_dir} has another vocabulary than the teacher "
                                f"{folder}; the teacher and student read the same token ids, "
                                f"so tokenize with the teacher's tokenizer")


def validate_recipe(recipe) -> None:
    """Check the recipe's teacher/student/objective sections against the teacher's files.
    Raises RecipeValidationError (naming key, teacher folder and fix) on the first
    problem."""
    from distill_pretrain.architectures import ARCHITECTURES
    from distill_pretrain.student import student_hf_config
    from distill_pretrain.teacher import has_mlm_head, read_teacher_config

    folder, hf_config, arch = read_teacher_config(recipe.teacher.path)
    check_student(recipe.student, hf_config, arch, folder)
    student_config = student_hf_config(recipe.student, hf_config, arch)
    student_arch = ARCHITECTURES[student_config.model_type]
    check_objective(recipe.objective, teacher_shape=ModelShape.of(hf_config, arch),
                    student_shape=ModelShape.of(student_config, student_arch),
                    teacher_has_head=has_mlm_head(folder, arch), teacher_folder=folder,
                    teacher_vocab=hf_config.vocab_size,
                    student_vocab=student_config.vocab_size)
    _check_data_tokenizer(recipe, folder)
    if recipe.train.export and (recipe.train.export_onnx or recipe.train.export_onnx_int8):
        from distill_common.onnx_export import OnnxUserError, require_onnx

        try:  # now, not after hours of training
            require_onnx()
        except OnnxUserError as err:
            raise RecipeValidationError(f"train.export_onnx: {err}; or set "
                                        f"train.export_onnx=false") from None
