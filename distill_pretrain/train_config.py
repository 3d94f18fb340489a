"""Typed config of `distill pretrain` (the `train:` section of a recipe)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from distill_common.config import check


@dataclass
class TrainConfig:
    data_dir: Optional[str] = None
    """Shards made by `distill prep`; default: the recipe's prep output."""
    output_dir: Optional[str] = None
    """Checkpoints, logs and TensorBoard events; default `<output_dir>/pretrain`."""
    export_dir: Optional[str] = None
    """The exported Hugging Face student; default `<output_dir>/student`."""
    max_steps: int = 100
    """Optimizer steps."""

    def __post_init__(self):
        check(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
