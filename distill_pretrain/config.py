"""Typed configs of the models and objectives (`teacher:`, `student:`, `objective:`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from distill_common.config import check


@dataclass
class TeacherConfig:
    path: str = "minilm_l6"
    """A Hugging Face model folder, or the name of an asset (`distill assets list`)."""


@dataclass
class StudentConfig:
    num_layers: int = 3
    """Transformer layers of the student."""
    hidden_size: Optional[int] = None
    """Width; default: the teacher's."""

    def __post_init__(self):
        check(self.num_layers >= 1, "num_layers", f"must be >= 1, got {self.num_layers}")


@dataclass
class ObjectiveConfig:
    pass
