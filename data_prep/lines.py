"""Lines of an input file (a local path or fsspec URL, maybe compressed), in bounded memory.

A line longer than the cap is not read into memory: it comes back as its size only (a
binary file without newlines is one such line). Every failure of the file, its storage
or its decompressor (a truncated .gz, a corrupt .xz block, an expired URL) comes back as
one :class:`UnreadableError` that names the file and the line it got to.
"""

from __future__ import annotations

import io
import lzma
import sys
import zlib
from typing import Iterator, NamedTuple, Optional

from distill_common.urls import redact_text

COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
# Suffixes fsspec decompresses only when an extra package is installed (it registers the
# codec on import); without it the compressed bytes would be read as text.
OPTIONAL_CODECS = {".zst": "zstandard", ".lz4": "lz4"}
DRAIN_BYTES = 1 << 20


class UnreadableError(Exception):
    """The file cannot be read (to its end); the message names it and the fix, ``where``
    is `file` or `file:line` (the line it stopped at)."""

    def __init__(self, message: str, where: str):
        super().__init__(message)
        self.where = where


class Line(NamedTuple):
    offset: int
    """Byte offset of the line in the (uncompressed) file."""
    number: int
    """1-based."""
    raw: Optional[bytes]
    """The line with its newline; None when it is longer than the cap."""
    size: int
    """Bytes of the line, newline included."""


def is_compressed(location: str) -> bool:
    return location.lower().endswith(COMPRESSED_SUFFIXES)


def missing_codec(location: str) -> Optional[str]:
    """The package needed to decompress ``location`` when it is not installed, else None."""
    from fsspec.utils import infer_compression

    for suffix, package in OPTIONAL_CODECS.items():
        if location.lower().endswith(suffix) and infer_compression(location) is None:
            return package
    return None


def io_errors() -> tuple:
    """What reading a file can raise, beyond our code's own errors: the OS, fsspec, the
    decompressors (lzma, zlib, zstandard; lz4 raises RuntimeError), HTTP (aiohttp),
    Parquet (pyarrow)."""
    errors = [OSError, EOFError, ValueError, RuntimeError, lzma.LZMAError, zlib.error]
    for module, name in (("zstandard", "ZstdError"), ("aiohttp", "ClientError"),
                         ("pyarrow", "ArrowException")):
        found = getattr(sys.modules.get(module), name, None)  # loaded only if it was used
        if isinstance(found, type):
            errors.append(found)
    return tuple(errors)


def unreadable(where: str, location: str, err: BaseException) -> UnreadableError:
    detail = redact_text(str(err).splitlines()[0] if str(err) else "")[:300]
    kind = type(err).__name__
    if kind == "error":  # zlib.error
        kind = f"{type(err).__module__}.error"
    if is_compressed(location) or location.lower().endswith((".parquet", ".pq")):
        fix = "the file is damaged or cut short: fetch or write it again"
    else:
        fix = "check the file, its path and its permissions"
    return UnreadableError(f"{where}: cannot read ({kind}: {detail}); fix: {fix}", where)


class _RawReader(io.RawIOBase):
    """A file object with ``read(n)`` as a raw stream, so that io.BufferedReader gives it
    a ``readline(limit)`` (fsspec's remote files have only ``readline()``, unbounded)."""

    def __init__(self, f):
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.f.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def _with_bounded_readline(f):
    from fsspec.spec import AbstractBufferedFile

    return io.BufferedReader(_RawReader(f), 1 << 20) if isinstance(f, AbstractBufferedFile) else f


def _drain_line(f, size: int) -> int:
    """Read past the rest of a too-long line without keeping it; its total size."""
    while True:
        chunk = f.readline(DRAIN_BYTES)
        size += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return size


def read_lines(location: str, label: str, max_bytes: int,
               resume: Optional[tuple[int, int]] = None) -> Iterator[Line]:
    """The lines of ``location`` from ``resume`` = (byte offset, line number before it);
    one longer than ``max_bytes`` (newline excluded) comes with ``raw`` None."""
    import fsspec

    offset, number = resume if resume else (0, 0)
    errors = io_errors()
    try:
        with fsspec.open(location, "rb", compression="infer") as f:
            if offset:
                f.seek(offset)
            f = _with_bounded_readline(f)
            while raw := f.readline(max_bytes + 1):
                number += 1
                if len(raw) > max_bytes and not raw.endswith(b"\n"):
                    size = _drain_line(f, len(raw))
                    yield Line(offset, number, None, size)
                else:
                    size = len(raw)
                    yield Line(offset, number, raw, size)
                offset += size
    except errors as err:
        raise unreadable(f"{label}:{number + 1}" if number else label, location,
                         err) from None


__all__ = ["COMPRESSED_SUFFIXES", "Line", "UnreadableError", "io_errors", "is_compressed",
           "missing_codec", "read_lines", "unreadable"]
