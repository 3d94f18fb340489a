"""Typed configs of `distill finetune` and `distill report`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class FinetuneConfig:
    tasks: List[str] = field(default_factory=lambda: ["bbc_news"])
    """Task recipes: names of the built-in tasks or paths to task YAML files."""
    output_dir: Optional[str] = None
    """Default `<output_dir>/finetune`."""


@dataclass
class ReportConfig:
    output_dir: Optional[str] = None
    """Default `<output_dir>/report`."""
