"""The contract with data prep: the ``doc_hash`` of every validation and test text of a
task, so evaluation text stays out of the distillation shards (``prep.holdout``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from distill_common.fsio import atomic_write_text
from finetune.data import load_task_data
from finetune.tasks import TaskConfig, load_task


def heldout_doc_hashes(task: "str | Path | TaskConfig") -> set[str]:
    """doc_hash of every validation and test text of the task's deterministic split
    (both texts of a pair; a token task's words joined by spaces). Prep excludes these
    from the distillation shards (``prep.holdout``)."""
    data = load_task_data(load_task(task))
    return data.heldout_hashes()


def write_holdout_file(tasks: "str | Path | TaskConfig | Sequence", path: str | Path) -> int:
    """Write the held-out hashes of one task or several, one per line (the
    ``prep.holdout`` format, comments start with #); returns how many."""
    specs = list(tasks) if isinstance(tasks, (list, tuple)) else [tasks]
    configs = [load_task(t) for t in specs]
    hashes: set[str] = set()
    for cfg in configs:
        hashes |= heldout_doc_hashes(cfg)
    names = ", ".join(c.name for c in configs)
    atomic_write_text(path, f"# held-out validation/test texts of task(s) {names}\n"
                      + "".join(h + "\n" for h in sorted(hashes)))
    return len(hashes)
