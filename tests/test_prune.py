"""Structured pruning of the teacher into the student (`student.init: pruned`) on tiny
models of every family: the teacher's own shape is the teacher exactly; narrower
students equal the teacher with the dropped channels, heads and neurons zeroed (once
LayerNorm statistics, which cannot survive width pruning, are taken out of both); the
weights are the kept slices and load with the Auto classes; importance is deterministic;
impossible shapes are refused before anything loads; under 2 ranks both build rank 0's
student."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from distill_pretrain.architectures import ARCHITECTURES, layer_list
from distill_pretrain.config import RecipeValidationError, StudentConfig, TeacherConfig
from distill_pretrain.importance import measure_importance
from distill_pretrain.prune import plan_pruning
from distill_pretrain.student import (build_student, check_student, initialise_student,
                                      student_dims)
from distill_pretrain.teacher import load_teacher
from test_teacher import save_tiny_family

FAMILIES = sorted(ARCHITECTURES)
VOCAB = 50  # test_teacher's tiny configs: 3 layers x 32, 4 heads of 8, FFN 64


def random_batches(seed: int = 0, n: int = 3, vocab: int = VOCAB) -> list[dict]:
    """Contract-2 batches of random ids; every other row padded after 7 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[::2, 7:] = 0
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": torch.full_like(ids, -100)})
    return out


CALIBRATION = random_batches()


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, tokenizer_dir) -> dict:
    root = tmp_path_factory.mktemp("prune_families")
    return {f: load_teacher(TeacherConfig(path=str(save_tiny_family(root / f, f,
                                                                    tokenizer_dir))))
            for f in FAMILIES}


def plan_for(cfg: StudentConfig, teacher, calibration=CALIBRATION, importance=None,
             summary: bool = False):
    importance = importance or measure_importance(teacher, calibration)
    plan = plan_pruning(cfg, student_dims(cfg, teacher.config, teacher.arch), teacher,
                        importance)
    return plan if summary else plan[0]


def forward(model: nn.Module, batch: dict):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     output_hidden_states=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_to_the_teachers_own_shape_is_the_teacher_exactly(family, teachers):
    teacher = teachers[family]
    student = build_student(StudentConfig(num_layers=3, init="pruned"), teacher,
                            calibration=CALIBRATION).eval()
    for batch in CALIBRATION[:2]:
        s, t = forward(student, batch), forward(teacher.model, batch)
        assert len(s.hidden_states) == len(t.hidden_states) == 4
        for a, b in zip(s.hidden_states, t.hidden_states):
            assert torch.equal(a, b)
        assert torch.equal(s.logits, t.logits)


# --- narrower students against the masked teacher -----------------------------------------


def _affine(keep: torch.Tensor | None):
    """A LayerNorm made its elementwise affine part (x * w + b), then masked."""
    def hook(module, inputs, _output):
        out = inputs[0] * module.weight + module.bias
        return out if keep is None else out * keep
    return hook


def _zero_inputs(keep: torch.Tensor):
    return lambda _module, args: (args[0] * keep,)


def _mask(size: int, kept: list[int]) -> torch.Tensor:
    m = torch.zeros(size)
    m[kept] = 1.0
    return m


def masked_teacher(teacher, plan) -> nn.Module:
    """A copy of the teacher with the plan's layers only, affine LayerNorms, and hooks
    zeroing every dropped hidden channel, head and FFN neuron."""
    model = copy.deepcopy(teacher.model).eval()
    arch, base = teacher.arch, model.base_model
    parent, _, name = arch.layers.rpartition(".")
    kept_layers = nn.ModuleList([layer_list(base, arch)[k - 1] for k in plan.layers])
    setattr(base.get_submodule(parent), name, kept_layers)
    hidden = _mask(teacher.hidden_size, plan.hidden)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            width = module.normalized_shape[0]
            module.register_forward_hook(_affine(hidden if width == len(hidden) else None))
    if arch.embeddings_project and hasattr(base, arch.embeddings_project):
        base.get_submodule(arch.embeddings_project).register_forward_hook(
            lambda _m, _i, out: out * hidden)
    for i, layer in enumerate(kept_layers):
        attn_out = layer.get_submodule(arch.attention_output)
        attn_out.register_forward_pre_hook(_zero_inputs(_mask(attn_out.in_features,
                                                              plan.value[i])))
        ffn_out = layer.get_submodule(arch.ffn_out)
        ffn_out.register_forward_pre_hook(_zero_inputs(_mask(ffn_out.in_features,
                                                             plan.ffn[i])))
    return model


def affine_layernorms(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.register_forward_hook(_affine(None))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_student_is_the_teacher_with_dropped_parts_zeroed(family, teachers):
    """Layers, hidden channels (32 -> 24), heads (4 -> 3 of size 8) and FFN neurons
    (64 -> 40) pruned: equal to the masked teacher up to LayerNorm statistics."""
    teacher = teachers[family]
    cfg = StudentConfig(num_layers=2, hidden_size=24, intermediate_size=40, init="pruned")
    plan = plan_for(cfg, teacher)
    student = affine_layernorms(build_student(cfg, teacher, calibration=CALIBRATION).eval())
    reference = masked_teacher(teacher, plan)
    assert [len(g) for g in plan.head_groups] == [3, 3] and len(plan.ffn[0]) == 40
    for batch in CALIBRATION:
        s, t = forward(student, batch), forward(reference, batch)
        for k in (1, 2):
            torch.testing.assert_close(s.hidden_states[k], t.hidden_states[k][..., plan.hidden],
                                       atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s.logits, t.logits, atol=1e-5, rtol=1e-4)
    # The harness can fail: the teacher with another head dropped differs.
    wrong = copy.deepcopy(plan)
    dropped = sorted(set(range(32)) - set(plan.value[0]))
    wrong.value[0] = plan.value[0][8:] + dropped
    s, t = forward(student, CALIBRATION[0]), forward(masked_teacher(teacher, wrong),
                                                     CALIBRATION[0])
    gap = (s.hidden_states[2] - t.hidden_states[2][..., plan.hidden]).abs().max()
    assert gap > 1e-3 * s.hidden_states[2].abs().max()


def test_ffn_pruning_at_full_width_is_exact_with_real_layernorms(teachers):
    teacher = teachers["bert"]
    cfg = StudentConfig(num_layers=3, intermediate_size=20, init="pruned")
    plan = plan_for(cfg, teacher)
    student = build_student(cfg, teacher, calibration=CALIBRATION).eval()
    reference = copy.deepcopy(teacher.model).eval()
    for i, layer in enumerate(layer_list(reference.base_model, teacher.arch)):
        layer.get_submodule(teacher.arch.ffn_out).register_forward_pre_hook(
            _zero_inputs(_mask(64, plan.ffn[i])))
    for batch in CALIBRATION:
        torch.testing.assert_close(forward(student, batch).logits,
                                   forward(reference, batch).logits, atol=1e-5, rtol=1e-4)


# --- the kept slices, the Auto classes, head layouts --------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_narrower_student_holds_the_kept_slices_and_loads_with_auto_classes(family, teachers,
                                                                           tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM

    teacher = teachers[family]
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    cfg = StudentConfig(num_layers=2, hidden_size=16, intermediate_size=24, init="pruned")
    plan = plan_for(cfg, teacher)
    student = build_student(cfg, teacher, calibration=CALIBRATION)
    arch = teacher.arch
    s_layer = layer_list(student.base_model, arch)[1]
    t_layer = layer_list(teacher.base, arch)[plan.layers[1] - 1]
    for path, rows, cols in ((arch.ffn_in, plan.ffn[1], plan.hidden),
                             (arch.ffn_out, plan.hidden, plan.ffn[1]),
                             (arch.query, plan.query_key[1], plan.hidden),
                             (arch.attention_output, plan.hidden, plan.value[1])):
        expected = t_layer.get_submodule(path).weight[rows][:, cols]
        assert torch.equal(s_layer.get_submodule(path).weight, expected), path
    s_words = student.get_input_embeddings().weight
    assert torch.equal(s_words, teacher.model.get_input_embeddings().weight[:, plan.embedding])
    assert student.get_output_embeddings().weight is s_words
    assert all(torch.equal(v, before[k]) for k, v in teacher.model.state_dict().items())
    student.save_pretrained(tmp_path / "s")
    batch = CALIBRATION[0]
    for cls in (AutoModel, AutoModelForMaskedLM):
        loaded = cls.from_pretrained(tmp_path / "s").eval()
        out = forward(loaded, batch)
        assert out.hidden_states[-1].shape == (4, 12, 16)
        assert torch.isfinite(out.hidden_states[-1]).all()
    torch.testing.assert_close(out.logits, forward(student.eval(), batch).logits)


def test_merged_and_truncated_heads_keep_the_teachers_score_scale(teachers):
    teacher = teachers["mpnet"]  # its relative attention bias is shared by every layer
    bias_path = "encoder.relative_attention_bias"
    t_bias = teacher.base.get_submodule(bias_path).weight
    for heads, formed, scale in ((1, "merged", 2 ** 0.5), (4, "truncated", 0.5 ** 0.5)):
        cfg = StudentConfig(num_layers=2, hidden_size=16, num_heads=heads, init="pruned")
        plan = plan_for(cfg, teacher)
        student, record = initialise_student(cfg, teacher, calibration=CALIBRATION)
        assert record["heads"]["formed"] == formed and record["heads"]["head_size"] == 16 // heads
        assert record["heads"]["shared_across_layers"]
        s_bias = student.base_model.get_submodule(bias_path).weight
        expected = torch.stack([t_bias[:, g].sum(1) for g in plan.head_groups[0]], dim=1)
        assert torch.equal(s_bias, expected)
        q = layer_list(teacher.base, teacher.arch)[plan.layers[0] - 1].get_submodule(
            teacher.arch.query)
        s_q = layer_list(student.base_model, teacher.arch)[0].get_submodule(teacher.arch.query)
        torch.testing.assert_close(s_q.weight, q.weight[plan.query_key[0]][:, plan.hidden]
                                   * scale)
        for j, group in enumerate(plan.head_groups[0]):  # a head's channels are its group's
            channels = plan.query_key[0][j * 16 // heads:(j + 1) * 16 // heads]
            assert {c // 8 for c in channels} == set(group)


def test_layer_selection_importance_even_or_given(teachers):
    teacher = teachers["bert"]
    importance = measure_importance(teacher, CALIBRATION)

    def layers(**fields):
        cfg = StudentConfig(num_layers=2, init="pruned", **fields)
        return plan_for(cfg, teacher, importance=importance).layers

    best = sorted(torch.argsort(importance.layers, descending=True)[:2].add(1).tolist())
    assert layers() == best
    summary = plan_for(StudentConfig(num_layers=2, init="pruned"), teacher,
                       importance=importance, summary=True)[1]
    assert summary["layers"]["selection"] == "importance"
    assert layers(layer_selection="even") == [1, 3]
    assert layers(teacher_layers=[3, 2]) == [3, 2]
    assert layers(prune_depth=2) == [1, 2]  # the teacher truncated at layer 2
    assert layers(layer_selection="even", prune_depth=2) == [1, 2]


def test_importance_and_student_are_deterministic(teachers):
    teacher = teachers["roberta"]
    a, b = measure_importance(teacher, CALIBRATION), measure_importance(teacher, CALIBRATION)
    for field in ("hidden", "heads", "query_key", "value", "ffn", "layers"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.tokens == 3 * (2 * 7 + 2 * 12) == b.tokens  # padding never counts
    cfg = StudentConfig(num_layers=2, hidden_size=16, init="pruned")
    s1 = build_student(cfg, teacher, seed=3, calibration=CALIBRATION).state_dict()
    s2 = build_student(cfg, teacher, seed=3, calibration=CALIBRATION).state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    other = build_student(cfg, teacher, seed=3, calibration=random_batches(seed=9))
    assert not all(torch.equal(s1[k], v) for k, v in other.state_dict().items())


def test_cosines_compare_a_narrow_pruned_student_with_the_channels_it_kept(teachers, tmp_path):
    """hidden_cosine per token, pooled_embedding (cosine) per span: against the teacher's
    kept channels, with no projection."""
    from distill_pretrain import losses
    from distill_pretrain.config import LastLayerConfig, ObjectiveConfig, PooledEmbeddingConfig
    from distill_pretrain.distill_module import DistillModule
    from distill_pretrain.objective import build_objective
    from distill_pretrain.prune import TEACHER_CHANNELS_KEY

    teacher = teachers["bert"]
    cfg = StudentConfig(num_layers=2, hidden_size=24, init="pruned")
    plan = plan_for(cfg, teacher)
    student = build_student(cfg, teacher, calibration=CALIBRATION).eval()
    objective_cfg = ObjectiveConfig(hidden_cosine=LastLayerConfig(teacher_layer="2"),
                                    pooled_embedding=PooledEmbeddingConfig(teacher_layer="2",
                                                                           span=4))
    objective = build_objective(objective_cfg, teacher, student.config)
    assert objective.teacher_channels == plan.hidden and len(objective.projections) == 0
    batch = CALIBRATION[0]
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        out = DistillModule(student, objective)(
            ids, mask, labels, objective.teacher_forward(teacher, ids, mask, labels))
        s_last = forward(student, batch).hidden_states[-1]
        t_layer2 = forward(teacher.model, batch).hidden_states[2][..., plan.hidden]
    cos = nn.functional.cosine_similarity(s_last, t_layer2, dim=-1)[mask.bool()]
    torch.testing.assert_close(out.parts["hidden_cosine"], (1 - cos).mean())
    torch.testing.assert_close(out.parts["pooled_embedding"], losses.pooled_cosine(
        losses.span_pool(s_last, mask, 4)[0], *losses.span_pool(t_layer2, mask, 4)))
    student.save_pretrained(tmp_path / "s")  # the channels travel with the student
    from transformers import AutoConfig
    assert getattr(AutoConfig.from_pretrained(tmp_path / "s"), TEACHER_CHANNELS_KEY) == \
        plan.hidden
    random_student = build_student(StudentConfig(num_layers=2, hidden_size=24,
                                                 init="random"), teacher)
    with pytest.raises(RecipeValidationError, match="objective.hidden_cosine"):
        build_objective(objective_cfg, teacher, random_student.config)


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize("fields, key", [
    (dict(num_layers=4), "student.num_layers"),
    (dict(hidden_size=64), "student.hidden_size"),
    (dict(intermediate_size=128), "student.intermediate_size"),
    (dict(hidden_size=24, num_heads=2), "student.num_heads"),  # head size 12: not 8k
    (dict(hidden_size=20), "student.num_heads"),  # not a multiple of the head size 8
    (dict(hidden_size=16, num_heads=1, num_layers=2), None),  # 16 = 2 x 8: merged, fine
    (dict(embedding_init="svd"), "student.embedding_init"),
    (dict(num_layers=2, teacher_layers=[1, 9]), "student.teacher_layers"),
    (dict(num_layers=2, prune_depth=4), "student.prune_depth"),
])
def test_unprunable_students_are_refused_from_the_config_alone(fields, key, teachers):
    teacher = teachers["bert"]
    cfg = StudentConfig(init="pruned", **{"num_layers": 3, **fields})
    if key is None:
        check_student(cfg, teacher.config, teacher.arch, teacher.path)
        return
    with pytest.raises(RecipeValidationError) as err:
        check_student(cfg, teacher.config, teacher.arch, teacher.path)
    assert str(err.value).startswith(key + ":"), str(err.value)


def test_pruned_settings_are_checked_in_the_config():
    with pytest.raises(ValueError, match="layer_selection"):
        StudentConfig(init="auto", layer_selection="even")
    with pytest.raises(ValueError, match="layer_selection"):
        StudentConfig(init="pruned", layer_selection="even", teacher_layers=[1, 2],
                      num_layers=2)
    with pytest.raises(ValueError, match="calibration_samples"):
        StudentConfig(init="pruned", calibration_samples=0)
    with pytest.raises(ValueError, match="prune_depth"):
        StudentConfig(init="pruned", num_layers=3, prune_depth=2)
    with pytest.raises(ValueError, match="prune_depth"):
        StudentConfig(init="teacher_layers", prune_depth=3)


def test_pruning_without_calibration_names_the_data_setting(teachers):
    with pytest.raises(RecipeValidationError, match="train.data_dir"):
        build_student(StudentConfig(num_layers=2, init="pruned"), teachers["bert"])


# --- several ranks ------------------------------------------------------------------------


def _build_on_rank(rank: int, size: int, port: int, teacher_dir: str, out: str) -> None:
    from distill_common.distributed import World

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=size)
    try:
        teacher = load_teacher(TeacherConfig(path=teacher_dir))
        # Each rank is handed another sample: the student must still be rank 0's.
        cfg = StudentConfig(num_layers=2, hidden_size=16, intermediate_size=24, init="pruned")
        student = build_student(cfg, teacher, calibration=random_batches(seed=rank),
                                world=World(rank=rank, world_size=size))
        torch.save(student.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_every_rank_builds_rank_zeros_student(teachers, tmp_path, free_port):
    import torch.multiprocessing as mp

    teacher = teachers["bert"]
    mp.spawn(_build_on_rank, args=(2, free_port, str(teacher.path), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    cfg = StudentConfig(num_layers=2, hidden_size=16, intermediate_size=24, init="pruned")
    alone = {r: build_student(cfg, teacher, calibration=random_batches(seed=r)).state_dict()
             for r in (0, 1)}
    assert all(torch.equal(ranks[1][k], v) for k, v in ranks[0].items())
    assert all(torch.equal(alone[0][k], v) for k, v in ranks[0].items())
    assert not all(torch.equal(alone[1][k], v) for k, v in ranks[0].items())
