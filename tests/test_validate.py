"""Each recipe mistake is caught at load/validate time with a message naming the key,
the teacher folder and the fix."""

from __future__ import annotations

import json
import shutil

import pytest

from distill_common.config import ConfigError, load_config
from distill_pretrain.config import RecipeValidationError
from distill_pretrain.layer_map import ModelShape
from distill_pretrain.objective_checks import check_objective
from launcher.recipe import Recipe, validate_recipe

QKV = ["objective.qkv_relation_kl.relation_heads=8"]


def _recipe(teacher_dir, *overrides):
    return load_config(Recipe, None, [f"teacher.path={teacher_dir}", *overrides])


def _invalid(teacher_dir, *overrides) -> str:
    with pytest.raises(RecipeValidationError) as err:
        validate_recipe(_recipe(teacher_dir, *overrides))
    return str(err.value)


def test_valid_recipes_pass(tiny_teacher_dir, tiny_teacher_nohead_dir):
    validate_recipe(_recipe(tiny_teacher_nohead_dir, "student.num_layers=2", *QKV))
    validate_recipe(_recipe(tiny_teacher_dir, "student.num_layers=2",
                            "objective.logit_kl.weight=5", "objective.mlm.weight=2",
                            "objective.hidden_cosine.weight=1"))
    validate_recipe(_recipe(tiny_teacher_nohead_dir, "student.num_layers=2",
                            "student.hidden_size=32", "student.num_heads=4",
                            "objective.attention_kl.weight=1",
                            "objective.value_relation_kl.weight=1",
                            "objective.hidden_mse.layer_map=pairs",
                            "objective.hidden_mse.pairs=[[1,2],[2,4]]"))


def test_logit_loss_with_headless_teacher(tiny_teacher_nohead_dir):
    msg = _invalid(tiny_teacher_nohead_dir, "objective.logit_kl.weight=5")
    assert "objective.logit_kl" in msg and str(tiny_teacher_nohead_dir) in msg
    assert "masked-LM head" in msg and "configs/minilmv2.yaml" in msg


def test_no_objective(tiny_teacher_dir):
    assert "no objective is set" in _invalid(tiny_teacher_dir)


def test_layer_out_of_range(tiny_teacher_dir):
    msg = _invalid(tiny_teacher_dir, "objective.hidden_mse.layer_map=pairs",
                   "objective.hidden_mse.pairs=[[1,9]]")
    assert "objective.hidden_mse" in msg and "teacher layer 9" in msg and "1..4" in msg
    msg = _invalid(tiny_teacher_dir, "objective.attention_kl.student_layer=5")
    assert "student layer 5" in msg
    msg = _invalid(tiny_teacher_dir, "student.num_layers=2", "student.teacher_layers=[1,7]",
                   *QKV)
    assert "student.teacher_layers" in msg and "[7]" in msg


def test_minilm_v1_needs_equal_heads(tiny_teacher_dir):
    msg = _invalid(tiny_teacher_dir, "student.hidden_size=32", "student.num_heads=2",
                   "objective.attention_kl.weight=1")
    assert "objective.attention_kl" in msg and "equal head counts" in msg
    assert "qkv_relation_kl" in msg
    msg = _invalid(tiny_teacher_dir, "student.hidden_size=32", "student.num_heads=2",
                   "objective.value_relation_kl.weight=1")
    assert "objective.value_relation_kl" in msg


def test_relation_heads_must_divide_widths(tiny_teacher_dir):
    msg = _invalid(tiny_teacher_dir, "student.hidden_size=48", "student.num_heads=4",
                   "objective.qkv_relation_kl.relation_heads=32")
    assert "relation_heads=32" in msg and "student width 48" in msg


def test_student_heads_must_divide_width(tiny_teacher_dir):
    msg = _invalid(tiny_teacher_dir, "student.num_heads=5", *QKV)
    assert "student.num_heads" in msg and "hidden_size=64" in msg
    with pytest.raises(ConfigError, match="student.num_heads"):  # structural: at load
        _recipe(tiny_teacher_dir, "student.hidden_size=32", "student.num_heads=5")


def test_layer_copy_and_embedding_init_need_teacher_shape(tiny_teacher_dir):
    msg = _invalid(tiny_teacher_dir, "student.hidden_size=32", "student.init=teacher_layers",
                   *QKV)
    assert "student.init" in msg and "init=random" in msg
    msg = _invalid(tiny_teacher_dir, "student.hidden_size=32", "student.init=random",
                   "student.embedding_init=copy", *QKV)
    assert "student.embedding_init" in msg
    msg = _invalid(tiny_teacher_dir, "student.hidden_size=128", "student.init=random",
                   "student.embedding_init=svd", *QKV)
    assert "svd" in msg


def test_hidden_cosine_needs_equal_widths(tiny_teacher_dir):
    msg = _invalid(tiny_teacher_dir, "student.hidden_size=32",
                   "objective.hidden_cosine.weight=1")
    assert "objective.hidden_cosine" in msg and "hidden_mse" in msg


def test_vocabularies_must_match_for_logit_losses(tmp_path):
    shape = ModelShape(4, 64, 4)
    with pytest.raises(RecipeValidationError, match="objective.mlm.*vocabulary"):
        from distill_pretrain.config import MLMConfig, ObjectiveConfig

        check_objective(ObjectiveConfig(mlm=MLMConfig()), teacher_shape=shape,
                        student_shape=shape, teacher_has_head=True, teacher_folder=tmp_path,
                        teacher_vocab=100, student_vocab=120)


def test_unknown_teacher_and_unsupported_family(tmp_path, tiny_teacher_nohead_dir):
    msg = _invalid(tmp_path / "nowhere", *QKV)
    assert "teacher.path" in msg
    odd = tmp_path / "odd"
    shutil.copytree(tiny_teacher_nohead_dir, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (odd / "config.json").write_text(json.dumps(cfg))
    msg = _invalid(odd, *QKV)
    assert "gpt2" in msg and "architectures.py" in msg


@pytest.mark.parametrize("override, key", [
    ("objective.logit_kl.positions=some", "objective.logit_kl.positions"),
    ("objective.logit_kl.temperature=0", "objective.logit_kl.temperature"),
    ("objective.qkv_relation_kl.teacher_layer=middle", "objective.qkv_relation_kl.teacher_layer"),
    ("objective.qkv_relation_kl.relations=[qq,xx]", "objective.qkv_relation_kl.relations"),
    ("objective.hidden_mse.layer_map=pairs", "objective.hidden_mse.pairs"),
    ("objective.mlm.weight=0", "objective.mlm.weight"),
    ("objective.pooled_embedding.span=-1", "objective.pooled_embedding.span"),
    ("objective.pooled_embedding.loss=l2", "objective.pooled_embedding.loss"),
    ("student.init=copy", "student.init"),
    ("teacher.dtype=float8", "teacher.dtype"),
])
def test_structural_errors_at_load(override, key, tiny_teacher_dir):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _recipe(tiny_teacher_dir, override)
