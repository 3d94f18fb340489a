"""Inputs: which units of work a recipe's `sources` name, and the documents each holds.

A *unit* is one input file, one `datasets` folder or one named corpus. Reading a unit
yields one ``Item`` per document in a fixed order, bad ones included (as items with a
``reason``), so that item ``i`` of a unit is the same document in every pass and on
every worker. Whether a bad item stops the run is the caller's choice (``on_error``).
"""

from __future__ import annotations

import glob as globlib
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional

from data_prep.errors import PrepError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
HF_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")

SKIP_HINT = "or set prep.on_error=skip to skip and count it"


@dataclass(frozen=True)
class Unit:
    kind: str
    """`corpus`, `text`, `jsonl`, `parquet` or `hf_disk`."""
    location: str
    """Corpus name, local path or fsspec URL."""
    label: str
    """How ids and messages name it (the path as found)."""


@dataclass
class Source:
    spec: str
    """The entry of `prep.sources` as written."""
    units: list[Unit]
    files: list[dict] = field(default_factory=list)
    """[{"path": str, "bytes": int}] for the manifest."""
    error: Optional[str] = None
    """Why it has no units (on_error=skip), for the manifest."""


class Item(NamedTuple):
    """One document as read (a NamedTuple, not a frozen dataclass: prep makes two of these
    per document and the frozen dataclass's __init__ was 4x slower, ~5% of a prep run)."""
    id: str
    text: Optional[str]
    """None for a bad item."""
    where: str
    """`file:line` (or `file:row N`) for messages."""
    reason: Optional[str] = None
    """Why it is bad (`invalid_utf8`, `bad_json`, ...); None when good."""
    message: Optional[str] = None
    offset: Optional[int] = None
    """Byte offset of the item in an uncompressed line-based file (resume point)."""
    line: int = 0


@dataclass(frozen=True)
class ReadOptions:
    doc_split: str = "line"
    text_field: str = "text"
    id_field: Optional[str] = "id"
    format: str = "auto"


# ---------------------------------------------------------------- resolving sources

def _is_named_corpus(spec: str) -> bool:
    from distill_common.corpora import NAMED_CORPORA

    return spec in NAMED_CORPORA


def _kind_of(path: str, fmt: str) -> Optional[str]:
    """File kind by `format`, or by extension for `auto`; None = not an input file."""
    if fmt != "auto":
        return fmt
    name = path.lower()
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _is_hidden(path: str) -> bool:
    return any(part.startswith((".", "_")) for part in path.replace("\\", "/").split("/")
               if part not in ("", ".", ".."))


def _named_source(spec: str) -> Source:
    from distill_common.assets import AssetError
    from distill_common.corpora import corpus_files

    try:
        files = [{"path": str(p), "bytes": p.stat().st_size} for p in corpus_files(spec)]
    except AssetError as err:
        raise PrepError(f"prep.sources: {err}") from None
    return Source(spec, [Unit("corpus", spec, spec)], files)


def resolve_source(spec: str, opts: ReadOptions) -> Source:
    """One `prep.sources` entry -> its units, in sorted (deterministic) order."""
    import fsspec

    if _is_named_corpus(spec):
        return _named_source(spec)
    fs, path = fsspec.core.url_to_fs(spec)
    is_url = "://" in spec

    def location(p: str) -> str:
        return fs.unstrip_protocol(p) if is_url else p

    if globlib.has_magic(path):
        matches = sorted(p for p in fs.glob(path)  # like a shell: no hidden files
                         if not p.rsplit("/", 1)[-1].startswith(".") and fs.isfile(p))
        if not matches:
            raise PrepError(f"prep.sources: {spec!r} matches no file; check the pattern")
        candidates, explicit = matches, True
    elif not fs.exists(path):
        raise PrepError(f"prep.sources: {spec!r} does not exist; give a named corpus "
                        f"(wiki_summaries, bbc_news, wordnet_glosses, gcide), a file, a "
                        f"folder, a glob or an fsspec URL")
    elif fs.isdir(path):
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
        if names & set(HF_DISK_MARKERS):
            return Source(spec, [Unit("hf_disk", location(path), spec)],
                          [{"path": location(path), "bytes": fs.du(path)}])
        found = sorted(fs.find(path))
        candidates = [p for p in found if not _is_hidden(os.path.relpath(p, path))]
        explicit = False
    else:
        candidates, explicit = [path], True
    units, files = [], []
    for p in candidates:
        kind = _kind_of(p, opts.format) or ("text" if explicit else None)
        if kind is None:
            continue  # a README or index file inside a corpus folder
        units.append(Unit(kind, location(p), location(p)))
        files.append({"path": location(p), "bytes": fs.size(p)})
    if not units:
        raise PrepError(f"prep.sources: {spec!r} holds no input file (.txt, .jsonl, "
                        f".parquet, optionally compressed); set prep.format to read other "
                        f"extensions")
    return Source(spec, units, files)


def resolve_sources(specs: list[str], opts: ReadOptions, on_error: str = "raise") -> list[Source]:
    """All sources; with ``on_error="skip"`` one that cannot be resolved (missing path,
    empty glob) becomes a Source without units and its ``error`` is kept."""
    sources = []
    for spec in specs:
        try:
            sources.append(resolve_source(spec, opts))
        except PrepError as err:
            if on_error == "raise":
                raise
            sources.append(Source(spec, [], error=str(err)))
    return sources


# ---------------------------------------------------------------- reading units

def _bad(unit: Unit, where: str, reason: str, what: str, fix: str, **kw) -> Item:
    return Item(id=where, text=None, where=where, reason=reason,
                message=f"{where}: {what}; fix: {fix}, {SKIP_HINT}", **kw)


def _is_compressed(location: str) -> bool:
    return location.lower().endswith(COMPRESSED_SUFFIXES)


def _lines(unit: Unit, resume: Optional[tuple[int, int]]) -> Iterator[tuple[int, int, bytes]]:
    """(byte offset, 1-based line number, raw line) of a file, from a resume point."""
    import fsspec

    offset, line_no = resume if resume else (0, 0)
    with fsspec.open(unit.location, "rb", compression="infer") as f:
        if offset:
            f.seek(offset)
        for raw in f:
            line_no += 1
            yield offset, line_no, raw
            offset += len(raw)


def _decode(unit: Unit, raw: bytes, line_no: int, offset: int) -> tuple[Optional[str], Optional[Item]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        where = f"{unit.label}:{line_no}"
        return None, _bad(unit, where, "invalid_utf8",
                          f"invalid UTF-8 at byte {err.start} of the line",
                          "re-encode the file as UTF-8 (e.g. `iconv -f cp1252 -t utf-8`)",
                          offset=offset, line=line_no)
    if offset == 0 and text.startswith("\ufeff"):
        text = text[1:]
    return text, None


def _read_text(unit: Unit, opts: ReadOptions, resume) -> Iterator[Item]:
    any_line = False
    if opts.doc_split == "line":
        for offset, line_no, raw in _lines(unit, resume):
            any_line = True
            text, bad = _decode(unit, raw, line_no, offset)
            if bad:
                yield bad
            elif text.strip():
                where = f"{unit.label}:{line_no}"
                yield Item(where, text, where, offset=offset, line=line_no)
    else:  # blank_line: a document is a block of non-blank lines
        block: list[str] = []
        start = (0, 0)
        block_bad = None
        for offset, line_no, raw in _lines(unit, resume):
            any_line = True
            text, bad = _decode(unit, raw, line_no, offset)
            if bad is None and not text.strip():
                if block or block_bad:
                    yield _block_item(unit, block, start, block_bad)
                block, block_bad = [], None
                continue
            if not block and block_bad is None:
                start = (offset, line_no)
            if bad is not None:
                block_bad = block_bad or bad
            else:
                block.append(text)
        if block or block_bad:
            yield _block_item(unit, block, start, block_bad)
    if not any_line and resume is None:
        yield _empty_file(unit)


def _block_item(unit: Unit, lines: list[str], start: tuple[int, int], bad: Optional[Item]) -> Item:
    offset, line_no = start
    if bad is not None:  # a bad line spoils its whole block; resume at the block start
        return Item(bad.id, None, bad.where, bad.reason, bad.message, offset, line_no)
    where = f"{unit.label}:{line_no}"
    return Item(where, "".join(lines), where, offset=offset, line=line_no)


def _empty_file(unit: Unit) -> Item:
    return _bad(unit, f"{unit.label}:0", "empty_file", "the file is empty",
                "remove it from prep.sources or fill it")


def _read_jsonl(unit: Unit, opts: ReadOptions, resume) -> Iterator[Item]:
    any_line = False
    for offset, line_no, raw in _lines(unit, resume):
        any_line = True
        text, bad = _decode(unit, raw, line_no, offset)
        if bad:
            yield bad
            continue
        if not text.strip():
            continue
        where = f"{unit.label}:{line_no}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            yield _bad(unit, where, "bad_json", f"not valid JSON ({err.msg} at column "
                       f"{err.colno})", "write one JSON object per line",
                       offset=offset, line=line_no)
            continue
        value = record.get(opts.text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            yield _bad(unit, where, "missing_text_field",
                       f"no string field {opts.text_field!r}",
                       "set prep.text_field to the field that holds the text",
                       offset=offset, line=line_no)
            continue
        doc_id = record.get(opts.id_field) if opts.id_field else None
        yield Item(str(doc_id) if doc_id is not None else where, value, where,
                   offset=offset, line=line_no)
    if not any_line and resume is None:
        yield _empty_file(unit)


def _read_parquet(unit: Unit, opts: ReadOptions, start: int) -> Iterator[Item]:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(unit.location, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as err:  # pyarrow raises several types for a non-Parquet file
            yield _bad(unit, f"{unit.label}:0", "unreadable_file",
                       f"not a readable Parquet file ({err})", "check the file")
            return
        names = pf.schema_arrow.names
        if opts.text_field not in names:
            yield _bad(unit, f"{unit.label}:0", "missing_text_field",
                       f"no column {opts.text_field!r} (columns: {', '.join(names)})",
                       "set prep.text_field to the column that holds the text")
            return
        if pf.metadata.num_rows == 0:
            yield _empty_file(unit)
            return
        columns = [opts.text_field] + ([opts.id_field] if opts.id_field in names else [])
        # Skip whole row groups before `start`, then rows.
        row, first = 0, 0
        while first < pf.num_row_groups and \
                row + pf.metadata.row_group(first).num_rows <= start:
            row += pf.metadata.row_group(first).num_rows
            first += 1
        groups = list(range(first, pf.num_row_groups))
        if not groups:
            return
        for batch in pf.iter_batches(columns=columns, row_groups=groups, batch_size=4096):
            texts = batch.column(opts.text_field).to_pylist()
            ids = batch.column(opts.id_field).to_pylist() if len(columns) > 1 else None
            for i, text in enumerate(texts):
                if row >= start:
                    yield _row_item(unit, opts, row, text, ids[i] if ids else None)
                row += 1


def _row_item(unit: Unit, opts: ReadOptions, row: int, text, doc_id) -> Item:
    where = f"{unit.label}:row {row}"
    if not isinstance(text, str):
        return _bad(unit, where, "missing_text_field", f"{opts.text_field!r} is "
                    f"{type(text).__name__}, not text",
                    "fill the text column or drop the row")
    return Item(str(doc_id) if doc_id is not None else where, text, where, line=row)


def _read_hf_disk(unit: Unit, opts: ReadOptions, start: int) -> Iterator[Item]:
    import datasets

    try:
        loaded = datasets.load_from_disk(unit.location)
    except Exception as err:  # datasets raises FileNotFoundError and its own errors
        yield _bad(unit, f"{unit.label}:0", "unreadable_file",
                   f"not a dataset saved with save_to_disk ({err})", "check the folder")
        return
    parts = ([(n, loaded[n]) for n in sorted(loaded)]
             if isinstance(loaded, datasets.DatasetDict) else [("", loaded)])
    row = 0
    for split, ds in parts:
        if opts.text_field not in ds.column_names:
            yield _bad(unit, f"{unit.label}:{split or 'dataset'}", "missing_text_field",
                       f"no column {opts.text_field!r} (columns: "
                       f"{', '.join(ds.column_names)})",
                       "set prep.text_field to the column that holds the text")
            row += 1
            continue
        has_id = bool(opts.id_field) and opts.id_field in ds.column_names
        for lo in range(0, len(ds), 1024):
            if row + min(1024, len(ds) - lo) <= start:
                row += min(1024, len(ds) - lo)
                continue
            batch = ds[lo:lo + 1024]
            ids = batch[opts.id_field] if has_id else None
            for i, text in enumerate(batch[opts.text_field]):
                if row >= start:
                    yield _row_item(unit, opts, row, text, ids[i] if ids else None)
                row += 1


# Named corpora can only be read from their start. Chunks reach a worker in increasing
# order, so each worker keeps its place in the corpus it read last and goes on from there
# instead of re-reading from the start for every chunk (quadratic on large corpora).
_CORPUS_CURSOR: dict = {}


def _read_corpus(unit: Unit, start: int) -> Iterator[Item]:
    from distill_common.corpora import iter_documents

    pos, docs = _CORPUS_CURSOR.pop(unit.location, (None, None))
    if docs is None or pos > start:
        pos, docs = 0, iter_documents(unit.location)
    for _ in itertools.islice(docs, start - pos):
        pass
    i = start
    try:
        for doc in docs:
            i += 1  # counted before the yield: a consumer may stop right after it
            yield Item(doc.id, doc.text, f"{unit.label}#{i - 1}", line=i - 1)
    finally:
        _CORPUS_CURSOR.clear()
        _CORPUS_CURSOR[unit.location] = (i, docs)


def read_unit(unit: Unit, opts: ReadOptions, start: int = 0,
              resume: Optional[tuple[int, int]] = None) -> Iterator[Item]:
    """Items of ``unit`` from item index ``start``.

    ``resume`` = (byte offset, line number before it) of item ``start`` in an uncompressed
    line-based file lets the reader seek instead of re-reading what comes before.
    """
    try:
        if unit.kind in ("text", "jsonl"):
            seekable = resume is not None and not _is_compressed(unit.location)
            reader = _read_text if unit.kind == "text" else _read_jsonl
            items = reader(unit, opts, resume if seekable else None)
            skip = 0 if seekable else start
            yield from itertools.islice(items, skip, None)
        elif unit.kind == "parquet":
            yield from _read_parquet(unit, opts, start)
        elif unit.kind == "hf_disk":
            yield from _read_hf_disk(unit, opts, start)
        elif unit.kind == "corpus":
            yield from _read_corpus(unit, start)
        else:
            raise PrepError(f"{unit.label}: unknown input kind {unit.kind!r}")
    except (OSError, EOFError) as err:  # unreadable, truncated archive, permission
        raise PrepError(f"{unit.label}: cannot read ({err}); check the path and its "
                        f"permissions") from None
