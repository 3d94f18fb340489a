"""Packing invariants as pure functions: every sequence starts with CLS and ends with SEP,
all are seq_len long but the split's last, and no token is lost or duplicated."""

from __future__ import annotations

import random

import numpy as np
import pytest

from data_prep.packing import (pack_final, pack_stream, piece_bounds, sentence_starts,
                               split_pieces, strip_specials)

CLS, SEP = 2, 3


def random_docs(n: int, seed: int, max_len: int = 300) -> list[list[int]]:
    rng = random.Random(seed)
    # Ids from 5 up: never a special token, so the content check is exact.
    return [[rng.randint(5, 999) for _ in range(rng.choice([1, 2, 7, 30, max_len]))]
            for _ in range(n)]


def stream_of(pieces) -> np.ndarray:
    out = []
    for p in pieces:
        out.extend(p)
        out.append(SEP)
    return np.asarray(out, dtype=np.int64)


def check_sequences(seqs, seq_len: int) -> None:
    for i, s in enumerate(seqs):
        assert s[0] == CLS and s[-1] == SEP, f"sequence {i} is not CLS ... SEP: {s}"
        assert CLS not in s[1:], f"sequence {i} has a CLS inside"
        if i < len(seqs) - 1:
            assert len(s) == seq_len, f"sequence {i} has {len(s)} tokens, not {seq_len}"
        else:
            assert 2 < len(s) <= seq_len


@pytest.mark.parametrize("seq_len", [8, 16, 128, 512])
@pytest.mark.parametrize("seed", [0, 1])
def test_pack_keeps_every_token_once_in_order(seq_len, seed):
    docs = random_docs(60, seed)
    seqs = pack_final(stream_of(docs), seq_len, CLS, SEP)
    check_sequences(seqs, seq_len)
    content = strip_specials(seqs, [CLS, SEP])
    np.testing.assert_array_equal(content, np.concatenate([np.asarray(d) for d in docs]))


def test_pack_stream_returns_only_full_sequences_and_a_short_tail():
    docs = random_docs(40, 3)
    seqs, tail = pack_stream(stream_of(docs), 32, CLS, SEP)
    assert seqs.shape[1] == 32 and len(seqs) > 10
    assert (seqs[:, 0] == CLS).all() and (seqs[:, -1] == SEP).all()
    assert 0 < len(tail) <= 30 and tail[-1] == SEP


def test_chunked_packing_with_tails_keeps_every_token():
    """What the driver does: each chunk packs its own stream and hands back its tail;
    the tails are packed, in chunk order, into the split's last sequences."""
    docs = random_docs(90, 4)
    chunks = [docs[i:i + 20] for i in range(0, len(docs), 20)]
    full, tails = [], []
    for chunk in chunks:
        seqs, tail = pack_stream(stream_of(chunk), 64, CLS, SEP)
        # Within a chunk: its sequences then its tail are the chunk's content in order.
        np.testing.assert_array_equal(
            np.concatenate([strip_specials(seqs, [CLS, SEP]), strip_specials([tail], [CLS, SEP])]),
            np.concatenate([np.asarray(d) for d in chunk]))
        full.extend(seqs)
        tails.append(tail)
    full.extend(pack_final(np.concatenate(tails), 64, CLS, SEP))
    check_sequences(full, 64)
    everything = np.concatenate([np.asarray(d) for d in docs])
    content = strip_specials(full, [CLS, SEP])
    assert len(content) == len(everything)
    np.testing.assert_array_equal(np.sort(content), np.sort(everything))


def test_document_boundaries_are_marked_with_sep():
    # Three short documents fit one sequence: CLS a SEP b SEP c SEP, then the last is short.
    seqs = pack_final(stream_of([[10, 11], [12], [13, 14, 15]]), 16, CLS, SEP)
    assert len(seqs) == 1
    assert seqs[0].tolist() == [CLS, 10, 11, SEP, 12, SEP, 13, 14, 15, SEP]


def test_a_cut_inside_a_document_continues_in_the_next_sequence():
    seqs = pack_final(stream_of([list(range(10, 22))]), 8, CLS, SEP)
    assert [s.tolist() for s in seqs] == [
        [CLS, 10, 11, 12, 13, 14, 15, SEP], [CLS, 16, 17, 18, 19, 20, 21, SEP]]


def test_empty_stream_gives_no_sequence():
    assert pack_final(np.zeros(0, dtype=np.int64), 16, CLS, SEP) == []


def test_sentence_starts_after_end_punctuation():
    text = 'One two. Three "four!" Five? six'
    assert [text[i:i + 5] for i in sentence_starts(text)] == ["Three", "Five?", "six"]


def test_pieces_cut_at_the_latest_sentence_start_that_fits():
    # 3 sentences of 4, 5 and 6 tokens; tokens start every 2 characters.
    token_offsets = [(c, c + 1) for c in range(0, 30, 2)]
    sentence_chars = [8, 18]  # tokens 4 and 9 begin sentences
    ends = piece_bounds(token_offsets, sentence_chars, max_len=10)
    assert ends == [9, 15]  # cut at the sentence start at token 9, not at 10
    # a sentence start inside a token (offsets 17-19): the cut goes after that token
    straddling = [(c, c + 1) for c in range(0, 16, 2)] + [(17, 20), (20, 21), (22, 23)]
    assert piece_bounds(straddling, [18], max_len=9) == [9, 11]


def test_piece_bounds_with_repeated_and_out_of_range_sentence_starts():
    offsets = [(c, c + 1) for c in range(0, 40, 2)]  # 20 tokens
    assert piece_bounds(offsets, [0, 6, 6, 12, 100], max_len=8) == [6, 14, 20]


def test_a_sentence_longer_than_a_sequence_is_cut_where_it_must():
    ends = piece_bounds([(c, c + 1) for c in range(25)], [], max_len=10)
    assert ends == [10, 20, 25]
    pieces = split_pieces(list(range(25)), ends)
    assert [len(p) for p in pieces] == [10, 10, 5]
    assert sum(pieces, []) == list(range(25))


def test_short_document_is_one_piece():
    assert piece_bounds([(c, c + 1) for c in range(5)], [2], max_len=10) == [5]

