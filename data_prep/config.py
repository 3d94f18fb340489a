"""Typed config of `distill prep` (the `prep:` section of a recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from distill_common.config import check


@dataclass
class PrepConfig:
    sources: List[str] = field(default_factory=lambda: ["wiki_summaries"])
    """Named corpora (see `distill assets list`) or paths / globs / fsspec URLs."""
    output_dir: Optional[str] = None
    """Where shards and manifest.json go; default `<output_dir>/shards`."""
    seq_len: int = 128
    """Packed sequence length in tokens, special tokens included."""

    def __post_init__(self):
        check(self.seq_len >= 8, "seq_len", f"must be >= 8, got {self.seq_len}")
