"""Between the passes: exact dedup across units, the hash-picked validation split, and
the order chunks are handed out in (pure functions on pass-1 results)."""

from __future__ import annotations

import numpy as np

from data_prep.plan import (DROP, TRAIN, VALIDATION, ensure_one_validation_document,
                            is_validation, mark_duplicates)
from data_prep.scan import DUPLICATE, OK, UnitScan


def scan_of(digest_bytes: list[int], status=None) -> UnitScan:
    digests = np.array([[b] * 16 for b in digest_bytes], dtype=np.uint8)
    status = np.array(status if status is not None else [OK] * len(digest_bytes), np.uint8)
    return UnitScan(digests, status, np.ones(len(digest_bytes), dtype=np.int64))


def test_duplicates_keep_the_first_copy_across_units():
    a, b = scan_of([1, 2, 1]), scan_of([3, 2, 4, 3])
    mark_duplicates([a, b])
    assert a.status.tolist() == [OK, OK, DUPLICATE]
    assert b.status.tolist() == [OK, DUPLICATE, OK, DUPLICATE]


def test_dropped_documents_do_not_count_as_first_copies():
    a, b = scan_of([1, 2], status=[1, OK]), scan_of([1])  # a[0] is held out
    a.digests[0] = 0  # pass 1 zeroes the digest of anything not OK
    mark_duplicates([a, b])
    assert b.status.tolist() == [OK]


def test_validation_pick_is_by_hash_and_close_to_the_fraction():
    rng = np.random.default_rng(0)
    digests = rng.integers(0, 256, size=(20000, 16), dtype=np.uint8)
    picked = is_validation(digests, 0.05)
    assert 0.04 < picked.mean() < 0.06
    np.testing.assert_array_equal(picked, is_validation(digests.copy(), 0.05))
    assert not is_validation(digests, 0.0).any()


def test_one_validation_document_when_the_fraction_picks_none():
    scans = [scan_of([9, 4]), scan_of([7])]
    assigns = [np.array([TRAIN, TRAIN], np.uint8), np.array([TRAIN], np.uint8)]
    ensure_one_validation_document(scans, assigns)
    assert [a.tolist() for a in assigns] == [[TRAIN, VALIDATION], [TRAIN]]
    single = [np.array([TRAIN, DROP], np.uint8)]
    ensure_one_validation_document([scan_of([3, 5])], single)
    assert single[0].tolist() == [TRAIN, DROP], "a lone document stays in train"


def test_work_order_starts_big_chunks_first_but_reads_corpora_forwards():
    from data_prep.plan import ChunkSpec, work_order
    from data_prep.sources import Unit

    f, c = Unit("text", "/a.txt", "a.txt"), Unit("corpus", "wordnet_glosses", "wordnet")
    chunks = [ChunkSpec(i, u, 0, 1, None, b"\x01", str(i), w) for i, (u, w) in
              enumerate([(f, 5), (f, 50), (c, 10), (c, 40), (c, 30)])]
    order = [ch.index for ch in work_order(chunks)]
    # By size: 1 (50), 3 (40), 4 (30), 2 (10), 0 (5); corpus chunks 2, 3, 4 keep their order
    # in the slots they got.
    assert order == [1, 2, 3, 4, 0]
