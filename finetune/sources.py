"""Reading a task's source into tables of rows: a named corpus, files (csv, tsv, jsonl,
parquet), a `datasets` save_to_disk folder, or a Hugging Face Hub dataset.

Hub datasets (``source.hub: org/name[@revision]``, ``source.config``) are read the way
`datasets` users expect: ``datasets.load_dataset`` with its cache (``HF_DATASETS_CACHE``,
else ``HF_HOME/datasets``), so a dataset loaded once on a machine with network is found
again offline (``HF_DATASETS_OFFLINE=1``). Offline, a dataset repository downloaded into
the Hub cache (``hf download --repo-type dataset org/name``: ``HF_HUB_CACHE``, else
``HF_HOME/hub``) is read from there too. The environment is read at call time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from finetune.tasks import TaskConfig, TaskError

SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
                  ".parquet": "parquet"}
SPLIT_NAMES = ("train", "validation", "test")
SPLIT_ALIASES = {"validation": ("validation", "valid", "dev", "val"), "test": ("test",),
                 "train": ("train",)}


@dataclass
class Table:
    """Rows of one split as read from its source, before column mapping."""
    where: str
    columns: list[str]
    rows: list[dict]


def read_source(task: TaskConfig) -> dict[str, Table]:
    """{"all": table} for a source to split, else {"train": ..., "validation": ...}."""
    src = task.source
    if src.corpus:
        return {"all": _read_corpus(task)}
    if src.hub:
        return _dataset_tables(_load_hub_dataset(task), f"hub dataset {src.hub}",
                               src.splits)
    if src.path:
        path = _resolve(task, src.path)
        fmt = _format_of(task, path)
        if fmt == "datasets":
            return _read_datasets_folder(path, src.splits)
        return {"all": _read_file(path, fmt)}
    tables = {}
    for split in SPLIT_NAMES:
        spec = getattr(src, split)
        if spec:
            path = _resolve(task, spec)
            fmt = _format_of(task, path)
            if fmt == "datasets":
                sub = _read_datasets_folder(path, None)
                tables[split] = sub.get(split, sub.get("train", sub.get("all")))
            else:
                tables[split] = _read_file(path, fmt)
    return tables


def _read_corpus(task: TaskConfig) -> Table:
    from distill_common.corpora import NAMED_CORPORA, iter_documents

    name = task.source.corpus
    if name not in NAMED_CORPORA:
        raise TaskError(f"task {task.name}: unknown corpus {name!r} in source.corpus; "
                        f"known: {', '.join(NAMED_CORPORA)}")
    rows = [{"id": d.id, "text": d.text, "label": d.label} for d in iter_documents(name)]
    return Table(f"corpus {name}", ["id", "text", "label"], rows)


# ------------------------------------------------------------------ files

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


def _read_file(path: Path, fmt: str) -> Table:
    import pandas as pd

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
    rows = [{k: _plain(v) for k, v in r.items()} for r in df.to_dict("records")]
    return Table(str(path), [str(c) for c in df.columns], rows)


# ------------------------------------------------------------------ `datasets` objects

def _read_datasets_folder(path: Path, splits: Optional[Mapping[str, str]]) -> dict[str, Table]:
    """A `save_to_disk` folder: one Dataset (split later) or a DatasetDict."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise TaskError(f"{path}: not a `datasets` save_to_disk folder: {err}") from None
    return _dataset_tables(loaded, str(path), splits)


def _dataset_tables(loaded, where: str, splits: Optional[Mapping[str, str]]
                    ) -> dict[str, Table]:
    """A Dataset -> {"all"}; a DatasetDict -> its train / validation / test, named by
    ``splits`` (our split -> theirs) or found by the usual names (dev, valid...)."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return {"all": _dataset_table(loaded, where)}
    tables = {}
    for split, names in SPLIT_ALIASES.items():
        if splits:
            wanted = splits.get(split)
            if wanted is not None and wanted not in loaded:
                raise TaskError(f"{where}: no split {wanted!r} (source.splits.{split}); it "
                                f"has {list(loaded.keys())}")
            found = wanted
        else:
            found = next((n for n in names if n in loaded), None)
        if found is not None:
            tables[split] = _dataset_table(loaded[found], f"{where}[{found}]")
    if "train" not in tables:
        raise TaskError(f"{where}: no train split (it has {list(loaded.keys())}); name one "
                        f"with source.splits.train")
    return tables


def _dataset_table(ds, where: str) -> Table:
    """Rows with class ids turned into class names (a ClassLabel column, or a list of
    them as token tasks' tags are); an id of -1 (no label) becomes None."""
    import datasets

    rows = ds.to_list()
    for column, feature in ds.features.items():
        inner = getattr(feature, "feature", None)
        if isinstance(feature, datasets.ClassLabel):
            for row in rows:
                row[column] = _class_name(feature, row[column])
        elif isinstance(inner, datasets.ClassLabel):
            for row in rows:
                if row[column] is not None:
                    row[column] = [_class_name(inner, v) for v in row[column]]
    return Table(where, list(ds.column_names), rows)


def _class_name(feature, value):
    return None if value is None or value < 0 else feature.int2str(value)


def _load_hub_dataset(task: TaskConfig):
    """``datasets.load_dataset`` of ``source.hub`` through its cache; offline, a
    repository downloaded into the Hub cache is loaded from there."""
    import datasets

    from distill_common.hub import hub_cache_dir, parse_hub_spec

    src = task.source
    spec = parse_hub_spec(src.hub)
    if spec is None:
        raise TaskError(f"task {task.name}: source.hub {src.hub!r} is not a Hub dataset id "
                        f"(org/name or name, optionally @revision)")
    try:
        return datasets.load_dataset(spec.repo_id, src.config, revision=spec.revision,
                                     cache_dir=str(datasets_cache_dir()))
    except (ConnectionError, FileNotFoundError) as err:  # offline and not prepared
        first = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
    except (ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise TaskError(f"task {task.name}: source.hub {spec}: {err}") from None
    snapshot = _hub_snapshot(spec, hub_cache_dir())
    if snapshot is None:
        raise TaskError(
            f"task {task.name}: Hub dataset {str(spec)!r} is neither in the `datasets` cache "
            f"{datasets_cache_dir()} nor in the Hub cache {hub_cache_dir()} ({first}); on a "
            f"machine with network run `datasets.load_dataset({spec.repo_id!r}"
            f"{', ' + repr(src.config) if src.config else ''})` or `hf download --repo-type "
            f"dataset {spec.repo_id}` with the same HF_HOME, or point HF_HOME at a cache "
            f"that has it")
    try:
        return datasets.load_dataset(str(snapshot), src.config,
                                     cache_dir=str(datasets_cache_dir()))
    except (ValueError, FileNotFoundError) as err:
        raise TaskError(f"task {task.name}: Hub dataset {spec} in {snapshot}: {err}") from None


def _hub_snapshot(spec, cache: Path) -> Optional[Path]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec.repo_id, repo_type="dataset",
                                      revision=spec.revision, cache_dir=cache,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None


def datasets_cache_dir() -> Path:
    """The cache `datasets` uses: ``HF_DATASETS_CACHE``, else ``HF_HOME/datasets``, else
    ``~/.cache/huggingface/datasets``."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "datasets"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "huggingface" / "datasets"
