"""The table of malformed corpus inputs the prep fault tests run: each file, the error
line it must give (after its name) and what `on_error=skip` must count for it."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from dataclasses import dataclass
from typing import Callable

from conftest import sentences

MAX_LINE = 64 << 10  # the recipes' prep.max_line_bytes: the binary case stays small


def text_lines(n: int, seed: int) -> str:
    return "".join(" ".join(sentences(2, seed=seed * 1000 + i)) + "\n" for i in range(n))


def corrupt_in_the_middle(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(64) + data[mid + 64:]


def flip_byte(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)


def parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="none", use_dictionary=False)
    return buf.getvalue()


def parquet_with_a_bad_data_page() -> bytes:
    import pyarrow as pa

    data = parquet_bytes(pa.table({"text": text_lines(300, 7).splitlines()}))
    return data[:2000] + b"\xab" * 400 + data[2400:]  # inside the first data page


def parquet_with_numbers_for_text() -> bytes:
    import pyarrow as pa

    return parquet_bytes(pa.table({"text": [1, 2]}))


def jsonl(*records) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def good_json(n: int) -> dict:  # distinct documents: exact duplicates would be dropped
    return {"text": " ".join(sentences(2, seed=900 + n))}


@dataclass
class Case:
    file: str
    content: Callable[[], bytes]
    message: str
    """Regex the `error:` line must match after the file's name."""
    skipped: dict
    """What on_error=skip counts for the file: reason -> documents."""
    good: int = 0
    """Good documents in the file (kept with on_error=skip)."""


CASES = [
    Case("nested.jsonl", lambda: jsonl(good_json(1), "[" * 5000 + "]" * 5000),
         r":2: JSON nested too deeply.*fix: ", {"bad_json": 1}, good=1),
    Case("corrupt.txt.xz", lambda: corrupt_in_the_middle(lzma.compress(
        text_lines(300, 1).encode())), r"(:\d+)?: cannot read \(LZMAError.*fix: .*damaged",
         {"unreadable_file": 1}),
    Case("cut.txt.gz", lambda: gzip.compress(text_lines(300, 2).encode())[:900],
         r"(:\d+)?: cannot read \(EOFError.*fix: .*cut short", {"unreadable_file": 1}),
    Case("flipped.txt.gz", lambda: flip_byte(gzip.compress(text_lines(300, 3).encode()), 40),
         r"(:\d+)?: cannot read \(.*fix: .*damaged", {"unreadable_file": 1}),
    Case("notgzip.txt.gz", lambda: b"plain text, not gzip\n",
         r"(:\d+)?: cannot read \(BadGzipFile.*fix: ", {"unreadable_file": 1}),
    Case("corrupt.txt.bz2", lambda: flip_byte(bz2.compress(text_lines(300, 4).encode()), 60),
         r"(:\d+)?: cannot read \(OSError.*fix: ", {"unreadable_file": 1}),
    Case("badpage.parquet", parquet_with_a_bad_data_page,
         r"(:\d+)?: cannot read \(.*fix: .*damaged", {"unreadable_file": 1}),
    Case("numbers.parquet", parquet_with_numbers_for_text,
         r":row 0: 'text' is int, not text; fix: ", {"missing_text_field": 2}),
    Case("binary.txt", lambda: bytes(range(11, 256)) * (2 * MAX_LINE // 245),
         r":1: the line is over prep.max_line_bytes.*fix: check that it is a text file",
         {"too_long": 1}),
    Case("whitespace.txt", lambda: b"  \n\t\n\n   \n", r":0: the file holds no document.*"
         r"only whitespace.*fix: ", {"empty_file": 1}),
    Case("empty.jsonl", lambda: b"", r":0: the file holds no document.*fix: ",
         {"empty_file": 1}),
    Case("latin1.txt", lambda: b"the first line is fine here\ncaf\xe9 au lait\n",
         r":2: invalid UTF-8.*fix: re-encode", {"invalid_utf8": 1}, good=1),
    Case("broken.jsonl", lambda: jsonl(good_json(2), '{"text": "no end'),
         r":2: not valid JSON.*fix: ", {"bad_json": 1}, good=1),
    Case("array.jsonl", lambda: jsonl([1, 2]), r":1: the line is an array, not a JSON "
         r"object; fix: ", {"missing_text_field": 1}),
    Case("nofield.jsonl", lambda: jsonl({"body": "x"}), r":1: no field 'text' \(fields: "
         r"body\); fix: set prep.text_field", {"missing_text_field": 1}),
    Case("number.jsonl", lambda: jsonl({"text": 5}), r":1: field 'text' is a number, not a "
         r"string; fix: ", {"missing_text_field": 1}),
    Case("surrogate.jsonl", lambda: jsonl('{"text": "half \\ud800 a pair"}'),
         r":1: field 'text' holds an unpaired surrogate", {"invalid_utf8": 1}),
    Case("bigint.jsonl", lambda: jsonl('{"text": "big", "n": ' + "7" * 5000 + "}"),
         r":1: unreadable JSON \(Exceeds the limit", {"bad_json": 1}),
]
