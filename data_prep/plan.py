"""Between the passes (driver): global exact dedup, the validation split, and the list of
chunks of work.

Chunks are fixed runs of ``docs_per_shard`` items of one unit, numbered in source order,
so the chunk list (and with it every shard name and byte) depends only on the data and the
config, never on how many workers run them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Optional

import numpy as np

from data_prep.scan import DIGEST_BYTES, DUPLICATE, OK, STATUS_NAMES, UnitScan
from data_prep.sources import Unit

DROP, TRAIN, VALIDATION = 0, 1, 2


@dataclass(frozen=True)
class ChunkSpec:
    index: int
    unit: Unit
    start: int
    stop: int
    resume: Optional[tuple[int, int]]
    """(byte offset, line before) of item `start`, when the reader can seek there."""
    assign: bytes
    """One byte per item: DROP, TRAIN or VALIDATION."""
    fingerprint: str
    """Of everything that decides this chunk's shard bytes (resume reuses on a match)."""
    weight: int = 0
    """Characters of its kept documents: big chunks are started first so that no worker
    is left with a straggler at the end (the order of work, never of output)."""

    @property
    def kept(self) -> int:
        return len(self.assign) - self.assign.count(DROP)


def mark_duplicates(scans: list[UnitScan]) -> None:
    """Set status DUPLICATE on every OK document whose digest appeared before, in source
    order (the first copy stays). The driver holds 16 bytes per document for this."""
    oks = [np.flatnonzero(s.status == OK) for s in scans]
    if not sum(len(o) for o in oks):
        return
    digests = np.concatenate([s.digests[o] for s, o in zip(scans, oks)])
    keys = np.ascontiguousarray(digests).view(np.dtype((np.void, DIGEST_BYTES))).ravel()
    _, first = np.unique(keys, return_index=True)  # stable: the first occurrence
    keep = np.zeros(len(keys), dtype=bool)
    keep[first] = True
    offset = 0
    for scan, ok in zip(scans, oks):
        dup = ok[~keep[offset:offset + len(ok)]]
        scan.status[dup] = DUPLICATE
        offset += len(ok)


def is_validation(digests: np.ndarray, fraction: float) -> np.ndarray:
    """(n,) bool: the first 8 digest bytes as a number in [0, 1) below ``fraction``."""
    if fraction <= 0 or not len(digests):
        return np.zeros(len(digests), dtype=bool)
    head = np.ascontiguousarray(digests[:, :8]).view(">u8").ravel()
    return head < np.uint64(min(int(fraction * 2.0 ** 64), 2 ** 64 - 1))


def assignments(scan: UnitScan, validation_fraction: float) -> np.ndarray:
    assign = np.full(scan.n_items, DROP, dtype=np.uint8)
    ok = scan.status == OK
    val = is_validation(scan.digests, validation_fraction)
    assign[ok & ~val] = TRAIN
    assign[ok & val] = VALIDATION
    return assign


def ensure_one_validation_document(scans: list[UnitScan], assigns: list[np.ndarray]) -> None:
    """With a validation fraction too small for the corpus, the hash rule can pick no
    document at all; then the kept document with the smallest hash goes to validation,
    so a split the trainer validates on always exists (when there are >= 2 documents)."""
    if any((a == VALIDATION).any() for a in assigns):
        return
    best = None  # (hash head, unit, item): the document closest to being picked by hash
    for u, (scan, assign) in enumerate(zip(scans, assigns)):
        train = np.flatnonzero(assign == TRAIN)
        if len(train):
            heads = np.ascontiguousarray(scan.digests[train, :8]).view(">u8").ravel()
            j = int(np.argmin(heads))
            if best is None or int(heads[j]) < best[0]:
                best = (int(heads[j]), u, int(train[j]))
    if best is not None and sum(int((a == TRAIN).sum()) for a in assigns) >= 2:
        assigns[best[1]][best[2]] = VALIDATION


def plan_chunks(units: list[Unit], scans: list[UnitScan], docs_per_shard: int,
                validation_fraction: float, fingerprint_base: dict) -> list[ChunkSpec]:
    base = json.dumps(fingerprint_base, sort_keys=True, default=str)
    assigns = [assignments(scan, validation_fraction) for scan in scans]
    if validation_fraction > 0:
        ensure_one_validation_document(scans, assigns)
    chunks = []
    for unit, scan, assign in zip(units, scans, assigns):
        for start in range(0, scan.n_items, docs_per_shard):
            stop = min(start + docs_per_shard, scan.n_items)
            h = hashlib.sha256(base.encode())
            h.update(json.dumps([unit.kind, unit.label, start, stop]).encode())
            h.update(assign[start:stop].tobytes())
            h.update(scan.digests[start:stop].tobytes())
            kept = assign[start:stop] != DROP
            weight = int(scan.chars[start:stop][kept].sum()) if scan.chars is not None else 0
            chunks.append(ChunkSpec(len(chunks), unit, start, stop,
                                    scan.resume_points.get(start),
                                    assign[start:stop].tobytes(), h.hexdigest(), weight))
    return chunks


def work_order(chunks: list[ChunkSpec]) -> list[ChunkSpec]:
    """Largest chunks first (no straggler at the end), except that the chunks of a named
    corpus keep their index order within the slots they get: such a corpus can only be
    read forwards, and a worker goes on from where its last chunk stopped."""
    order = sorted(chunks, key=lambda c: (-c.weight, c.index))
    for unit in {c.unit for c in order if c.unit.kind == "corpus"}:
        slots = [i for i, c in enumerate(order) if c.unit == unit]
        for i, chunk in zip(slots, sorted((order[i] for i in slots), key=lambda c: c.index)):
            order[i] = chunk
    return order


def dropped_counts(scans: list[UnitScan]) -> dict[str, int]:
    counts = np.zeros(len(STATUS_NAMES), dtype=np.int64)
    for scan in scans:
        counts += np.bincount(scan.status, minlength=len(STATUS_NAMES))
    return {name: int(c) for name, c in zip(STATUS_NAMES, counts) if name != "ok"}
