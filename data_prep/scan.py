"""Pass 1 (one Ray task per unit): read, normalise and hash every document.

The result is small (16 bytes and a status byte per document): enough for the driver to
remove exact duplicates across the whole corpus, drop held-out text and pick the
validation documents, without anyone holding the text itself.

With ``spill`` set, the normalised texts are also written to the output folder, one file
per future chunk (``.prep/text/``), so that pass 2 tokenizes exactly the text that was
hashed without reading and normalising the sources a second time; each file holds one
chunk's documents (memory stays bounded by ``docs_per_shard``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from data_prep.errors import PrepError
from data_prep.readers import read_unit
from data_prep.sources import SKIP_HINT, ReadOptions, Unit

SPILL_DIR = ".prep/text"
DIGEST_BYTES = 16  # of sha256(normalised text): collisions are out of reach at 2^64 docs

# Status of a document after pass 1 (and after dedup on the driver); the names are the
# manifest's `dropped` keys.
OK, HOLDOUT, EMPTY, DUPLICATE = 0, 1, 2, 3
BAD_REASONS = ("invalid_utf8", "bad_json", "missing_text_field", "empty_file",
               "unreadable_file", "too_long")
STATUS_NAMES = ("ok", "holdout", "empty", "duplicate") + BAD_REASONS
STATUS_CODE = {name: i for i, name in enumerate(STATUS_NAMES)}


@dataclass
class Holdout:
    digests: frozenset = frozenset()
    """sha256 digests (32 bytes) of held-out normalised texts: ``doc_hash`` as bytes."""
    ids: frozenset = frozenset()

    def __bool__(self) -> bool:
        return bool(self.digests or self.ids)


@dataclass
class UnitScan:
    digests: np.ndarray
    """(n_items, DIGEST_BYTES) uint8; zeros where status != OK."""
    status: np.ndarray
    """(n_items,) uint8 codes of STATUS_NAMES."""
    chars: np.ndarray = None
    """(n_items,) normalised length in characters: the work a document will take."""
    resume_points: dict = field(default_factory=dict)
    """item index -> (byte offset, line number before it), every `docs_per_shard` items."""
    first_errors: dict = field(default_factory=dict)
    """reason -> first message (logged when on_error=skip)."""
    cpu_seconds: float = 0.0

    @property
    def n_items(self) -> int:
        return len(self.status)


def load_holdout(path: Optional[str]) -> Holdout:
    """Lines of 64 hex digits are doc hashes, other lines document ids; `#` comments."""
    if not path:
        return Holdout()
    import fsspec

    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
    except (OSError, UnicodeDecodeError) as err:
        raise PrepError(f"prep.holdout: cannot read {path} ({err}); give a text file with "
                        f"one doc hash or document id per line") from None
    entries = [ln for ln in lines if ln and not ln.startswith("#")]
    hashes = {e.lower() for e in entries
              if len(e) == 64 and all(c in "0123456789abcdefABCDEF" for c in e)}
    return Holdout(frozenset(bytes.fromhex(h) for h in hashes),
                   frozenset(e for e in entries if e.lower() not in hashes))


def spill_name(unit: Unit, start: int) -> str:
    """The spill file of the chunk of ``unit`` that starts at item ``start``."""
    key = hashlib.sha256(json.dumps([unit.kind, unit.location]).encode()).hexdigest()[:16]
    return f"{SPILL_DIR}/{key}-{start:012d}.bin"


def spill_bytes(texts: list[Optional[str]]) -> bytes:
    """[item count (int64)] [per item: length in characters, -1 for none (int64)]
    [the texts, concatenated, UTF-8]."""
    lengths = np.asarray([-1 if t is None else len(t) for t in texts], dtype="<i8")
    body = "".join(t for t in texts if t is not None).encode("utf-8")
    return np.int64(len(texts)).astype("<i8").tobytes() + lengths.tobytes() + body


def read_spill(blob: bytes) -> list[Optional[str]]:
    """The inverse of :func:`spill_bytes`."""
    n = int(np.frombuffer(blob[:8], dtype="<i8")[0])
    lengths = np.frombuffer(blob[8:8 + 8 * n], dtype="<i8").tolist()
    text = blob[8 + 8 * n:].decode("utf-8")
    texts, pos = [], 0
    for length in lengths:
        if length < 0:
            texts.append(None)
        else:
            texts.append(text[pos:pos + length])
            pos += length
    if pos != len(text):
        raise ValueError(f"spill holds {len(text)} characters, its lengths add up to {pos}")
    return texts


def scan_unit(unit: Unit, opts: ReadOptions, holdout: Holdout, docs_per_shard: int,
              on_error: str, spill: Optional[str] = None) -> UnitScan:
    """``spill``: output folder URL to write the normalised texts to (see module doc)."""
    from distill_common.textnorm import normalize_text

    cpu_started = time.process_time()
    digests: list[bytes] = []
    status = bytearray()
    chars: list[int] = []
    resume, first_errors = {}, {}
    zero = bytes(DIGEST_BYTES)
    out = texts = None
    if spill is not None:
        from data_prep.shards import Output

        out, texts = Output(spill), []
    for i, item in enumerate(read_unit(unit, opts)):
        if i and i % docs_per_shard == 0:
            if item.offset is not None:
                resume[i] = (item.offset, item.line - 1)
            if out is not None:
                out.write_bytes(spill_name(unit, i - docs_per_shard), spill_bytes(texts))
                texts = []
        if item.reason is not None:
            if on_error == "raise":
                raise PrepError(item.message)
            if item.reason == "unreadable_file":
                # What was read before may be garbage from a corrupt stream: the file is
                # skipped whole, as one item (spill files already written are never read).
                digests, status, chars, resume, out, texts = [], bytearray(), [], {}, None, None
                first_errors.clear()
            # kept for the log and the manifest, where the run already skips
            first_errors.setdefault(item.reason, item.message.removesuffix(f", {SKIP_HINT}"))
            digests.append(zero)
            status.append(STATUS_CODE[item.reason])
            chars.append(0)
            if texts is not None:
                texts.append(None)
            continue
        text = normalize_text(item.text)
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if not text:
            code = EMPTY
        elif item.id in holdout.ids or digest in holdout.digests:
            code = HOLDOUT
        else:
            code = OK
        digests.append(digest[:DIGEST_BYTES] if code == OK else zero)
        status.append(code)
        chars.append(len(text))
        if texts is not None:
            texts.append(text if code == OK else None)
    if texts:
        out.write_bytes(spill_name(unit, len(status) - len(texts)), spill_bytes(texts))
    array = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, DIGEST_BYTES)
    return UnitScan(array.copy(), np.frombuffer(bytes(status), dtype=np.uint8).copy(),
                    np.asarray(chars, dtype=np.int64), resume, first_errors,
                    time.process_time() - cpu_started)
