"""Typed config of `distill prep` (the `prep:` section of a recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from distill_common.config import check, check_choice

# Config fields that change the bytes of the shards; the rest (workers, output_dir,
# progress) may differ between a run and its resume.
OUTPUT_FIELDS = ("sources", "seq_len", "holdout", "validation_fraction", "min_tokens",
                 "on_error", "max_line_bytes", "docs_per_shard", "doc_split", "sentence_split",
                 "text_field", "id_field", "format", "tokenizer")


@dataclass
class PrepConfig:
    sources: List[str] = field(default_factory=lambda: ["wiki_summaries"])
    """Named corpora (see `distill assets list`), or paths, folders, globs and fsspec
    URLs (file://, s3://, gs://) of text, JSONL or Parquet files, or a folder written by
    `datasets.Dataset.save_to_disk`."""
    output_dir: Optional[str] = None
    """Where shards and manifest.json go (a folder or an fsspec URL); default
    `<output_dir>/shards`."""
    seq_len: int = 128
    """Packed sequence length in tokens, special tokens included."""
    tokenizer: Optional[str] = None
    """Tokenizer folder or model asset name; default: the recipe's `teacher.path`."""
    holdout: Optional[str] = None
    """Text file of documents to leave out (evaluation text): one doc_hash (hex sha256 of
    the normalised text) or one document id per line; `#` starts a comment line."""
    validation_fraction: float = 0.01
    """Fraction of whole documents (chosen by doc hash, so deterministic) written to the
    validation split."""
    min_tokens: int = 8
    """Documents with fewer tokens (no special tokens) are dropped (`dropped.too_short`)."""
    on_error: str = "raise"
    """Bad input (a file that cannot be read to its end, such as a corrupt or cut-short
    archive; invalid UTF-8; a bad JSON line or one without a string `text_field`; an
    empty or whitespace-only file; a line over `max_line_bytes`): `raise` stops with an
    error naming the file, the line and the fix; `skip` skips it and counts it in the
    manifest (`dropped` by reason, and per file under `sources[].bad_input`). A file that
    cannot be read to its end is skipped whole."""
    max_line_bytes: int = 16 << 20
    """Longest line (one document, or one JSONL record) read, in bytes; a longer one is
    bad input (`too_long`) and is never held in memory whole. Also caps a `blank_line`
    document and a Parquet/`datasets` text."""
    docs_per_shard: int = 20000
    """Input documents per work unit; each unit writes one train and one validation
    shard. Fixed by the data, not by the number of workers, so shards are identical
    whatever the parallelism."""
    doc_split: str = "line"
    """Plain-text files: `line` = one document per line, `blank_line` = documents are
    blocks separated by blank lines."""
    sentence_split: bool = True
    """Documents longer than one sequence are cut into pieces at sentence ends (each piece
    fits one sequence, a long sentence is cut where it must); pieces end with SEP."""
    text_field: str = "text"
    """Field holding the text in JSONL, Parquet and `datasets` inputs."""
    id_field: Optional[str] = "id"
    """Field holding a document id in JSONL/Parquet/`datasets` inputs (used by `holdout`);
    when absent the id is `<file>:<line or row>`."""
    format: str = "auto"
    """Input file format: `auto` (by extension: .jsonl/.ndjson, .parquet, else text),
    `text`, `jsonl` or `parquet`."""
    workers: Optional[int] = None
    """Ray tasks in flight; default: the cores of the local machine or the cluster's CPUs.
    0 runs everything in this process without Ray (tests, tiny inputs)."""
    progress_every_s: float = 10.0
    """Seconds between progress lines (documents/s, tokens/s, ETA)."""
    spill_text: Optional[bool] = None
    """Pass 1 writes the normalised texts beside the shards (`.prep/text/`, about the
    corpus's size, each file deleted once its chunk is packed) and pass 2 tokenizes those
    instead of reading and normalising the sources again. Default: on for a local output
    folder, off for remote URLs (where it would double the writes)."""

    def __post_init__(self):
        check(self.seq_len >= 8, "seq_len", f"must be >= 8, got {self.seq_len}")
        check(self.seq_len <= 1 << 16, "seq_len", f"must be <= 65536, got {self.seq_len}")
        check(len(self.sources) > 0, "sources", "must name at least one corpus or path")
        check(0.0 <= self.validation_fraction < 1.0, "validation_fraction",
              f"must be in [0, 1), got {self.validation_fraction}")
        check(self.min_tokens >= 0, "min_tokens", f"must be >= 0, got {self.min_tokens}")
        check_choice(self.on_error, "on_error", ["raise", "skip"])
        check(self.max_line_bytes >= 1024, "max_line_bytes",
              f"must be >= 1024, got {self.max_line_bytes}")
        check(self.docs_per_shard >= 1, "docs_per_shard",
              f"must be >= 1, got {self.docs_per_shard}")
        check_choice(self.doc_split, "doc_split", ["line", "blank_line"])
        check_choice(self.format, "format", ["auto", "text", "jsonl", "parquet"])
        check(bool(self.text_field), "text_field", "must not be empty")
        check(self.workers is None or self.workers >= 0, "workers",
              f"must be >= 0 (0 = no Ray), got {self.workers}")
        check(self.progress_every_s > 0, "progress_every_s",
              f"must be > 0, got {self.progress_every_s}")
