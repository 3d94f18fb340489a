"""Composing the losses of a recipe into one objective, and the module DeepSpeed wraps.

Use (the trainer):

    teacher = load_teacher(recipe.teacher, dtype=...)
    student = build_student(recipe.student, teacher, seed)
    objective = build_objective(recipe.objective, teacher, student.config)
    module = DistillModule(student, objective)        # -> deepspeed.initialize(model=module)
    teacher_out = objective.teacher_forward(teacher, input_ids, attention_mask, labels)
    out = engine(input_ids, attention_mask, labels, teacher_out)   # ObjectiveOutput
    engine.backward(out.total)

Each objective is a *term*: a name, a weight, a teacher-side target (computed in
``teacher_forward`` under no_grad: teacher distributions, hidden states) and a loss of the
student against it, each calling pure functions of ``losses``. What both models must
record (hidden layers, Q/K/V) is collected into two ``CapturePlan``s once, here; the
teacher then runs only as deep as the deepest layer any term needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from distill_pretrain import losses
from distill_pretrain.architectures import (Architecture, apply_mlm_head, architecture_of, dims,
                                            embedding_width)
from distill_pretrain.capture import Captured, CapturePlan, capture, truncated
from distill_pretrain.config import (LastLayerConfig, LayerMapConfig, ObjectiveConfig,
                                     RecipeValidationError, parse_layer_choice)
from distill_pretrain.prune import TEACHER_CHANNELS_KEY


# ------------------------------------------------------------------ outputs


@dataclass
class TeacherSide:
    """What one teacher forward recorded, from which each term derives its target."""
    captured: Captured
    mlm_logits: Optional[torch.Tensor] = None
    """(N, vocab) at the objective's logit rows (masked positions, or all real tokens)."""


@dataclass
class TeacherOutputs:
    """The teacher's part of one batch, computed under no_grad (plain tensors): each
    term's target (teacher distributions, hidden states, ...), so the training step
    only computes the student side."""
    targets: dict[str, object] = field(default_factory=dict)
    """Term name -> its target (see the term builders in DistillationObjective)."""
    deepest_hidden: Optional[torch.Tensor] = None
    """(batch, seq, hidden) output of the deepest teacher layer that ran."""
    mlm_top1: Optional[torch.Tensor] = None
    """(N,) teacher's top-1 token at the logit rows, when its head ran."""


@dataclass
class StudentOutputs:
    captured: Captured
    last_hidden: torch.Tensor
    """(batch, seq, hidden)."""
    mlm_logits: Optional[torch.Tensor] = None
    """(N, vocab) at the objective's logit rows, or None when not computed."""


@dataclass
class ObjectiveOutput:
    total: torch.Tensor
    """Scalar fp32 with grad: sum of weight * part."""
    parts: dict[str, torch.Tensor]
    """Unweighted value of each term (detached scalars), for logging."""
    stats: dict[str, torch.Tensor]
    """Detached fp32 scalars, summed over the batch (all-reduce with SUM):
    mlm_correct / mlm_count: student top-1 on masked positions (count 0 when no student
    logits were computed: MLM terms off and module in train mode);
    agreement_sum / agreement_count: teacher/student top-1 agreement on masked positions
    when both have logits, else cosine of the student's last hidden states with the
    deepest teacher layer run, over real tokens (widths differ: cosine of each token's
    row of token-token similarities)."""


# ------------------------------------------------------------------ layer mapping


def resolve_layer(choice: str, num_layers: int) -> int:
    """'last' -> L; 'upper_middle' -> L - L//8 (21 of 24); '7' -> 7."""
    parsed = parse_layer_choice(choice)
    if parsed == "last":
        return num_layers
    if parsed == "upper_middle":
        return num_layers - num_layers // 8
    return int(parsed)


def uniform_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """TinyBERT's uniform map: student layer m <- teacher layer m * L_t / L_s."""
    return [(m, max(1, int(round(m * teacher_layers / student_layers))))
            for m in range(1, student_layers + 1)]


def layer_pairs(cfg: LayerMapConfig, student_layers: int,
                teacher_layers: int) -> list[tuple[int, int]]:
    if cfg.layer_map == "uniform":
        return uniform_pairs(student_layers, teacher_layers)
    if cfg.layer_map == "last":
        return [(student_layers, teacher_layers)]
    return [(int(s), int(t)) for s, t in cfg.pairs]


def single_pair(cfg: LastLayerConfig, student_layers: int,
                teacher_layers: int) -> tuple[int, int]:
    return (resolve_layer(cfg.student_layer, student_layers),
            resolve_layer(cfg.teacher_layer, teacher_layers))


def objective_layer_pairs(cfg: ObjectiveConfig, student_layers: int,
                          teacher_layers: int) -> dict[str, list[tuple[int, int]]]:
    """Name -> (student layer, teacher layer) pairs of every active layer-wise term."""
    out = {}
    for name, section in cfg.active().items():
        if isinstance(section, LayerMapConfig):
            out[name] = layer_pairs(section, student_layers, teacher_layers)
        elif isinstance(section, LastLayerConfig):
            out[name] = [single_pair(section, student_layers, teacher_layers)]
        elif name == "embedding_mse":
            out[name] = [(0, 0)]
    return out


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    embedding_size: Optional[int] = None
    """Width of the embedding output; default hidden_size."""

    @staticmethod
    def of(hf_config, arch: Architecture) -> "ModelShape":
        return ModelShape(*dims(hf_config, arch), embedding_width(hf_config, arch))


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


class DistillationObjective(nn.Module):
    """The recipe's weighted sum of losses; holds the trainable projections."""

    def __init__(self, cfg: ObjectiveConfig, teacher_shape: ModelShape,
                 student_shape: ModelShape, teacher_arch: Architecture,
                 student_arch: Architecture, teacher_has_head: bool,
                 teacher_channels: Optional[list[int]] = None):
        super().__init__()
        self.cfg = cfg
        # A pruned student's hidden channel j is the teacher's teacher_channels[j]: hidden
        # cosine compares it with those channels of the teacher (None: equal widths).
        self.teacher_channels = teacher_channels
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
                s.mlm_logits, labels[self.logit_rows(mask, labels)])))

    def _add_hidden_cosine(self, section, pairs) -> None:
        (s_layer, t_layer), = pairs
        self._capture(student_hidden=[s_layer], teacher_hidden=[t_layer])
        kept = self.teacher_channels
        self.terms.append(Term(
            "hidden_cosine", section.weight,
            target=lambda t, mask: t.captured.hidden[t_layer] if kept is None
            else t.captured.hidden[t_layer][..., kept],
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

    def logit_rows(self, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(batch, seq) bool: where MLM logits are computed (masked, or all real tokens)."""
        if self.logit_positions == "all":
            return attention_mask.bool() | (labels != -100)
        return labels != -100

    @torch.no_grad()
    def teacher_forward(self, teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        labels: torch.Tensor) -> TeacherOutputs:
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
            logits = apply_mlm_head(teacher.model, arch,
                                    last[self.logit_rows(attention_mask, labels)])
        side = TeacherSide(captured, logits)
        targets = {term.name: term.target(side, attention_mask) for term in self.terms}
        return TeacherOutputs(targets=targets, deepest_hidden=last,
                              mlm_top1=None if logits is None else logits.argmax(-1))

    def forward(self, student: StudentOutputs, teacher: TeacherOutputs,
                attention_mask: torch.Tensor, labels: torch.Tensor) -> ObjectiveOutput:
        total = torch.zeros((), dtype=torch.float32, device=attention_mask.device)
        parts = {}
        for term in self.terms:
            value = term.compute(student, teacher.targets.get(term.name), attention_mask,
                                 labels)
            parts[term.name] = value.detach()
            total = total + term.weight * value
        return ObjectiveOutput(total=total, parts=parts,
                               stats=self.stats(student, teacher, attention_mask, labels))

    @torch.no_grad()
    def stats(self, student: StudentOutputs, teacher: TeacherOutputs,
              attention_mask: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        device = attention_mask.device
        zero = torch.zeros((), dtype=torch.float32, device=device)
        out = {"mlm_correct": zero, "mlm_count": zero, "agreement_sum": zero,
               "agreement_count": zero}
        if student.mlm_logits is not None:
            logits = student.mlm_logits
            row_labels = labels[self.logit_rows(attention_mask, labels)]
            masked = row_labels != -100
            # "token x is the student's top-1" as logit[x] >= max: amax is several times
            # cheaper than argmax over a (rows, vocab) tensor on CPU.
            best = logits.amax(-1)

            def is_top1(tokens: torch.Tensor) -> torch.Tensor:
                return logits.gather(-1, tokens.clamp(min=0)[:, None])[:, 0] >= best

            out["mlm_correct"] = is_top1(row_labels)[masked].sum().float()
            out["mlm_count"] = masked.sum().float()
            if teacher.mlm_top1 is not None:
                out["agreement_sum"] = is_top1(teacher.mlm_top1)[masked].sum().float()
                out["agreement_count"] = masked.sum().float()
                return out
        if teacher.deepest_hidden is not None:
            total, count = hidden_agreement(student.last_hidden, teacher.deepest_hidden,
                                            attention_mask)
            out["agreement_sum"], out["agreement_count"] = total, count
        return out


def hidden_agreement(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                     mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over real tokens of a cosine, number of real tokens). Equal widths: cosine of
    the two hidden states; else cosine of each token's row of token-token cosine
    similarities (real keys only), which needs no common width."""
    s, t = student_hidden.float(), teacher_hidden.float()
    weights = mask.to(torch.float32)
    if s.shape[-1] != t.shape[-1]:
        s_unit = torch.nn.functional.normalize(s, dim=-1)
        t_unit = torch.nn.functional.normalize(t, dim=-1)
        key_weights = weights[:, None, :]
        s = (s_unit @ s_unit.transpose(1, 2)) * key_weights  # (batch, seq, seq)
        t = (t_unit @ t_unit.transpose(1, 2)) * key_weights
    cos = torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)  # (batch, seq)
    return (cos * weights).sum(), weights.sum()


# ------------------------------------------------------------------ module DeepSpeed wraps


class DistillModule(nn.Module):
    """Student + objective in one module, so the objective's projections are trained by
    the same (DeepSpeed) optimizer. ``state_dict`` keys: ``student.*``, ``objective.*``."""

    def __init__(self, student: nn.Module, objective: DistillationObjective):
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, teacher_out: TeacherOutputs) -> ObjectiveOutput:
        objective = self.objective
        base, arch = self.student.base_model, objective.student_arch
        with capture(base, arch, objective.student_plan) as captured:
            out = base(input_ids=input_ids, attention_mask=attention_mask)
        last = out.last_hidden_state
        captured.hidden.setdefault(objective.student_shape.num_layers, last)
        logits = None
        if objective.needs_mlm_logits:
            rows = objective.logit_rows(attention_mask, labels)
            logits = apply_mlm_head(self.student, arch, last[rows])
        elif not self.training:  # evaluation: MLM accuracy even when no term needs it
            with torch.no_grad():
                logits = apply_mlm_head(self.student, arch, last[labels != -100])
        return objective(StudentOutputs(captured, last, logits), teacher_out, attention_mask,
                         labels)


def build_objective(cfg: ObjectiveConfig, teacher, student_config) -> DistillationObjective:
    """The recipe's objective for this teacher and student (HF config of the student);
    raises RecipeValidationError when they do not fit (see validate.check_objective)."""
    from distill_pretrain.validate import check_objective

    student_arch = architecture_of(student_config)
    teacher_shape = ModelShape(teacher.num_layers, teacher.hidden_size, teacher.num_heads,
                               embedding_width(teacher.config, teacher.arch))
    student_shape = ModelShape.of(student_config, student_arch)
    channels = getattr(student_config, TEACHER_CHANNELS_KEY, None)
    if student_shape.hidden_size == teacher_shape.hidden_size:
        channels = None
    check_objective(cfg, teacher_shape=teacher_shape, student_shape=student_shape,
                    teacher_has_head=teacher.has_mlm_head, teacher_folder=teacher.path,
                    teacher_vocab=teacher.config.vocab_size,
                    student_vocab=student_config.vocab_size,
                    student_pruned=channels is not None)
    return DistillationObjective(cfg, teacher_shape, student_shape, teacher.arch,
                                 student_arch, teacher.has_mlm_head, channels)
