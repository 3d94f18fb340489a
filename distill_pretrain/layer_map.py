"""Which student layer learns from which teacher layer, for each objective."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from distill_pretrain.architectures import Architecture, dims, embedding_width
from distill_pretrain.config import (LastLayerConfig, LayerMapConfig, ObjectiveConfig,
                                     parse_layer_choice)


def default_teacher_layers(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Evenly spaced from the first to the last teacher layer (1-based): 6 of 12 ->
    1,3,5,8,10,12, which is DistilBERT's every-other-layer choice."""
    if num_student_layers == 1:
        return [num_teacher_layers]
    step = (num_teacher_layers - 1) / (num_student_layers - 1)
    return [1 + int(round(i * step)) for i in range(num_student_layers)]


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
