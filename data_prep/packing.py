"""Document-aware packing of token streams into fixed-length sequences (pure functions).

A *stream* is the token ids of consecutive document pieces, each piece followed by the
separator (SEP / ``</s>``). A packed sequence is ``CLS + stream window + SEP`` of exactly
``seq_len`` tokens: when the window ends on a piece's own separator that separator closes
the sequence; otherwise the piece is cut there, a separator closes the sequence and the
rest of the piece opens the next one. Nothing is padded; the remainder that does not fill
a sequence is returned as the *tail*, and only the tail of the whole split becomes a
shorter last sequence. Removing CLS/SEP from the sequences gives back exactly the
concatenated document tokens.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from typing import Sequence

import numpy as np

# A sentence ends at . ! ? (plus closing quotes/brackets) followed by whitespace.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+")


def sentence_starts(text: str) -> list[int]:
    """Character offsets where a new sentence begins (after the first)."""
    return [m.end() for m in _SENTENCE_END.finditer(text) if m.end() < len(text)]


def piece_bounds(token_offsets: Sequence[tuple[int, int]], sentence_chars: Sequence[int],
                 max_len: int) -> list[int]:
    """Cut points that split a document of ``len(token_offsets)`` tokens into pieces of at
    most ``max_len`` tokens, each cut at the latest sentence start that fits, or at
    ``max_len`` when one sentence is longer. Returns the piece ends (last == n_tokens).

    ``token_offsets[i]`` is the (start, end) character span of token ``i`` (the
    tokenizer's offsets, in order), searched as they are: no per-token copy.
    """
    n = len(token_offsets)
    # The token that begins each sentence: the first whose span starts at or after the
    # sentence's first character ((c,) sorts before every (c, end)), so a token
    # straddling the boundary belongs to the sentence it starts in.
    cuts, last = [], 0
    for c in sentence_chars:
        k = bisect_left(token_offsets, (c,))
        if last < k < n:
            cuts.append(k)
            last = k
    ends, begin = [], 0
    while n - begin > max_len:
        limit = begin + max_len
        hi = bisect_right(cuts, limit)  # cuts[:hi] <= limit
        end = cuts[hi - 1] if hi > 0 and cuts[hi - 1] > begin else limit
        ends.append(end)
        begin = end
    ends.append(n)
    return ends


def split_pieces(ids: Sequence[int], ends: Sequence[int]) -> list[Sequence[int]]:
    begin, out = 0, []
    for end in ends:
        out.append(ids[begin:end])
        begin = end
    return out


def pack_stream(stream: np.ndarray, seq_len: int, cls_id: int,
                sep_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack a stream (pieces each ended by ``sep_id``) into (n, seq_len) sequences.

    Returns (sequences, tail): the tail (at most ``seq_len - 2`` tokens, ending with a
    separator) is the part of the stream that does not fill a sequence. A piece boundary
    that falls one token before a cut gives ``... SEP SEP`` at the end of a sequence: an
    empty segment, rare and harmless, and the price of never padding.
    """
    stream = np.asarray(stream)
    body = seq_len - 2  # content between CLS and the closing SEP
    # Each row is CLS + stream[p:p + body] + SEP: when the window ends on a piece's own
    # separator, that separator closes the row and is consumed (p += body + 1); otherwise
    # the piece is cut and its rest opens the next row (p += body). Only the starts need
    # a loop; the rows are gathered at once.
    starts = []
    p, n = 0, len(stream)
    while n - p >= seq_len - 1:
        starts.append(p)
        p += body + 1 if stream[p + body] == sep_id else body
    seqs = np.empty((len(starts), seq_len), dtype=stream.dtype if n else np.int64)
    if starts:
        seqs[:, 0] = cls_id
        seqs[:, 1:-1] = stream[np.asarray(starts)[:, None] + np.arange(body)]
        seqs[:, -1] = sep_id
    return seqs, stream[p:]


def pack_final(stream: np.ndarray, seq_len: int, cls_id: int,
               sep_id: int) -> list[np.ndarray]:
    """Pack the last stream of a split: full sequences, then the rest as one shorter
    sequence (CLS + rest, closed with SEP)."""
    seqs, tail = pack_stream(stream, seq_len, cls_id, sep_id)
    out = list(seqs)
    if len(tail):
        last = tail if tail[-1] == sep_id else np.append(tail, sep_id)
        out.append(np.concatenate([np.asarray([cls_id], dtype=last.dtype), last]))
    return out


def strip_specials(seqs, special_ids: Sequence[int]) -> np.ndarray:
    """Concatenated content of packed sequences without CLS/SEP (for checks and tests)."""
    if not len(seqs):
        return np.zeros(0, dtype=np.int64)
    flat = np.concatenate([np.asarray(s) for s in seqs])
    return flat[~np.isin(flat, np.asarray(special_ids))]
