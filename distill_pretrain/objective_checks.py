"""Whether a recipe's objective fits its teacher and student (layer numbers in range,
head counts, widths, relation heads dividing both widths, an MLM head where a logit loss
needs one, equal vocabularies): run by ``build_objective`` and, before anything is
loaded, by ``validate.validate_models`` (`distill config validate`, `distill launch`).
"""

from __future__ import annotations

from pathlib import Path

from distill_pretrain.config import ObjectiveConfig, fail
from distill_pretrain.layer_map import ModelShape, objective_layer_pairs

REPRESENTATION_HINT = ("use a representation recipe instead, e.g. configs/minilmv2.yaml "
                       "(objective.qkv_relation_kl) or configs/minilm.yaml "
                       "(objective.attention_kl + value_relation_kl), or point teacher.path "
                       "at a checkpoint with a masked-LM head (e.g. a *ForMaskedLM folder)")


def check_objective(cfg: ObjectiveConfig, *, teacher_shape: ModelShape,
                    student_shape: ModelShape, teacher_has_head: bool,
                    teacher_folder: Path | str, teacher_vocab: int,
                    student_vocab: int, student_pruned: bool = False) -> None:
    """Every active term fits both models (pruned: see prune.py); raises otherwise."""
    active = cfg.active()
    if not active:
        fail("objective", "no objective is set; set at least one section, e.g. "
                           "objective.qkv_relation_kl.weight=1, or start from configs/*.yaml")
    if "logit_kl" in active and not teacher_has_head:
        fail("objective.logit_kl", f"needs the teacher's masked-LM head, but the weights in "
                                    f"{teacher_folder} have none (a head would be random "
                                    f"and its soft targets noise); {REPRESENTATION_HINT}")
    for name in ("logit_kl", "mlm"):
        if name in active and teacher_vocab != student_vocab:
            fail(f"objective.{name}", f"teacher vocabulary ({teacher_vocab} in "
                                       f"{teacher_folder}) and student vocabulary "
                                       f"({student_vocab}) differ; logits cannot be compared. "
                                       f"Build the student with the teacher's tokenizer")
    s_layers, t_layers = student_shape.num_layers, teacher_shape.num_layers
    for name, pairs in objective_layer_pairs(cfg, s_layers, t_layers).items():
        low = 0 if name == "embedding_mse" else 1
        for s, t in pairs:
            if not low <= s <= s_layers:
                fail(f"objective.{name}", f"student layer {s} is outside 1..{s_layers} "
                                           f"(student.num_layers={s_layers})")
            if not low <= t <= t_layers:
                fail(f"objective.{name}", f"teacher layer {t} is outside 1..{t_layers} "
                                           f"(the teacher {teacher_folder} has {t_layers} "
                                           f"layers)")
    for name in ("attention_score_mse", "attention_kl", "value_relation_kl"):
        if name in active and student_shape.num_heads != teacher_shape.num_heads:
            fail(f"objective.{name}",
                  f"compares attention per head and needs equal head counts, but the "
                  f"teacher ({teacher_folder}) has {teacher_shape.num_heads} and the student "
                  f"{student_shape.num_heads}; set student.num_heads="
                  f"{teacher_shape.num_heads} if it divides the student width, or use "
                  f"objective.qkv_relation_kl (MiniLMv2), which works across head counts")
    if "hidden_cosine" in active and student_shape.hidden_size != teacher_shape.hidden_size \
            and not student_pruned:
        fail("objective.hidden_cosine",
              f"needs equal widths (teacher {teacher_shape.hidden_size}, student "
              f"{student_shape.hidden_size}) or student.init=pruned; use hidden_mse")
    relation = cfg.qkv_relation_kl
    if relation is not None:
        r = relation.relation_heads
        for who, width in (("teacher", teacher_shape.hidden_size),
                           ("student", student_shape.hidden_size)):
            if width % r:
                divisors = [d for d in range(1, width + 1)
                            if teacher_shape.hidden_size % d == 0
                            and student_shape.hidden_size % d == 0]
                fail("objective.qkv_relation_kl.relation_heads",
                      f"{who} width {width} is not divisible by relation_heads={r}; choose "
                      f"a common divisor of {teacher_shape.hidden_size} and "
                      f"{student_shape.hidden_size}, e.g. "
                      f"{[d for d in divisors if d <= 64][-3:]}")
