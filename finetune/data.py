"""Reading a task's examples: files or a named corpus -> column mapping -> split ->
label checks. Everything a user can get wrong fails here, before a model is loaded."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from distill_common.textnorm import doc_hash
from finetune.tasks import TaskConfig, TaskError

log = logging.getLogger(__name__)

SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
                  ".parquet": "parquet"}
SPLIT_NAMES = ("train", "validation", "test")
SPLIT_ALIASES = {"validation": ("validation", "valid", "dev", "val"), "test": ("test",),
                 "train": ("train",)}


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
class Table:
    """Rows of one split as read from its source, before column mapping."""
    where: str
    columns: list[str]
    rows: list[dict]


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

    def heldout_hashes(self) -> set[str]:
        held = self.validation + (self.test or [])
        return {doc_hash(t) for ex in held for t in ex.texts()}

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation),
                "test": len(self.test) if self.test is not None else 0}


# ------------------------------------------------------------------ reading sources

def _resolve(task: TaskConfig, spec: str) -> Path:
    p = Path(spec).expanduser()
    candidates = [p] if p.is_absolute() else \
        ([Path(task.base_dir) / p] if task.base_dir else []) + [Path.cwd() / p]
    for c in candidates:
        if c.exists():
            return c
    raise TaskError(f"task {task.name}: data {spec!r} not found (looked in "
                    f"{', '.join(str(c) for c in candidates)})")


def _format_of(task: TaskConfig, path: Path) -> str:
    if task.source.format:
        return task.source.format
    if path.is_dir():
        return "datasets"
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise TaskError(f"{path}: cannot tell the format from the suffix; set source.format "
                        f"to csv, tsv, jsonl, parquet or datasets")
    return fmt


def _plain(value: Any) -> Any:
    """numpy scalars/arrays (pandas, parquet) -> Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _frame_table(df, where: str) -> Table:
    rows = [{k: _plain(v) for k, v in r.items()} for r in df.to_dict("records")]
    return Table(where, [str(c) for c in df.columns], rows)


def _read_file(path: Path, fmt: str) -> Table:
    import pandas as pd  # a dependency of `datasets`

    try:
        if fmt in ("csv", "tsv"):
            # Everything as strings: labels like "1" or "NA" stay what the file says.
            df = pd.read_csv(path, sep="," if fmt == "csv" else "\t", dtype=str,
                             keep_default_na=False)
        elif fmt == "jsonl":
            df = pd.read_json(path, lines=True, dtype=False)
        else:
            df = pd.read_parquet(path)
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise TaskError(f"{path}: cannot read as {fmt}: {err}") from None
    return _frame_table(df, str(path))


def _read_datasets_folder(path: Path) -> dict[str, Table]:
    """A `save_to_disk` folder: one Dataset (split later) or a DatasetDict."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise TaskError(f"{path}: not a `datasets` save_to_disk folder: {err}") from None
    if isinstance(loaded, datasets.Dataset):
        return {"all": Table(str(path), list(loaded.column_names), loaded.to_list())}
    tables = {}
    for split, names in SPLIT_ALIASES.items():
        found = next((n for n in names if n in loaded), None)
        if found is not None:
            ds = loaded[found]
            tables[split] = Table(f"{path}[{found}]", list(ds.column_names), ds.to_list())
    if "train" not in tables:
        raise TaskError(f"{path}: DatasetDict without a train split (has "
                        f"{list(loaded.keys())}); name one `train`")
    return tables


def _read_source(task: TaskConfig) -> dict[str, Table]:
    """{"all": table} for a source to split, else {"train": ..., "validation": ...}."""
    src = task.source
    if src.corpus:
        from distill_common.corpora import NAMED_CORPORA, iter_documents

        if src.corpus not in NAMED_CORPORA:
            raise TaskError(f"task {task.name}: unknown corpus {src.corpus!r} in "
                            f"source.corpus; known: {', '.join(NAMED_CORPORA)}")
        rows = [{"id": d.id, "text": d.text, "label": d.label}
                for d in iter_documents(src.corpus)]
        return {"all": Table(f"corpus {src.corpus}", ["id", "text", "label"], rows)}
    if src.path:
        path = _resolve(task, src.path)
        fmt = _format_of(task, path)
        if fmt == "datasets":
            return _read_datasets_folder(path)
        return {"all": _read_file(path, fmt)}
    tables = {}
    for split in SPLIT_NAMES:
        spec = getattr(src, split)
        if spec:
            path = _resolve(task, spec)
            fmt = _format_of(task, path)
            if fmt == "datasets":
                sub = _read_datasets_folder(path)
                tables[split] = sub.get(split, sub.get("train", sub.get("all")))
            else:
                tables[split] = _read_file(path, fmt)
    return tables


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


def _label_values(task: TaskConfig, examples: list[Example]) -> list[str]:
    if task.type == "token_classification":
        return [tag for ex in examples for tag in ex.label]
    return [ex.label for ex in examples]


def _check_labels(task: TaskConfig, data: TaskData) -> None:
    if task.type == "regression":
        return
    from collections import Counter

    from finetune.metrics import is_span_tag

    seen_in_train = Counter(_label_values(task, data.train))
    if task.labels is not None:
        missing = [lab for lab in task.labels if lab not in seen_in_train]
        if missing:
            raise TaskError(f"task {task.name}: label(s) {missing} listed in `labels` never "
                            f"occur in the training split ({len(data.train)} examples); the "
                            f"classifier could not learn them. Add training examples or "
                            f"remove them from `labels`.")
        extra = sorted(set(seen_in_train) - set(task.labels))
        if extra:
            raise TaskError(f"task {task.name}: the training split has label(s) {extra} that "
                            f"are not in `labels` {task.labels}; add them or drop those rows")
        labels = list(task.labels)
    else:
        labels = sorted(seen_in_train)
    if len(labels) < 2:
        raise TaskError(f"task {task.name}: the training split has {len(labels)} distinct "
                        f"label(s) {labels}; a classifier needs at least 2")
    if task.type == "token_classification" and task.metric == "entity_f1" and \
            (plain := [lab for lab in labels if not is_span_tag(lab)]):
        raise TaskError(f"task {task.name}: metric entity_f1 scores BIO spans (O, B-X, I-X), "
                        f"but the tags include {plain[:5]}; set `metric: token_accuracy` "
                        f"for word-class tags such as part of speech")
    known = set(labels)
    for split in ("validation", "test"):
        examples = getattr(data, split) or []
        unseen = Counter(v for v in _label_values(task, examples) if v not in known)
        if unseen:
            lab, n = unseen.most_common(1)[0]
            raise TaskError(f"task {task.name}: unseen label {lab!r} in the {split} split "
                            f"({n} example(s); all unseen: {sorted(unseen)}): it never occurs "
                            f"in training, whose labels are {labels}. Add training examples "
                            f"with it or drop those rows.")
    data.labels = labels


def load_task_data(task: TaskConfig) -> TaskData:
    """Read, map, dedupe, split and check a task's data. Deterministic for a given
    task recipe: the same examples land in the same split on every machine."""
    tables = _read_source(task)
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
    _check_labels(task, data)
    log.info("task %s: %s examples (%s)", task.name, data.sizes(), notes["split"])
    return data


def cap_train_split(data: TaskData, max_examples: int | None, seed: int) -> None:
    """Keep a seeded random ``max_examples`` of the training split (in their order), the
    subset every model of a comparison is fine-tuned on."""
    if max_examples and len(data.train) > max_examples:
        import torch

        gen = torch.Generator().manual_seed(seed)
        keep = sorted(torch.randperm(len(data.train), generator=gen)[:max_examples].tolist())
        data.train = [data.train[i] for i in keep]
