"""Reading a unit (see ``sources``): one ``Item`` per document, in a fixed order.

Bad input comes back as items too (with a ``reason`` and a message naming the file, the
line and the fix), so that item ``i`` of a unit is the same document in every pass and
on every worker; whether a bad item stops the run is the caller's choice (``on_error``).
A file that cannot be read to its end gives one ``unreadable_file`` item where it
stopped, and nothing after it. Memory stays bounded whatever the input: no line or
document longer than ``max_line_bytes`` is held.
"""

from __future__ import annotations

import itertools
import json
from typing import Callable, Iterator, NamedTuple, Optional

from data_prep.errors import PrepError
from data_prep.lines import Line, UnreadableError, io_errors, is_compressed, read_lines, unreadable
from data_prep.sources import SKIP_HINT, ReadOptions, Unit
from distill_common.urls import redact_text


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


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "a boolean", type(None): "null"}
TOO_LONG_FIX = ("check that it is a text file (a binary file has no line ends), split the "
                "document, or raise prep.max_line_bytes")


def _bad(where: str, reason: str, what: str, fix: str, **kw) -> Item:
    return Item(id=where, text=None, where=where, reason=reason,
                message=redact_text(f"{where}: {what}; fix: {fix}, {SKIP_HINT}"), **kw)


def _too_long(where: str, what: str, size: int, opts: ReadOptions, **kw) -> Item:
    return _bad(where, "too_long", f"{what} is over prep.max_line_bytes "
                f"({opts.max_line_bytes:,} bytes; {size:,} read)", TOO_LONG_FIX, **kw)


def _empty_file(unit: Unit) -> Item:
    return _bad(f"{unit.label}:0", "empty_file", "the file holds no document (it is empty "
                "or only whitespace)", "remove it from prep.sources or fill it")


def _or_empty(unit: Unit, items: Iterator[Item], resume) -> Iterator[Item]:
    """``items``, or one ``empty_file`` item when a file read from its start has none."""
    any_item = False
    for item in items:
        any_item = True
        yield item
    if not any_item and resume is None:
        yield _empty_file(unit)


def _decode(unit: Unit, line: Line, opts: ReadOptions) -> tuple[Optional[str], Optional[Item]]:
    where = f"{unit.label}:{line.number}"
    if line.raw is None:
        return None, _too_long(where, "the line", line.size, opts, offset=line.offset,
                               line=line.number)
    try:
        text = line.raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, _bad(where, "invalid_utf8", f"invalid UTF-8 at byte {err.start} of the "
                          f"line", "re-encode the file as UTF-8 (e.g. `iconv -f cp1252 -t "
                          "utf-8`)", offset=line.offset, line=line.number)
    if line.offset == 0 and text.startswith("\ufeff"):
        text = text[1:]
    return text, None


# ---------------------------------------------------------------- text

def _line_docs(unit: Unit, opts: ReadOptions, lines: Iterator[Line],
               to_item: Callable) -> Iterator[Item]:
    """A document per non-blank line (text or JSONL), made by ``to_item``."""
    for line in lines:
        text, bad = _decode(unit, line, opts)
        if bad:
            yield bad
        elif text.strip():
            yield to_item(unit, opts, text, line)


def _text_item(unit: Unit, opts: ReadOptions, text: str, line: Line) -> Item:
    where = f"{unit.label}:{line.number}"
    return Item(where, text, where, offset=line.offset, line=line.number)


def _block_docs(unit: Unit, opts: ReadOptions, lines: Iterator[Line]) -> Iterator[Item]:
    """A document is a block of non-blank lines; a bad line spoils its whole block."""
    block: list[str] = []
    size, start, block_bad = 0, (0, 0), None
    for line in lines:
        text, bad = _decode(unit, line, opts)
        if bad is None and not text.strip():
            if block or block_bad:
                yield _block_item(unit, block, start, block_bad)
            block, size, block_bad = [], 0, None
            continue
        if not block and block_bad is None:
            start = (line.offset, line.number)
        size += line.size
        if bad is None and size > opts.max_line_bytes:
            bad = _too_long(f"{unit.label}:{start[1]}", "the document (a block of lines "
                            "from here)", size, opts)
        if bad is not None:
            block_bad, block = block_bad or bad, []  # dropped whole: keep none of it
        elif block_bad is None:
            block.append(text)
    if block or block_bad:
        yield _block_item(unit, block, start, block_bad)


def _block_item(unit: Unit, lines: list[str], start: tuple[int, int], bad: Optional[Item]) -> Item:
    offset, line_no = start
    if bad is not None:  # resume at the block start
        return Item(bad.id, None, bad.where, bad.reason, bad.message, offset, line_no)
    where = f"{unit.label}:{line_no}"
    return Item(where, "".join(lines), where, offset=offset, line=line_no)


# ---------------------------------------------------------------- JSONL

def _field_problem(record, field: str) -> Optional[tuple[str, str]]:
    """(what is wrong, fix) when ``record`` has no string ``field``."""
    if not isinstance(record, dict):
        return (f"the line is {_JSON_TYPES.get(type(record), 'a value')}, not a JSON object",
                "write one JSON object per line")
    if field not in record:
        keys = ", ".join(list(record)[:10]) or "none"
        return (f"no field {field!r} (fields: {keys})",
                "set prep.text_field to the field that holds the text")
    if not isinstance(record[field], str):
        return (f"field {field!r} is {_JSON_TYPES.get(type(record[field]), 'a value')}, "
                f"not a string", "store the text as a JSON string, or set prep.text_field")
    return None


def _jsonl_item(unit: Unit, opts: ReadOptions, text: str, line: Line) -> Item:
    where = f"{unit.label}:{line.number}"
    kw = dict(offset=line.offset, line=line.number)
    try:
        record = json.loads(text)
    except RecursionError:
        return _bad(where, "bad_json", "JSON nested too deeply to parse",
                    "write one flat JSON object per line", **kw)
    except json.JSONDecodeError as err:
        return _bad(where, "bad_json", f"not valid JSON ({err.msg} at column {err.colno})",
                    "write one JSON object per line", **kw)
    except ValueError as err:  # valid syntax Python refuses: an int of > 4300 digits
        return _bad(where, "bad_json", f"unreadable JSON ({str(err).split(':')[0]})",
                    "write one JSON object per line", **kw)
    problem = _field_problem(record, opts.text_field)
    if problem:
        return _bad(where, "missing_text_field", *problem, **kw)
    value = record[opts.text_field]
    if "\\u" in text and not value.isascii():
        try:  # `\ud800` alone: a half UTF-16 pair, a str that is not text
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return _bad(where, "invalid_utf8", f"field {opts.text_field!r} holds an unpaired "
                        f"surrogate ({value[err.start]!a}), not text",
                        "fix the program that wrote the file", **kw)
    doc_id = record.get(opts.id_field) if opts.id_field else None
    return Item(str(doc_id) if doc_id is not None else where, value, where, **kw)


# ---------------------------------------------------------------- Parquet and `datasets`

def _row_item(unit: Unit, opts: ReadOptions, row: int, text, doc_id) -> Item:
    where = f"{unit.label}:row {row}"
    if not isinstance(text, str):
        return _bad(where, "missing_text_field", f"{opts.text_field!r} is "
                    f"{type(text).__name__}, not text", "fill the text column or drop the row",
                    line=row)
    if len(text) > opts.max_line_bytes // 4 and len(text.encode()) > opts.max_line_bytes:
        return _too_long(where, "the text", len(text.encode()), opts, line=row)
    return Item(str(doc_id) if doc_id is not None else where, text, where, line=row)


def _read_parquet(unit: Unit, opts: ReadOptions, start: int) -> Iterator[Item]:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(unit.location, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if opts.text_field not in names:
            yield _bad(f"{unit.label}:0", "missing_text_field",
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


def _read_hf_disk(unit: Unit, opts: ReadOptions, start: int) -> Iterator[Item]:
    import datasets

    try:
        loaded = datasets.load_from_disk(unit.location)
    except Exception as err:  # datasets raises FileNotFoundError and its own errors
        yield _bad(f"{unit.label}:0", "unreadable_file",
                   f"not a dataset saved with save_to_disk ({err})", "check the folder")
        return
    parts = ([(n, loaded[n]) for n in sorted(loaded)]
             if isinstance(loaded, datasets.DatasetDict) else [("", loaded)])
    row = 0
    for split, ds in parts:
        if opts.text_field not in ds.column_names:
            yield _bad(f"{unit.label}:{split or 'dataset'}", "missing_text_field",
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


# ---------------------------------------------------------------- named corpora

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


# ---------------------------------------------------------------- any unit

def _items(unit: Unit, opts: ReadOptions, start: int, resume) -> Iterator[Item]:
    if unit.kind in ("text", "jsonl"):
        seekable = resume is not None and not is_compressed(unit.location)
        lines = read_lines(unit.location, unit.label, opts.max_line_bytes,
                           resume if seekable else None)
        if unit.kind == "jsonl":
            docs = _line_docs(unit, opts, lines, _jsonl_item)
        elif opts.doc_split == "line":
            docs = _line_docs(unit, opts, lines, _text_item)
        else:
            docs = _block_docs(unit, opts, lines)
        items = _or_empty(unit, docs, resume if seekable else None)
        return itertools.islice(items, 0 if seekable else start, None)
    if unit.kind == "parquet":
        return _read_parquet(unit, opts, start)
    if unit.kind == "hf_disk":
        return _read_hf_disk(unit, opts, start)
    if unit.kind == "corpus":
        return _read_corpus(unit, start)
    raise PrepError(f"{unit.label}: unknown input kind {unit.kind!r}")


def read_unit(unit: Unit, opts: ReadOptions, start: int = 0,
              resume: Optional[tuple[int, int]] = None) -> Iterator[Item]:
    """Items of ``unit`` from item index ``start``.

    ``resume`` = (byte offset, line number before it) of item ``start`` in an uncompressed
    line-based file lets the reader seek instead of re-reading what comes before.
    """
    try:
        yield from _items(unit, opts, start, resume)
    except UnreadableError as err:
        yield _unreadable_item(err)
    except PrepError:
        raise
    except io_errors() as err:  # Parquet and `datasets` files (lines: read_lines)
        yield _unreadable_item(unreadable(unit.label, unit.location, err))


def _unreadable_item(err: UnreadableError) -> Item:
    return Item(err.where, None, err.where, "unreadable_file", f"{err}, {SKIP_HINT}")


__all__ = ["Item", "read_unit"]
