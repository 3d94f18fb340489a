"""Composing the losses of a recipe into one objective (and checking that it fits).

Use: ``objective = build_objective(cfg, teacher, student.config)``; per batch
``t = objective.teacher_forward(teacher, ids, mask, labels)`` then the student side in
``DistillModule(student, objective)(ids, mask, labels, t)`` (distill_module.py).

Each objective is a *term*: a name, a weight, a teacher-side target (computed in
``teacher_forward`` under no_grad: teacher distributions, hidden states) and a loss of the
student against it, each calling pure functions of ``losses``. What both models must
record (hidden layers, Q/K/V) is collected into two ``CapturePlan``s once, here; the
teacher then runs only as deep as the deepest layer any term needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from distill_pretrain import losses
from distill_pretrain.architectures import (Architecture, apply_mlm_head, architecture_of,
                                            embedding_width)
from distill_pretrain.capture import Captured, CapturePlan, capture, truncated
from distill_pretrain.config import ObjectiveConfig, RecipeValidationError
from distill_pretrain.layer_map import ModelShape, objective_layer_pairs
from distill_pretrain.objective_checks import check_objective
from distill_pretrain.objective_outputs import (ObjectiveOutput, StudentOutputs, TeacherOutputs,
                                                TeacherSide)
from distill_pretrain.objective_stats import evaluation_stats
from distill_pretrain.prune import kept_channels, teacher_channels_of


# ------------------------------------------------------------------ terms


@dataclass
class Term:
    name: str
    weight: float
    target: Callable[[TeacherSide, torch.Tensor], object]
    """Teacher side -> target, run in teacher_forward under no_grad: (teacher, mask)."""
    compute: Callable[[StudentOutputs, object, torch.Tensor, torch.Tensor], torch.Tensor]
    """(student, target, mask, labels) -> unweighted loss."""


def _scores(cap: Captured, layer: int, heads: int) -> torch.Tensor:
    return losses.attention_scores(cap.query[layer], cap.key[layer], heads,
                                   cap.position_bias.get(layer))


def _similarities(hidden: torch.Tensor, mask: torch.Tensor,
                  span: int) -> tuple[torch.Tensor, torch.Tensor]:
    pooled, weights = losses.span_pool(hidden, mask, span)
    return losses.similarity_matrix(pooled), weights


def _pooled(project: nn.Module, hidden: torch.Tensor, mask: torch.Tensor,
            span: int) -> torch.Tensor:
    """The student's span embeddings, projected after pooling (the projection is affine,
    so this equals pooling the projected tokens, on far fewer rows)."""
    pooled = losses.span_pool(hidden, mask, span)[0]
    return project(pooled.to(hidden.dtype))


class DistillationObjective(nn.Module):
    """The recipe's weighted sum of losses; holds the trainable projections."""

    def __init__(self, cfg: ObjectiveConfig, teacher_shape: ModelShape,
                 student_shape: ModelShape, teacher_arch: Architecture,
                 student_arch: Architecture, teacher_has_head: bool,
                 teacher_channels: Optional[list[int]] = None):
        super().__init__()
        self.cfg, self.teacher_channels = cfg, teacher_channels  # see prune.py
        self.teacher_shape, self.student_shape = teacher_shape, student_shape
        self.teacher_arch, self.student_arch = teacher_arch, student_arch
        self.projections = nn.ModuleDict()
        self.terms: list[Term] = []
        self._student_hidden: set[int] = set()
        self._teacher_hidden: set[int] = set()
        self._student_qkv: dict[str, set[int]] = {"query": set(), "key": set(), "value": set()}
        self._teacher_qkv: dict[str, set[int]] = {"query": set(), "key": set(), "value": set()}
        pairs = objective_layer_pairs(cfg, student_shape.num_layers, teacher_shape.num_layers)
        for name, section in cfg.active().items():
            getattr(self, f"_add_{name}")(section, pairs.get(name))
        self.student_plan = CapturePlan.build(self._student_hidden, self._student_qkv)
        self.teacher_plan = CapturePlan.build(self._teacher_hidden, self._teacher_qkv)
        self.needs_mlm_logits = cfg.needs_mlm_logits
        self.logit_positions = cfg.logit_kl.positions if cfg.logit_kl else "masked"
        depth = self.teacher_plan.deepest_layer
        if cfg.logit_kl is not None:
            depth = teacher_shape.num_layers
        # Teacher layers run per batch (0: the teacher is not run at all).
        self.teacher_depth = max(depth, 1) if (depth or self._needs_teacher()) else 0
        # Teacher logits at the logit rows: for the soft targets, and for the top-1
        # agreement stat whenever the student computes logits and the teacher runs
        # to its head anyway.
        self.teacher_logits = (teacher_has_head and self.needs_mlm_logits
                               and self.teacher_depth == teacher_shape.num_layers)

    def _needs_teacher(self) -> bool:
        return any(n != "mlm" for n in self.cfg.active())

    def _projection(self, name: str, student_width: int, teacher_width: int) -> nn.Module:
        if student_width == teacher_width:
            return nn.Identity()
        self.projections[name] = nn.Linear(student_width, teacher_width)
        return self.projections[name]

    def _capture(self, student_hidden=(), teacher_hidden=(), student_qkv=None,
                 teacher_qkv=None) -> None:
        self._student_hidden.update(student_hidden)
        self._teacher_hidden.update(teacher_hidden)
        for part, layers in (student_qkv or {}).items():
            self._student_qkv[part].update(layers)
        for part, layers in (teacher_qkv or {}).items():
            self._teacher_qkv[part].update(layers)

    # -- one builder per objective: what to capture, the teacher target, the loss --

    def _add_logit_kl(self, section, _pairs) -> None:
        temperature = section.temperature
        self.terms.append(Term(
            "logit_kl", section.weight,
            target=lambda t, mask: losses.soft_targets(t.mlm_logits, temperature),
            compute=lambda s, target, mask, labels: losses.soft_target_kl_to(
                s.mlm_logits, *target, temperature)))

    def _add_mlm(self, section, _pairs) -> None:
        self.terms.append(Term(
            "mlm", section.weight, target=lambda t, mask: None,
            compute=lambda s, target, mask, labels: losses.mlm_cross_entropy(
                s.mlm_logits, s.logit_labels)))

    def _add_hidden_cosine(self, section, pairs) -> None:
        (s_layer, t_layer), = pairs
        self._capture(student_hidden=[s_layer], teacher_hidden=[t_layer])
        self.terms.append(Term(
            "hidden_cosine", section.weight,
            target=lambda t, mask: kept_channels(t.captured.hidden[t_layer],
                                                 self.teacher_channels),
            compute=lambda s, target, mask, labels: losses.hidden_cosine(
                s.captured.hidden[s_layer], target, mask)))

    def _add_hidden_mse(self, section, pairs) -> None:
        self._capture(student_hidden=[s for s, _ in pairs],
                      teacher_hidden=[t for _, t in pairs])
        project = self._projection("hidden_mse", self.student_shape.hidden_size,
                                   self.teacher_shape.hidden_size)

        def compute(s, targets, mask, labels):
            return torch.stack([losses.hidden_mse(project(s.captured.hidden[sl]), target, mask)
                                for (sl, _), target in zip(pairs, targets)]).sum()
        self.terms.append(Term(
            "hidden_mse", section.weight,
            target=lambda t, mask: [t.captured.hidden[tl] for _, tl in pairs],
            compute=compute))

    def _add_pooled_embedding(self, section, pairs) -> None:
        (s_layer, t_layer), = pairs
        self._capture(student_hidden=[s_layer], teacher_hidden=[t_layer])
        span = section.span
        if section.loss == "relation":  # width-free: the teacher's similarities, all channels
            self.terms.append(Term(
                "pooled_embedding", section.weight,
                target=lambda t, mask: _similarities(t.captured.hidden[t_layer], mask, span),
                compute=lambda s, target, mask, labels: losses.pooled_relation_mse(
                    losses.span_pool(s.captured.hidden[s_layer], mask, span)[0], *target)))
            return
        project = nn.Identity() if self.teacher_channels else self._projection(
            "pooled_embedding", self.student_shape.hidden_size, self.teacher_shape.hidden_size)
        self.terms.append(Term(
            "pooled_embedding", section.weight,
            target=lambda t, mask: losses.span_pool(
                kept_channels(t.captured.hidden[t_layer], self.teacher_channels), mask, span),
            compute=lambda s, target, mask, labels: losses.pooled_cosine(
                _pooled(project, s.captured.hidden[s_layer], mask, span), *target)))

    def _add_embedding_mse(self, section, _pairs) -> None:
        self._capture(student_hidden=[0], teacher_hidden=[0])
        project = self._projection(
            "embedding_mse", self.student_shape.embedding_size or self.student_shape.hidden_size,
            self.teacher_shape.embedding_size or self.teacher_shape.hidden_size)
        self.terms.append(Term(
            "embedding_mse", section.weight,
            target=lambda t, mask: t.captured.hidden[0],
            compute=lambda s, target, mask, labels: losses.embedding_mse(
                project(s.captured.hidden[0]), target, mask)))

    def _capture_scores(self, pairs) -> None:
        self._capture(student_qkv={"query": [s for s, _ in pairs], "key": [s for s, _ in pairs]},
                      teacher_qkv={"query": [t for _, t in pairs], "key": [t for _, t in pairs]})

    def _add_attention_score_mse(self, section, pairs) -> None:
        self._capture_scores(pairs)
        s_heads, t_heads = self.student_shape.num_heads, self.teacher_shape.num_heads

        def compute(s, targets, mask, labels):
            cap = s.captured
            return torch.stack([
                losses.attention_score_mse_qk(cap.query[sl], cap.key[sl], s_heads, target, mask,
                                              cap.position_bias.get(sl))
                for (sl, _), target in zip(pairs, targets)]).sum()
        self.terms.append(Term(
            "attention_score_mse", section.weight,
            target=lambda t, mask: [_scores(t.captured, tl, t_heads) for _, tl in pairs],
            compute=compute))

    def _add_attention_kl(self, section, pairs) -> None:
        self._capture_scores(pairs)
        (s_layer, t_layer), = pairs
        s_heads, t_heads = self.student_shape.num_heads, self.teacher_shape.num_heads
        self.terms.append(Term(
            "attention_kl", section.weight,
            target=lambda t, mask: losses.target_distribution(
                _scores(t.captured, t_layer, t_heads), mask),
            compute=lambda s, target, mask, labels: losses.kl_to_target(
                _scores(s.captured, s_layer, s_heads), *target, mask)))

    def _add_relation(self, name: str, weight: float, part: str, pair: tuple[int, int],
                      relation_heads: int) -> None:
        s_layer, t_layer = pair
        self._capture(student_qkv={part: [s_layer]}, teacher_qkv={part: [t_layer]})
        self.terms.append(Term(
            name, weight,
            target=lambda t, mask: losses.relation_target(
                getattr(t.captured, part)[t_layer], relation_heads, mask),
            compute=lambda s, target, mask, labels: losses.relation_kl_to_target(
                getattr(s.captured, part)[s_layer], relation_heads, *target, mask)))

    def _add_value_relation_kl(self, section, pairs) -> None:
        # MiniLM's value relation is a relation KL with R = the (shared) head count.
        self._add_relation("value_relation_kl", section.weight, "value", pairs[0],
                           self.student_shape.num_heads)

    def _add_qkv_relation_kl(self, section, pairs) -> None:
        parts = {"qq": "query", "kk": "key", "vv": "value"}
        for relation in section.relations:
            self._add_relation(f"{relation}_relation_kl", section.weight, parts[relation],
                               pairs[0], section.relation_heads)

    # -- running --

    def logitrows_at(self, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(batch, seq) bool: where MLM logits are computed (masked, or all real tokens)."""
        if self.logit_positions == "all":
            return attention_mask.bool() | (labels != -100)
        return labels != -100

    def logit_index(self, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N,) int64 flat positions of the logit rows. The trainer computes it on the
        CPU batch and ships it with the batch: selecting rows with a boolean mask on a
        GPU would wait for the GPU to count them (a host sync per micro-batch)."""
        return self.logitrows_at(attention_mask, labels).reshape(-1).nonzero().squeeze(1)

    @torch.no_grad()
    def teacher_forward(self, teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        labels: torch.Tensor,
                        logit_index: Optional[torch.Tensor] = None) -> TeacherOutputs:
        """Run the frozen teacher (only ``teacher_depth`` layers), recording what the terms
        need, and compute each term's target. no_grad, not inference_mode: the outputs
        are used as loss targets in the (autograd-recorded) student step."""
        if self.teacher_depth == 0:
            return TeacherOutputs()
        if self.teacher_depth > teacher.num_layers:
            raise RecipeValidationError(
                f"the objective needs teacher layer {self.teacher_depth} but the teacher "
                f"{teacher.path} was loaded with {teacher.num_layers} layers")
        base, arch = teacher.base, teacher.arch
        with truncated(base, arch, self.teacher_depth), \
                capture(base, arch, self.teacher_plan) as captured:
            out = base(input_ids=input_ids, attention_mask=attention_mask)
        last = out.last_hidden_state
        logits = None
        if self.teacher_logits and teacher.has_mlm_head:
            if logit_index is None:
                logit_index = self.logit_index(attention_mask, labels)
            logits = apply_mlm_head(teacher.model, arch, rows_at(last, logit_index))
        side = TeacherSide(captured, logits)
        targets = {term.name: term.target(side, attention_mask) for term in self.terms}
        return TeacherOutputs(targets=targets, deepest_hidden=last,
                              mlm_top1=None if logits is None else logits.argmax(-1))

    def forward(self, student: StudentOutputs, teacher: TeacherOutputs,
                attention_mask: torch.Tensor, labels: torch.Tensor,
                with_stats: bool = True) -> ObjectiveOutput:
        total = torch.zeros((), dtype=torch.float32, device=attention_mask.device)
        parts = {}
        for term in self.terms:
            value = term.compute(student, teacher.targets.get(term.name), attention_mask,
                                 labels)
            parts[term.name] = value.detach()
            total = total + term.weight * value
        stats = evaluation_stats(student, teacher, attention_mask) if with_stats else {}
        return ObjectiveOutput(total=total, parts=parts, stats=stats)


def rows_at(hidden: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """(batch, seq, width) -> (N, width) at flat positions (batch * seq + position)."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_index)


def build_objective(cfg: ObjectiveConfig, teacher, student_config) -> DistillationObjective:
    """The recipe's objective for this teacher and student (HF config of the student);
    raises RecipeValidationError when they do not fit (check_objective)."""
    student_arch = architecture_of(student_config)
    teacher_shape = ModelShape(teacher.num_layers, teacher.hidden_size, teacher.num_heads,
                               embedding_width(teacher.config, teacher.arch))
    student_shape = ModelShape.of(student_config, student_arch)
    channels = teacher_channels_of(student_config, teacher_shape.hidden_size)
    check_objective(cfg, teacher_shape=teacher_shape, student_shape=student_shape,
                    teacher_has_head=teacher.has_mlm_head, teacher_folder=teacher.path,
                    teacher_vocab=teacher.config.vocab_size,
                    student_vocab=student_config.vocab_size, student_pruned=bool(channels))
    return DistillationObjective(cfg, teacher_shape, student_shape, teacher.arch,
                                 student_arch, teacher.has_mlm_head, channels)
