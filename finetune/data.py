"""A task's examples: its source's tables (finetune.sources) -> column mapping ->
dedupe -> split -> label checks (finetune.labels). Everything a user can get wrong fails
here, before a model is loaded."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from distill_common.textnorm import doc_hash
from finetune.labels import check_labels
from finetune.sources import Table, read_source
from finetune.tasks import TaskConfig, TaskError

log = logging.getLogger(__name__)


@dataclass
class Example:
    id: str
    text: Union[str, list]
    """A string, or the word list of a token task."""
    label: Union[str, float, list]
    """Class name, regression target, or one tag per word."""
    text_pair: Optional[str] = None

    def texts(self) -> list[str]:
        first = " ".join(self.text) if isinstance(self.text, list) else self.text
        return [first] + ([self.text_pair] if self.text_pair is not None else [])


@dataclass
class TaskData:
    task: TaskConfig
    train: list[Example]
    validation: list[Example]
    test: Optional[list[Example]]
    labels: Optional[list[str]]
    """Class names or tags in id order; None for regression."""
    notes: dict = field(default_factory=dict)
    """How the data was obtained: source, split origin, dropped duplicates."""
    unseen: dict = field(default_factory=dict)
    """Evaluation labels training never saw: the policy (task.unseen_labels) and, per
    split, each such label's count and the examples it touched."""

    def heldout_hashes(self) -> set[str]:
        held = self.validation + (self.test or [])
        return {doc_hash(t) for ex in held for t in ex.texts()}

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation),
                "test": len(self.test) if self.test is not None else 0}


# ------------------------------------------------------------------ column mapping

def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, str) and not value.strip())


def _words(value: Any, where: str, column: str) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise TaskError(f"{where}: column {column!r} must hold a list of words/tags or a "
                    f"whitespace-separated string, got {type(value).__name__}")


def _to_examples(task: TaskConfig, table: Table, split: str) -> list[Example]:
    cols = task.columns
    wanted = {"columns.text": cols.text, "columns.label": cols.label}
    if cols.text_pair:
        wanted["columns.text_pair"] = cols.text_pair
    for key, column in wanted.items():
        if column not in table.columns:
            raise TaskError(f"{table.where}: no column {column!r} ({key} of task "
                            f"{task.name}); available columns: {table.columns}. Set {key} "
                            f"to one of them.")
    examples = []
    for i, row in enumerate(table.rows):
        where = f"{table.where} row {i + 1}"
        text, label = row[cols.text], row[cols.label]
        if _missing(text) and not isinstance(text, list):
            raise TaskError(f"{where}: empty {cols.text!r} (columns.text); remove the row")
        if _missing(label) and not isinstance(label, list):
            raise TaskError(f"{where}: empty {cols.label!r} (columns.label); remove the row")
        pair = None
        if cols.text_pair:
            pair = row[cols.text_pair]
            if _missing(pair):
                raise TaskError(f"{where}: empty {cols.text_pair!r} (columns.text_pair)")
            pair = str(pair)
        if task.type == "token_classification":
            text = _words(text, where, cols.text)
            label = _words(label, where, cols.label)
            if len(text) != len(label) or not text:
                raise TaskError(f"{where}: {len(text)} words but {len(label)} tags; a "
                                f"token task needs one tag per word")
        elif task.type == "regression":
            try:
                label = float(label)
            except (TypeError, ValueError):
                raise TaskError(f"{where}: label {label!r} in column {cols.label!r} is not "
                                f"a number (regression task)") from None
        else:
            text = str(text)
            label = str(label)
        ex_id = str(row["id"]) if "id" in row and not _missing(row["id"]) else f"{split}/{i}"
        examples.append(Example(ex_id, text, label, pair))
    return examples


# ------------------------------------------------------------------ splits and labels

def _drop(task: TaskConfig, examples: list[Example], notes: dict, key: str) -> list[Example]:
    if task.drop_labels and task.type != "token_classification":
        drop = set(task.drop_labels)
        kept = [ex for ex in examples if str(ex.label) not in drop]
        notes.setdefault("dropped_by_label", {})[key] = len(examples) - len(kept)
        examples = kept
    if task.dedupe:
        seen: set[tuple[str, ...]] = set()
        kept = []
        for ex in examples:
            identity = tuple(doc_hash(t) for t in ex.texts())
            if identity not in seen:
                seen.add(identity)
                kept.append(ex)
        notes.setdefault("dropped_duplicates", {})[key] = len(examples) - len(kept)
        examples = kept
    return examples


def _seeded_split(task: TaskConfig, examples: list[Example], fractions: Sequence[float]
                  ) -> list[list[Example]]:
    """Deterministic split of ``examples`` into len(fractions)+1 parts: the remainder
    (train) first, then one part per fraction, stratified by class when asked."""
    from sklearn.model_selection import train_test_split

    def strat(idx):
        return [examples[i].label for i in idx] if task.split.stratify and \
            task.is_classification else None

    parts = []
    rest = list(range(len(examples)))
    remaining = 1.0
    for frac in fractions:
        if frac <= 0:
            parts.append([])
            continue
        try:
            rest, taken = train_test_split(rest, test_size=frac / remaining,
                                           random_state=task.split.seed, stratify=strat(rest))
        except ValueError as err:
            raise TaskError(f"task {task.name}: cannot split {len(rest)} examples "
                            f"({err}); use more data, smaller split fractions, or "
                            f"split.stratify: false") from None
        remaining -= frac
        parts.append(sorted(taken))
    return [[examples[i] for i in sorted(rest)]] + [[examples[i] for i in p] for p in parts]


def load_task_data(task: TaskConfig) -> TaskData:
    """Read, map, dedupe, split and check a task's data. Deterministic for a given
    task recipe: the same examples land in the same split on every machine."""
    tables = read_source(task)
    notes: dict = {"source": {k: t.where for k, t in tables.items()}}
    if "all" in tables:
        examples = _drop(task, _to_examples(task, tables["all"], "all"), notes, "all")
        train, validation, test = _seeded_split(task, examples,
                                                [task.split.validation, task.split.test])
        notes["split"] = (f"seeded split (seed {task.split.seed}): validation "
                          f"{task.split.validation}, test {task.split.test}")
        test = test or None
    else:
        splits = {k: _drop(task, _to_examples(task, t, k), notes, k) for k, t in tables.items()}
        train = splits["train"]
        test = splits.get("test")
        if "validation" in splits:
            validation = splits["validation"]
            notes["split"] = "given splits"
        else:
            train, validation = _seeded_split(task, train, [task.split.validation])
            notes["split"] = (f"given train/test; validation carved from train (seed "
                              f"{task.split.seed}, {task.split.validation})")
        if test is None:
            notes["split"] += "; no test split: scores are on validation"
    if not train or not validation:
        raise TaskError(f"task {task.name}: {len(train)} training and {len(validation)} "
                        f"validation examples; both splits need examples")
    data = TaskData(task, train, validation, test, None, notes)
    check_labels(task, data)
    _after_unseen(task, data)
    log.info("task %s: %s examples (%s)", task.name, data.sizes(), notes["split"])
    return data


def _after_unseen(task: TaskConfig, data: TaskData) -> None:
    for split in ("validation", "test"):
        if split in data.unseen and not getattr(data, split):
            raise TaskError(f"task {task.name}: unseen_labels: drop left no {split} example; "
                            f"use count_as_wrong or add training examples with those labels")
    touched = {k: v for k, v in data.unseen.items() if k != "policy"}
    if touched:
        log.warning("task %s: labels never seen in training (unseen_labels: %s): %s",
                    task.name, task.unseen_labels, touched)


def cap_train_split(data: TaskData, max_examples: int | None, seed: int) -> None:
    """Keep a seeded random ``max_examples`` of the training split (in their order), the
    subset every model of a comparison is fine-tuned on."""
    if max_examples and len(data.train) > max_examples:
        import torch

        gen = torch.Generator().manual_seed(seed)
        keep = sorted(torch.randperm(len(data.train), generator=gen)[:max_examples].tolist())
        data.train = [data.train[i] for i in keep]
