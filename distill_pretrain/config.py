"""Typed configs of the models and objectives (`teacher:`, `student:`, `objective:`).

Only structural checks live here (no model files are read); the checks that need the
teacher's config and weights are in ``distill_pretrain.validate``.

Layer numbers follow the Hugging Face ``hidden_states`` convention: 0 is the embedding
output, ``k`` (1..L) is the output of the k-th transformer layer; attention and Q/K/V of
layer ``k`` are those computed inside the k-th layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import List, NoReturn, Optional

from distill_common.config import check, check_choice
from distill_common.errors import DistillUserError
from distill_pretrain.train_config import TrainConfig

DTYPES = ("float32", "bfloat16", "float16")


class RecipeValidationError(DistillUserError, ValueError):
    """The recipe does not fit its teacher (layers, heads, widths, MLM head, vocabulary);
    the message names the recipe key, the teacher folder and the fix."""


def fail(key: str, message: str) -> NoReturn:
    """Raise RecipeValidationError for recipe key ``key``."""
    raise RecipeValidationError(f"{key}: {message}")


@dataclass
class TeacherConfig:
    path: str = "minilm_l6"
    """A Hugging Face model folder, the name of an asset (`distill assets list`), or a
    Hugging Face Hub id with an optional revision: `bert-base-uncased`,
    `sentence-transformers/all-MiniLM-L6-v2@<branch, tag or commit>`, read from the Hub
    cache (HF_HOME / HF_HUB_CACHE; only the cache with HF_HUB_OFFLINE=1)."""
    dtype: Optional[str] = None
    """float32 | bfloat16 | float16; default: the training precision the trainer passes."""

    def __post_init__(self):
        check(bool(self.path.strip()), "path", "must name a model folder or asset")
        if self.dtype is not None:
            check_choice(self.dtype, "dtype", DTYPES)


@dataclass
class StudentConfig:
    num_layers: int = 3
    """Transformer layers of the student."""
    hidden_size: Optional[int] = None
    """Width; default: the teacher's."""
    num_heads: Optional[int] = None
    """Attention heads; default: heads of the teacher's head size when that size divides
    hidden_size, whatever the init (a random student and a pruned one of the same width
    get the same heads); else hidden_size // 64."""
    intermediate_size: Optional[int] = None
    """Feed-forward width; default: the teacher's ratio (usually 4x) times hidden_size."""
    init: str = "auto"
    """auto | teacher_layers | pruned | random. auto: copy teacher layers when the student
    has the teacher's width, heads and feed-forward size and at most its depth, else
    random. pruned: cut the student out of the teacher (any shape up to the teacher's:
    layers, hidden channels, heads, FFN neurons), keeping what matters most on a
    calibration sample of the training shards (distill_pretrain/prune.py)."""
    teacher_layers: Optional[List[int]] = None
    """Teacher layers (1..L) copied into student layers 1..num_layers when init copies
    layers; default: evenly spaced from first to last (DistilBERT: 1,3,5,8,10,12 of 12).
    With init=pruned: the teacher layers to cut the student layers from."""
    layer_selection: Optional[str] = None
    """init=pruned only: importance (the layers that change their input most on the
    calibration sample, 1 - cosine(input, output)) | even (evenly spaced, as
    teacher_layers' default); default importance. teacher_layers overrides both."""
    calibration_samples: int = 256
    """init=pruned: training-shard sequences the teacher's activations are measured on."""
    prune_depth: Optional[int] = None
    """init=pruned: cut the student from teacher layers 1..prune_depth only (default: all
    of them). With an objective on an upper-middle teacher layer k (the teacher then runs
    k layers only), prune_depth=k cuts the student from the layers that run."""
    embedding_init: str = "auto"
    """auto | copy | svd | random. auto: copy at the teacher's width, else svd (the
    teacher's embeddings projected on their top singular directions)."""
    attention_dropout: Optional[float] = None
    """Attention-probability dropout; default: the teacher's. Attention objectives compare
    the pre-dropout distribution, so dropout only regularises the student."""
    hidden_dropout: Optional[float] = None
    """Hidden dropout; default: the teacher's."""

    def __post_init__(self):
        check(self.num_layers >= 1, "num_layers", f"must be >= 1, got {self.num_layers}")
        for name in ("hidden_size", "num_heads", "intermediate_size"):
            value = getattr(self, name)
            check(value is None or value >= 1, name, f"must be >= 1, got {value}")
        if self.hidden_size is not None and self.num_heads is not None:
            check(self.hidden_size % self.num_heads == 0, "num_heads",
                  f"must divide hidden_size={self.hidden_size}, got {self.num_heads}")
        check_choice(self.init, "init", ("auto", "teacher_layers", "pruned", "random"))
        check_choice(self.embedding_init, "embedding_init", ("auto", "copy", "svd", "random"))
        if self.teacher_layers is not None:
            check(len(self.teacher_layers) == self.num_layers, "teacher_layers",
                  f"lists {len(self.teacher_layers)} layers for num_layers="
                  f"{self.num_layers}; give one teacher layer per student layer")
            check(all(k >= 1 for k in self.teacher_layers), "teacher_layers",
                  f"layers are numbered from 1, got {self.teacher_layers}")
            check(self.init != "random", "teacher_layers",
                  "is set but init=random copies no layers; drop one of the two")
        if self.layer_selection is not None:
            check_choice(self.layer_selection, "layer_selection", ("importance", "even"))
            check(self.init == "pruned", "layer_selection",
                  f"is only read with init=pruned (got init={self.init}); drop it")
            check(self.teacher_layers is None, "layer_selection",
                  "is set together with teacher_layers, which already chooses the layers; "
                  "drop one of the two")
        check(self.calibration_samples >= 1, "calibration_samples",
              f"must be >= 1, got {self.calibration_samples}")
        if self.prune_depth is not None:
            check(self.init == "pruned", "prune_depth",
                  f"is only read with init=pruned (got init={self.init}); drop it")
            check(self.prune_depth >= self.num_layers, "prune_depth",
                  f"{self.prune_depth} teacher layers cannot give num_layers="
                  f"{self.num_layers} student layers")
            check(max(self.teacher_layers or [1]) <= self.prune_depth, "teacher_layers",
                  f"{self.teacher_layers} go deeper than prune_depth={self.prune_depth}")
        for name in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            check(value is None or 0.0 <= value < 1.0, name, f"must be in [0, 1), got {value}")


# ------------------------------------------------------------------ objectives

LAYER_MAPS = ("uniform", "last", "pairs")


def _check_weight(weight: float) -> None:
    check(weight > 0, "weight", f"must be > 0 (remove the section to disable it), got "
                                f"{weight}")


def parse_layer_choice(value: str) -> str | int:
    """'last' | 'upper_middle' | '7' -> the name, or the layer number."""
    if value in ("last", "upper_middle"):
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"must be 'last', 'upper_middle' or a layer number, got "
                         f"{value!r}") from None


def _check_layer_choice(value: str, field: str) -> None:
    try:
        choice = parse_layer_choice(value)
    except ValueError as err:
        check(False, field, str(err))
    else:
        check(not isinstance(choice, int) or choice >= 1, field,
              f"layers are numbered from 1 (0 is the embeddings), got {value}")


@dataclass
class LogitKLConfig:
    """DistilBERT soft targets: KL(teacher || student) of MLM distributions at temperature
    T, scaled by T^2. Needs a teacher with an MLM head."""
    weight: float = 1.0
    """Weight in the total loss."""
    temperature: float = 2.0
    """Softmax temperature T of both distributions."""
    positions: str = "masked"
    """masked (positions with a label; cheap) | all (every non-padding position)."""

    def __post_init__(self):
        _check_weight(self.weight)
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check_choice(self.positions, "positions", ("masked", "all"))


@dataclass
class MLMConfig:
    """The student's own masked-LM cross-entropy on the masked labels."""
    weight: float = 1.0
    """Weight in the total loss."""

    def __post_init__(self):
        _check_weight(self.weight)


@dataclass
class LastLayerConfig:
    """An objective on one student layer against one teacher layer."""
    weight: float = 1.0
    """Weight in the total loss."""
    student_layer: str = "last"
    """'last' or a layer number 1..L of the student."""
    teacher_layer: str = "last"
    """'last', 'upper_middle' (layer L - L//8: 21 of 24, as MiniLMv2 for large teachers)
    or a layer number 1..L of the teacher."""

    def __post_init__(self):
        _check_weight(self.weight)
        _check_layer_choice(self.student_layer, "student_layer")
        check(self.student_layer != "upper_middle", "student_layer",
              "upper_middle is for the teacher; use 'last' or a number")
        _check_layer_choice(self.teacher_layer, "teacher_layer")


@dataclass
class LayerMapConfig:
    """An objective on several (student layer, teacher layer) pairs (TinyBERT)."""
    weight: float = 1.0
    """Weight in the total loss."""
    layer_map: str = "uniform"
    """uniform (student m <- teacher m*L_t/L_s) | last (last <- last) | pairs."""
    pairs: Optional[List[List[int]]] = None
    """With layer_map=pairs: [[student_layer, teacher_layer], ...], layers from 1."""

    def __post_init__(self):
        _check_weight(self.weight)
        check_choice(self.layer_map, "layer_map", LAYER_MAPS)
        if self.layer_map == "pairs":
            check(bool(self.pairs), "pairs", "layer_map=pairs needs pairs: [[s, t], ...]")
            for pair in self.pairs:
                check(len(pair) == 2 and min(pair) >= 1, "pairs",
                      f"each pair is [student_layer, teacher_layer] numbered from 1, got "
                      f"{pair}")
        else:
            check(self.pairs is None, "pairs", f"is only read with layer_map=pairs (got "
                                               f"layer_map={self.layer_map})")


@dataclass
class WeightOnlyConfig:
    weight: float = 1.0
    """Weight in the total loss."""

    def __post_init__(self):
        _check_weight(self.weight)


@dataclass
class RelationKLConfig(LastLayerConfig):
    """MiniLMv2: Q-Q, K-K, V-V self-attention relations with R relation heads."""
    relation_heads: int = 48
    """R: each model's Q/K/V (all heads concatenated) is re-split into R heads; both widths
    must divide by R (48 for base teachers, 64 for large ones in the paper)."""
    relations: List[str] = field(default_factory=lambda: ["qq", "kk", "vv"])
    """Which of qq, kk, vv (each weighted equally)."""

    def __post_init__(self):
        super().__post_init__()
        check(self.relation_heads >= 1, "relation_heads",
              f"must be >= 1, got {self.relation_heads}")
        check(len(self.relations) > 0, "relations", "name at least one of qq, kk, vv")
        for rel in self.relations:
            check_choice(rel, "relations", ("qq", "kk", "vv"))
        check(len(set(self.relations)) == len(self.relations), "relations",
              f"lists a relation twice: {self.relations}")


@dataclass
class PooledEmbeddingConfig(LastLayerConfig):
    """Sentence-embedding distillation: the student's mean-pooled hidden states against
    the teacher's (what a sentence-embedding teacher such as all-MiniLM-L6-v2 was trained
    to produce), pooled over spans of ``span`` positions, so that one 128-token training
    sequence gives several sentence-length embeddings."""
    span: int = 32
    """Positions per pooled span (0: the whole sequence); a span counts when it holds a
    real token."""
    loss: str = "cosine"
    """cosine: 1 - cos(student span embedding, teacher's), the student's projected when
    widths differ (a pruned student's compared with the teacher channels it kept) |
    relation: MSE of the two models' in-batch cosine-similarity matrices of the span
    embeddings (any widths, no projection)."""

    def __post_init__(self):
        super().__post_init__()
        check(self.span >= 0, "span", f"must be >= 0 (0: the whole sequence), got {self.span}")
        check_choice(self.loss, "loss", ("cosine", "relation"))


@dataclass
class ObjectiveConfig:
    """The distillation objective: a weighted sum of the sections that are set (null or
    absent = off; at least one must be set, checked by validate_recipe). Published mixes
    are in configs/*.yaml."""
    logit_kl: Optional[LogitKLConfig] = None
    """DistilBERT soft-target KL on MLM logits (teacher needs an MLM head)."""
    mlm: Optional[MLMConfig] = None
    """Student masked-LM cross-entropy."""
    hidden_cosine: Optional[LastLayerConfig] = None
    """DistilBERT: 1 - cos(student, teacher) hidden states (equal widths; a narrower
    student.init=pruned student is compared with the teacher channels it kept)."""
    hidden_mse: Optional[LayerMapConfig] = None
    """TinyBERT: MSE(student hidden W_h, teacher hidden), W_h learned when widths differ."""
    attention_score_mse: Optional[LayerMapConfig] = None
    """TinyBERT: MSE of pre-softmax attention scores (equal head counts)."""
    embedding_mse: Optional[WeightOnlyConfig] = None
    """TinyBERT: MSE(student embeddings W_e, teacher embeddings)."""
    attention_kl: Optional[LastLayerConfig] = None
    """MiniLM: KL of self-attention distributions per head (equal head counts)."""
    value_relation_kl: Optional[LastLayerConfig] = None
    """MiniLM: KL of softmax(V V^T / sqrt(d_head)) per head (equal head counts)."""
    qkv_relation_kl: Optional[RelationKLConfig] = None
    """MiniLMv2: KL of Q-Q, K-K, V-V relations with R relation heads (any widths)."""
    pooled_embedding: Optional[PooledEmbeddingConfig] = None
    """Sentence embeddings: mean-pooled spans of one layer, cosine or in-batch relations."""

    def active(self) -> dict[str, object]:
        """Name -> section of every objective that is on, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}

    @property
    def needs_mlm_logits(self) -> bool:
        return self.logit_kl is not None or self.mlm is not None


@dataclass
class PretrainJob:
    """What `distill pretrain` reads: the recipe's pretraining sections (the launcher's
    Recipe builds it with ``pretrain_job()``)."""
    name: str
    seed: int
    teacher: TeacherConfig
    student: StudentConfig
    objective: ObjectiveConfig
    train: TrainConfig
    recipe: dict = field(default_factory=dict)
    """The whole resolved recipe as plain data, recorded with checkpoints and exports."""
