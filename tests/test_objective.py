"""The composed objective on tiny real models: losses agree with the models' own outputs,
zero at student == teacher, gradients reach student and projections only, padding never
counts, MiniLMv2 across head counts and widths, teacher truncation, stats."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill_pretrain import losses
from distill_pretrain.architectures import layer_list
from distill_pretrain.config import (LastLayerConfig, LayerMapConfig, LogitKLConfig,
                                     MLMConfig, ObjectiveConfig, PooledEmbeddingConfig,
                                     RecipeValidationError, RelationKLConfig, StudentConfig,
                                     TeacherConfig, WeightOnlyConfig)
from distill_pretrain.distill_module import DistillModule
from distill_pretrain.layer_map import resolve_layer, uniform_pairs
from distill_pretrain.objective import build_objective
from distill_pretrain.objective_outputs import ObjectiveOutput
from distill_pretrain.student import build_student
from distill_pretrain.teacher import load_teacher

EVERYTHING = dict(hidden_cosine=LastLayerConfig(), hidden_mse=LayerMapConfig(),
                  attention_score_mse=LayerMapConfig(), embedding_mse=WeightOnlyConfig(),
                  attention_kl=LastLayerConfig(), value_relation_kl=LastLayerConfig(),
                  qkv_relation_kl=RelationKLConfig(relation_heads=8),
                  pooled_embedding=PooledEmbeddingConfig(span=5))


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_teacher(TeacherConfig(path=str(tiny_teacher_dir)))


@pytest.fixture(scope="module")
def headless(tiny_teacher_nohead_dir):
    return load_teacher(TeacherConfig(path=str(tiny_teacher_nohead_dir)))


def _batch(vocab_size, seed=0, batch=3, seq=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = torch.full_like(ids, -100)
    for b, i in [(0, 2), (0, 7), (1, 3), (2, 0), (2, 11)]:
        labels[b, i] = ids[b, i]
    return ids, mask, labels


def _run(module, objective, teacher, ids, mask, labels) -> ObjectiveOutput:
    teacher_out = objective.teacher_forward(teacher, ids, mask, labels)
    return module(ids, mask, labels, teacher_out)


def test_mlm_and_soft_targets_at_masked_positions_match_full_logits(teacher):
    student = build_student(StudentConfig(num_layers=2, init="random",
                                          embedding_init="random"), teacher).eval()
    cfg = ObjectiveConfig(logit_kl=LogitKLConfig(weight=5.0, temperature=2.0),
                          mlm=MLMConfig(weight=2.0))
    objective = build_objective(cfg, teacher, student.config)
    module = DistillModule(student, objective).eval()
    ids, mask, labels = _batch(teacher.config.vocab_size)
    out = _run(module, objective, teacher, ids, mask, labels)
    with torch.no_grad():
        full_s = student(input_ids=ids, attention_mask=mask, labels=labels)
        full_t = teacher.model(input_ids=ids, attention_mask=mask).logits
    assert out.parts["mlm"].item() == pytest.approx(full_s.loss.item(), rel=1e-5)
    at = labels != -100
    p_t = F.softmax(full_t[at] / 2, -1)
    naive = (p_t * (p_t.log() - F.log_softmax(full_s.logits[at] / 2, -1))).sum(-1).mean() * 4
    assert out.parts["logit_kl"].item() == pytest.approx(naive.item(), rel=1e-4)
    assert out.total.item() == pytest.approx(5 * naive.item() + 2 * full_s.loss.item(),
                                             rel=1e-4)
    assert out.stats["mlm_count"].item() == 5
    correct = (full_s.logits[at].argmax(-1) == labels[at]).sum().item()
    assert out.stats["mlm_correct"].item() == correct
    agree = (full_s.logits[at].argmax(-1) == full_t[at].argmax(-1)).sum().item()
    assert out.stats["agreement_sum"].item() == agree
    assert out.stats["agreement_count"].item() == 5

    # positions=all: soft targets over every real token
    cfg_all = ObjectiveConfig(logit_kl=LogitKLConfig(positions="all"))
    objective_all = build_objective(cfg_all, teacher, student.config)
    out_all = _run(DistillModule(student, objective_all).eval(), objective_all, teacher, ids,
                   mask, labels)
    real = mask.bool()
    p_t = F.softmax(full_t[real] / 2, -1)
    naive_all = (p_t * (p_t.log() - F.log_softmax(full_s.logits[real] / 2, -1))).sum(-1)
    assert out_all.parts["logit_kl"].item() == pytest.approx(naive_all.mean().item() * 4,
                                                             rel=1e-4)
    assert out_all.stats["mlm_count"].item() == 5


def test_zero_loss_when_student_equals_teacher(teacher):
    student = build_student(StudentConfig(num_layers=4), teacher)  # copies all 4 layers
    cfg = ObjectiveConfig(logit_kl=LogitKLConfig(), **EVERYTHING)
    objective = build_objective(cfg, teacher, student.config)
    module = DistillModule(student, objective).eval()
    ids, mask, labels = _batch(teacher.config.vocab_size)
    out = _run(module, objective, teacher, ids, mask, labels)
    assert len(objective.projections) == 0  # equal widths: no projection
    for name, value in out.parts.items():
        assert abs(value.item()) < 1e-5, name
    assert set(out.parts) == {"logit_kl", "hidden_cosine", "hidden_mse", "attention_score_mse",
                              "embedding_mse", "attention_kl", "value_relation_kl",
                              "qq_relation_kl", "kk_relation_kl", "vv_relation_kl",
                              "pooled_embedding"}
    assert out.stats["agreement_sum"] == out.stats["agreement_count"] == 5


def test_gradients_reach_student_and_projections_never_teacher(teacher):
    student = build_student(StudentConfig(num_layers=2, hidden_size=32, num_heads=4), teacher)
    cfg = ObjectiveConfig(logit_kl=LogitKLConfig(), mlm=MLMConfig(), **{
        k: v for k, v in EVERYTHING.items() if k != "hidden_cosine"})
    objective = build_objective(cfg, teacher, student.config)
    module = DistillModule(student, objective)
    names = {n for n, _ in module.named_parameters()}
    assert {"objective.projections.hidden_mse.weight",
            "objective.projections.embedding_mse.weight",
            "objective.projections.pooled_embedding.weight"} <= names
    ids, mask, labels = _batch(teacher.config.vocab_size)
    teacher_out = objective.teacher_forward(teacher, ids, mask, labels)
    targets = [t for v in teacher_out.targets.values() if v is not None
               for t in (v if isinstance(v, (list, tuple)) else [v])]
    assert len(targets) > 10 and not any(t.requires_grad for t in targets)
    assert teacher_out.mlm_top1 is not None
    out = module(ids, mask, labels, teacher_out)
    assert out.total.dtype == torch.float32 and out.total.requires_grad
    out.total.backward()
    for name in ("objective.projections.hidden_mse.weight",
                 "objective.projections.embedding_mse.weight",
                 "objective.projections.pooled_embedding.weight",
                 "student.bert.encoder.layer.0.attention.self.query.weight",
                 "student.bert.encoder.layer.1.attention.self.value.weight",
                 "student.bert.embeddings.word_embeddings.weight"):
        grad = dict(module.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.model.parameters())


def test_padding_never_counts(headless):
    student = build_student(StudentConfig(num_layers=2, hidden_size=32, num_heads=4),
                            headless)
    cfg = ObjectiveConfig(mlm=MLMConfig(), **{k: v for k, v in EVERYTHING.items()
                                              if k != "hidden_cosine"})
    objective = build_objective(cfg, headless, student.config)
    module = DistillModule(student, objective).eval()
    ids, mask, labels = _batch(headless.config.vocab_size)
    out = _run(module, objective, headless, ids, mask, labels)
    pad = headless.tokenizer.pad_token_id or 0
    ids2 = torch.cat([ids, torch.full((3, 5), pad)], 1)
    ids2[:, -5:] = torch.randint(0, headless.config.vocab_size, (3, 5))  # junk, masked out
    mask2 = torch.cat([mask, torch.zeros(3, 5, dtype=torch.long)], 1)
    labels2 = torch.cat([labels, torch.full((3, 5), -100)], 1)
    out2 = _run(module, objective, headless, ids2, mask2, labels2)
    for name in out.parts:
        assert out2.parts[name].item() == pytest.approx(out.parts[name].item(), rel=1e-4,
                                                        abs=1e-6), name
    assert out2.stats["agreement_count"].item() == out.stats["agreement_count"].item() == \
        mask.sum().item()


def test_a_fresh_head_no_term_trains_is_not_scored_at_evaluation(headless):
    """With no term on the student's MLM logits, evaluation scores its head only when
    asked (eval_mlm: a head copied from the teacher); a fresh untrained head's accuracy
    (the 0.000 a pruned demo's report showed) is left out, and agreement falls back to
    the hidden states."""
    student = build_student(StudentConfig(num_layers=2, hidden_size=32, num_heads=4),
                            headless)
    cfg = ObjectiveConfig(hidden_mse=LayerMapConfig())
    objective = build_objective(cfg, headless, student.config)
    assert not objective.needs_mlm_logits
    ids, mask, labels = _batch(headless.config.vocab_size)
    scored = _run(DistillModule(student, objective).eval(), objective, headless, ids, mask,
                  labels)
    assert scored.stats["mlm_count"].item() == (labels != -100).sum().item() > 0
    unscored = _run(DistillModule(student, objective, eval_mlm=False).eval(), objective,
                    headless, ids, mask, labels)
    assert unscored.stats["mlm_count"].item() == 0
    assert unscored.stats["agreement_count"].item() == mask.sum().item()
    assert unscored.total.item() == pytest.approx(scored.total.item(), rel=1e-6)


@pytest.fixture(scope="module")
def twelve_head_teacher(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("teacher12")
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=60, hidden_size=48, num_hidden_layers=4,
                         num_attention_heads=12, intermediate_size=96),
              add_pooling_layer=False).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return load_teacher(TeacherConfig(path=str(folder)))


def test_minilmv2_across_head_counts_widths_and_truncation(twelve_head_teacher):
    """12-head x 48 teacher, 6-head x 24 student, R=12 relation heads; teacher layer 2 of
    4, so the teacher runs only 2 layers."""
    teacher = twelve_head_teacher
    student = build_student(StudentConfig(num_layers=2, hidden_size=24, num_heads=6), teacher)
    cfg = ObjectiveConfig(qkv_relation_kl=RelationKLConfig(relation_heads=12,
                                                           teacher_layer="2"))
    objective = build_objective(cfg, teacher, student.config)
    assert objective.teacher_depth == 2
    module = DistillModule(student, objective).eval()
    ids, mask, labels = _batch(60)
    deep_calls = []
    hook = layer_list(teacher.base, teacher.arch)[2].register_forward_hook(
        lambda *a: deep_calls.append(1))
    out = _run(module, objective, teacher, ids, mask, labels)
    hook.remove()
    assert deep_calls == []

    with torch.no_grad():
        t_states = teacher.base(input_ids=ids, attention_mask=mask,
                                output_hidden_states=True).hidden_states
        s_states = student.base_model(input_ids=ids, attention_mask=mask,
                                      output_hidden_states=True).hidden_states
    t_layer = layer_list(teacher.base, teacher.arch)[1].attention.self
    s_layer = layer_list(student.base_model, teacher.arch)[1].attention.self
    for rel, proj in (("qq", "query"), ("kk", "key"), ("vv", "value")):
        x_t = getattr(t_layer, proj)(t_states[1])  # input of teacher layer 2
        x_s = getattr(s_layer, proj)(s_states[1])  # input of student layer 2 (last)
        expected = losses.relation_kl(x_s, x_t, 12, mask)
        assert out.parts[f"{rel}_relation_kl"].item() == pytest.approx(expected.item(),
                                                                        rel=1e-4)
        assert expected.item() > 1e-4  # different models: a real, non-zero loss


@pytest.mark.parametrize("loss", ["cosine", "relation"])
def test_pooled_embedding_against_the_models_own_hidden_states(twelve_head_teacher, loss):
    """A 24-wide student against the 48-wide teacher's layer 3 of 4 (the teacher runs 3
    layers), spans of 5 over 12 positions: cosine through a learned projection, relation
    with none; each equals the loss of the models' own hidden states."""
    teacher = twelve_head_teacher
    student = build_student(StudentConfig(num_layers=2, hidden_size=24, num_heads=6), teacher)
    cfg = ObjectiveConfig(pooled_embedding=PooledEmbeddingConfig(teacher_layer="3", span=5,
                                                                 loss=loss))
    objective = build_objective(cfg, teacher, student.config)
    assert objective.teacher_depth == 3
    assert set(objective.projections) == ({"pooled_embedding"} if loss == "cosine" else set())
    module = DistillModule(student, objective).eval()  # no dropout: comparable forwards
    ids, mask, labels = _batch(60)
    out = _run(module, objective, teacher, ids, mask, labels)
    with torch.no_grad():
        t_hidden = teacher.base(input_ids=ids, attention_mask=mask,
                                output_hidden_states=True).hidden_states[3]
        s_hidden = student.base_model(input_ids=ids, attention_mask=mask,
                                      output_hidden_states=True).hidden_states[2]
        teacher_pooled, weights = losses.span_pool(t_hidden, mask, 5)
        if loss == "cosine":
            student_pooled = losses.span_pool(
                objective.projections["pooled_embedding"](s_hidden), mask, 5)[0]
            expected = losses.pooled_cosine(student_pooled, teacher_pooled, weights)
        else:
            expected = losses.pooled_relation_mse(losses.span_pool(s_hidden, mask, 5)[0],
                                                  losses.similarity_matrix(teacher_pooled),
                                                  weights)
    assert weights.tolist() == [1, 1, 1, 1, 1, 0, 1, 1, 1]  # 3 x 3 spans; one all padding
    assert out.parts["pooled_embedding"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert expected.item() > 1e-3
    out.total.backward()
    grad = student.base_model.embeddings.word_embeddings.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_no_logits_unless_needed(headless):
    student = build_student(StudentConfig(num_layers=2), headless)
    cfg = ObjectiveConfig(qkv_relation_kl=RelationKLConfig(relation_heads=4))
    objective = build_objective(cfg, headless, student.config)
    module = DistillModule(student, objective)
    ids, mask, labels = _batch(headless.config.vocab_size)
    calls = []
    hook = student.cls.register_forward_hook(lambda *a: calls.append(1))
    out = _run(module.train(), objective, headless, ids, mask, labels)
    assert calls == [] and out.stats.get("mlm_count", 0) == 0
    assert out.stats == {}  # training forwards skip the evaluation statistics
    out = _run(module.eval(), objective, headless, ids, mask, labels)  # eval: for the stat
    hook.remove()
    assert calls == [1] and out.stats["mlm_count"].item() == 5


def test_logit_kl_refused_for_headless_teacher(headless):
    student = build_student(StudentConfig(num_layers=2), headless)
    with pytest.raises(RecipeValidationError) as err:
        build_objective(ObjectiveConfig(logit_kl=LogitKLConfig()), headless, student.config)
    message = str(err.value)
    assert "objective.logit_kl" in message and str(headless.path) in message
    assert "minilmv2" in message


def test_layer_mapping_helpers():
    assert uniform_pairs(4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert uniform_pairs(3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert resolve_layer("last", 12) == 12
    assert resolve_layer("upper_middle", 24) == 21
    assert resolve_layer("5", 12) == 5
    assert math.isclose(resolve_layer("upper_middle", 12), 11)


@pytest.mark.parametrize("model_type", ["distilbert", "electra", "mpnet", "roberta"])
def test_every_family_builds_a_tied_student_and_trains(model_type, tmp_path, tokenizer_dir):
    from test_teacher import save_tiny_family  # the tiny per-family models

    folder = save_tiny_family(tmp_path / model_type, model_type, tokenizer_dir)
    teacher = load_teacher(TeacherConfig(path=str(folder)))
    student = build_student(StudentConfig(num_layers=2), teacher)
    assert type(student).__name__ == type(teacher.model).__name__
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    cfg = ObjectiveConfig(logit_kl=LogitKLConfig(), mlm=MLMConfig(), **dict(
        EVERYTHING, qkv_relation_kl=RelationKLConfig(relation_heads=4)))
    objective = build_objective(cfg, teacher, student.config)
    module = DistillModule(student, objective)
    ids, mask, labels = _batch(50)
    out = _run(module, objective, teacher, ids, mask, labels)
    assert torch.isfinite(out.total) and len(out.parts) == 12
    out.total.backward()
    assert student.get_input_embeddings().weight.grad.abs().sum() > 0
