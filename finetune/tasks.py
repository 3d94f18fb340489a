"""Task recipes: what a downstream task is (type, data, columns, split, metric).

A task is a small YAML file (format in configs/tasks/README.md); the built-in ones are
``configs/tasks/<name>.yaml``. What a task holds out of the distillation shards is in
``holdout.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from distill_common.config import ConfigError, check, check_choice, load_config
from distill_common.errors import DistillUserError
from distill_common.resources import shipped_folder
from finetune.config import HParams

TASK_TYPES = ("classification", "pair_classification", "regression", "token_classification")
FORMATS = ("csv", "tsv", "jsonl", "parquet", "datasets")
UNSEEN_LABELS = ("error", "drop", "count_as_wrong")
METRICS = {
    "classification": ("accuracy", "macro_f1", "mcc"),
    "pair_classification": ("accuracy", "macro_f1", "mcc"),
    "regression": ("pearson", "spearman"),
    "token_classification": ("entity_f1", "token_accuracy"),
}


class TaskError(DistillUserError, ValueError):
    """A task or its data that cannot be used; the message names the file, column or
    label and the fix. Raised before any training starts."""


@dataclass
class SourceConfig:
    """Where the examples come from: one named corpus, a Hugging Face Hub dataset, one
    file/folder to split, or given split files."""

    corpus: Optional[str] = None
    """A named labelled corpus read with distill_common.corpora (bbc_news,
    wiki_summaries, rotten_tomatoes; oanc_pos for token tasks); columns `id`, `text`,
    `label`."""
    hub: Optional[str] = None
    """A Hugging Face Hub dataset id, `org/name` with an optional `@revision`, read with
    `datasets.load_dataset` through its cache (HF_HOME; offline with HF_DATASETS_OFFLINE=1
    when cached). Class-id columns (ClassLabel) are read as class names."""
    config: Optional[str] = None
    """The Hub dataset's configuration (subset) name, e.g. `sst2` of `nyu-mll/glue`."""
    splits: Optional[Dict[str, str]] = None
    """Which split of a Hub dataset or `datasets` folder is train / validation / test,
    e.g. {train: train, validation: dev}; default: train, validation (or dev, valid,
    val), test. A split left out is carved from train (validation) or not scored (test)."""
    path: Optional[str] = None
    """One file or `datasets` folder; split below unless it is a DatasetDict with
    validation/test splits."""
    train: Optional[str] = None
    """Training split file (with `validation`/`test`, given splits)."""
    validation: Optional[str] = None
    """Validation split file; carved out of train (split.validation) when absent."""
    test: Optional[str] = None
    """Test split file; when absent (and train is given) the score is on validation."""
    format: Optional[str] = None
    """csv, tsv, jsonl, parquet or datasets (a save_to_disk folder); default: from the
    suffix (.csv .tsv .jsonl/.json .parquet, a folder = datasets)."""

    def __post_init__(self):
        check(not ((self.validation or self.test) and not self.train), "validation",
              "source.validation / source.test need source.train")
        check(self.config is None or self.hub is not None, "config",
              "source.config is the configuration of a source.hub dataset; set source.hub")
        if self.splits is not None:
            check(set(self.splits) <= {"train", "validation", "test"}, "splits",
                  f"keys must be train, validation, test; got {sorted(self.splits)}")
            check(self.hub is not None or self.path is not None, "splits",
                  "source.splits names the splits of a source.hub dataset or a `datasets` "
                  "folder (source.path)")
        if self.format is not None:
            check_choice(self.format, "format", FORMATS)


@dataclass
class ColumnsConfig:
    """Which column of the data holds what (token tasks: word list and tag list)."""

    text: str = "text"
    """The text (token tasks: a list of words, or a whitespace-separated string)."""
    text_pair: Optional[str] = None
    """The second text of a pair task."""
    label: str = "label"
    """Class name, number (regression) or tag list (token tasks: BIO tags per word)."""


@dataclass
class SplitConfig:
    """The seeded, deterministic split used where the data gives no split."""

    validation: float = 0.1
    """Fraction of examples held out for validation (early stopping)."""
    test: float = 0.1
    """Fraction held out for the test score (ignored when a test split is given)."""
    seed: int = 0
    """Split seed; the same seed gives the same split on every machine."""
    stratify: bool = True
    """Keep class proportions in every split (classification tasks)."""

    def __post_init__(self):
        check(0 < self.validation < 1, "validation", f"must be in (0, 1), got {self.validation}")
        check(0 <= self.test < 1, "test", f"must be in [0, 1), got {self.test}")
        check(self.validation + self.test < 1, "test", "validation + test must be < 1")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")


@dataclass
class TaskConfig:
    """One downstream task recipe."""

    name: str = "task"
    """Task name: folder names and report columns."""
    type: str = "classification"
    """classification, pair_classification, regression or token_classification (BIO)."""
    source: SourceConfig = field(default_factory=SourceConfig)
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    labels: Optional[List[str]] = None
    """Fixed label order (class names or tags); default: sorted labels of the train split.
    Every listed label must occur in the training data."""
    metric: Optional[str] = None
    """Score for early stopping and the report; default accuracy (classification),
    pearson (regression), entity_f1 (token)."""
    drop_labels: List[str] = field(default_factory=list)
    """Examples with these labels are dropped before splitting (e.g. a catch-all class)."""
    dedupe: bool = True
    """Drop repeated texts (same doc_hash) before splitting, so no text is in two splits."""
    unseen_labels: str = "error"
    """A validation/test label (token tasks: tag) that training never saw: error (stop
    and say so), drop (leave those examples out), count_as_wrong (keep them; the model
    cannot predict the label, so each counts as an error). Recorded in results.json."""
    train: HParams = field(default_factory=HParams)
    """This task's hyperparameter defaults (the run's finetune section wins)."""
    base_dir: Optional[str] = None
    """Folder relative data paths are resolved against (set to the YAML's folder)."""

    def __post_init__(self):
        check(bool(self.name.strip()) and "/" not in self.name, "name",
              f"must be a non-empty name without '/', got {self.name!r}")
        check_choice(self.type, "type", TASK_TYPES)
        given = [n for n in ("corpus", "hub", "path", "train") if getattr(self.source, n)]
        check(len(given) == 1, "source", "give exactly one of source.corpus, source.hub, "
              f"source.path, source.train (got {given or 'none'})")
        check_choice(self.unseen_labels, "unseen_labels", UNSEEN_LABELS)
        check(self.type == "pair_classification" or self.columns.text_pair is None,
              "columns.text_pair", f"only pair_classification tasks have a second text "
              f"(type is {self.type})")
        check(self.type != "pair_classification" or self.columns.text_pair is not None,
              "columns.text_pair", "a pair_classification task needs columns.text_pair")
        check(self.type != "regression" or self.labels is None, "labels",
              "a regression task has no label list")
        if self.labels is not None:
            check(len(set(self.labels)) == len(self.labels) and len(self.labels) >= 2,
                  "labels", f"need >= 2 distinct labels, got {self.labels}")
        if self.metric is None:
            self.metric = METRICS[self.type][0]
        check_choice(self.metric, "metric", METRICS[self.type])

    @property
    def is_classification(self) -> bool:
        return self.type in ("classification", "pair_classification")


def tasks_dir() -> Path:
    """The shipped task recipes: ``configs/tasks`` (distill_common.resources: installed
    with the package, or the repository's; ``$DISTILL_CONFIGS_DIR/tasks`` overrides)."""
    return shipped_folder("configs") / "tasks"


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in tasks_dir().glob("*.yaml"))


def resolve_task_path(name_or_path: str) -> Path:
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise TaskError(f"{p}: task recipe not found")
        return p
    candidate = tasks_dir() / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise TaskError(f"unknown task {name_or_path!r}: not a YAML file and not a built-in "
                        f"task ({', '.join(builtin_tasks()) or 'none found in ' + str(tasks_dir())})")
    return candidate


def load_task(task: "str | Path | TaskConfig", overrides: Sequence[str] = ()) -> TaskConfig:
    """A TaskConfig from a built-in name, a YAML path or a TaskConfig (returned as is)."""
    if isinstance(task, TaskConfig):
        return task
    path = resolve_task_path(str(task))
    try:
        cfg = load_config(TaskConfig, path, overrides)
    except ConfigError as err:
        raise TaskError(str(err)) from None
    if cfg.base_dir is None:
        cfg.base_dir = str(path.resolve().parent)
    return cfg
