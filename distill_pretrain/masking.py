"""Masked-LM corruption of whole batches at once, and collation into contract-2 batches.

Contract 2: ``input_ids``, ``attention_mask`` (batch, seq_len) and ``labels`` (the
original id where a token was chosen, -100 elsewhere), int64, padded to seq_len.

Selection (BERT / DistilBERT): ``round(mask_prob * candidates)`` tokens per sequence
(at least one), candidates being the non-special tokens; of those 80% become [MASK], 10%
a random token, 10% stay. Optional: whole words (a word's pieces are chosen together)
and frequency smoothing (DistilBERT: a token is chosen with weight count^-0.7).

Everything is vectorised over the batch (a data-loader worker must feed a GPU: >= 10,000
sequences/s, see bench/loader_throughput.py). Sampling without replacement is done with
random keys: each candidate (or word) draws ``log(u) / weight`` and the largest keys of
a sequence win (Efraimidis and Spirakis), which for equal weights is a uniform choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class Masker:
    """``special`` (vocab,) bool: never chosen. ``continuation`` (vocab,) bool: pieces
    that continue the previous word (``##x``), set for whole-word masking. ``weight``
    (vocab,) float or None: selection weight per token id (count^-smoothing)."""

    mask_id: int
    pad_id: int
    special: np.ndarray
    mask_prob: float = 0.15
    replace_prob: float = 0.8
    random_prob: float = 0.1
    continuation: np.ndarray | None = None
    weight: np.ndarray | None = None
    random_pool: np.ndarray = field(init=False)

    def __post_init__(self):
        self.random_pool = np.flatnonzero(~self.special)

    @property
    def vocab_size(self) -> int:
        return len(self.special)

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One sequence: ids (S,) -> (masked ids (S,), labels (S,))."""
        out, labels = self.mask_batch(ids[None, :], np.array([len(ids)]), rng)
        return out[0], labels[0]

    def mask_batch(self, ids: np.ndarray, lengths: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """ids (B, S) int64 with real tokens in ``[:lengths[b]]`` -> (masked ids, labels),
        both (B, S); padding is never chosen."""
        real = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        candidate = real & ~self.special[ids]
        n_candidates = candidate.sum(1)
        target = np.where(n_candidates > 0,
                          np.maximum(1, np.rint(self.mask_prob * n_candidates)), 0)
        if self.continuation is None:
            chosen = self._choose_tokens(ids, candidate, target.astype(np.int64), rng)
        else:
            chosen = self._choose_words(ids, candidate, target.astype(np.int64), rng)
        labels = np.where(chosen, ids, IGNORE_INDEX)
        action = rng.random(ids.shape)
        to_mask = chosen & (action < self.replace_prob)
        to_random = chosen & (action >= self.replace_prob) & \
            (action < self.replace_prob + self.random_prob)
        out = np.where(to_mask, self.mask_id, ids)
        n_random = int(to_random.sum())
        if n_random:
            out[to_random] = self.random_pool[rng.integers(len(self.random_pool),
                                                           size=n_random)]
        return out, labels

    def _keys(self, weights: np.ndarray | None, shape, rng) -> np.ndarray:
        """Efraimidis-Spirakis keys: the top-k keys are a weighted draw of k without
        replacement (log(u) / w; uniform when ``weights`` is None)."""
        u = rng.random(shape)
        if weights is None:
            return u
        with np.errstate(divide="ignore"):
            return np.log(u) / weights

    def _choose_tokens(self, ids, candidate, target, rng) -> np.ndarray:
        """Per row, the ``target`` candidates with the largest keys."""
        weights = None if self.weight is None else self.weight[ids]
        keys = np.where(candidate, self._keys(weights, ids.shape, rng), -np.inf)
        ranked = np.sort(keys, axis=1)[:, ::-1]  # (B, S) best first
        threshold = ranked[np.arange(len(ids)), np.maximum(target - 1, 0)]
        return candidate & (keys >= threshold[:, None]) & (target[:, None] > 0)

    def _choose_words(self, ids, candidate, target, rng) -> np.ndarray:
        """Whole words, in random key order, while the sequence's budget allows (a word
        that would overshoot is passed over, as in BERT's whole-word masking; two passes
        over the key order approximate that greedy rule; the first word always counts)."""
        batch, seq = ids.shape
        flat_cand = candidate.ravel()
        previous_is_candidate = np.r_[False, flat_cand[:-1]]
        previous_is_candidate[::seq] = False  # a row's first position starts a word
        starts = flat_cand & (~self.continuation[ids.ravel()] | ~previous_is_candidate)
        positions = np.flatnonzero(flat_cand)
        if len(positions) == 0:
            return np.zeros_like(candidate)
        words = (np.cumsum(starts) - 1)[positions]  # word index of each candidate
        n_words = int(words[-1]) + 1
        size = np.bincount(words, minlength=n_words)
        row = positions[np.flatnonzero(starts[positions])] // seq  # (n_words,) ascending
        weights = None
        if self.weight is not None:
            weights = np.bincount(words, weights=self.weight[ids.ravel()[positions]],
                                  minlength=n_words) / np.maximum(size, 1)
        # by row, best key first: keys sorted (continuous: no ties to break), then a stable
        # sort by row (radix on int16), far cheaper than np.lexsort
        by_key = np.argsort(-self._keys(weights, n_words, rng))
        order = by_key[np.argsort(row[by_key].astype(np.int16), kind="stable")]
        row_sorted = row[order]
        words_per_row = np.bincount(row_sorted, minlength=batch)
        first = np.zeros(n_words, dtype=bool)
        first[np.cumsum(words_per_row)[words_per_row > 0] - words_per_row[words_per_row > 0]] \
            = True
        taken = np.zeros(n_words, dtype=bool)
        budget = target
        for sweep in range(2):
            sizes = np.where(taken[order], 0, size[order])
            used = np.cumsum(sizes)
            used -= np.repeat((used - sizes)[first], words_per_row[words_per_row > 0])
            fits = ~taken[order] & (used <= budget[row_sorted])
            if sweep == 0:
                fits |= first  # a sequence's first word counts even if it overshoots
            taken[order[fits]] = True
            budget = target - np.bincount(row[taken], weights=size[taken],
                                          minlength=batch).astype(np.int64)
        chosen = np.zeros(batch * seq, dtype=bool)
        chosen[positions] = taken[words]
        return chosen.reshape(batch, seq)


def build_masker(tokenizer, manifest: dict, *, mask_prob: float = 0.15,
                 replace_prob: float = 0.8, random_prob: float = 0.1,
                 whole_word: bool = False, token_counts: np.ndarray | None = None,
                 smoothing: float = 0.7) -> Masker:
    """A Masker for the shards' tokenizer. ``token_counts`` switches on DistilBERT's
    frequency-smoothed selection (p ~ count^-smoothing)."""
    vocab_size = int(manifest["tokenizer"]["vocab_size"])
    ids = manifest["tokenizer"]["special_ids"]
    special = np.zeros(vocab_size, dtype=bool)
    special_ids = set(ids.values()) | set(getattr(tokenizer, "all_special_ids", []) or [])
    special[[i for i in special_ids if 0 <= i < vocab_size]] = True
    continuation = _continuation_pieces(tokenizer, special) if whole_word else None
    weight = None
    if token_counts is not None:
        weight = np.maximum(token_counts.astype(np.float64), 1.0) ** (-smoothing)
        weight[special] = 0.0
    return Masker(mask_id=int(ids["mask"]), pad_id=int(ids["pad"]), special=special,
                  mask_prob=mask_prob, replace_prob=replace_prob, random_prob=random_prob,
                  continuation=continuation, weight=weight)


def _continuation_pieces(tokenizer, special: np.ndarray) -> np.ndarray:
    """(vocab,) bool: pieces that continue a word. WordPiece marks continuations
    (``##x``); BPE and SentencePiece mark word starts (``Ġx``, ``▁x``)."""
    continuation = np.zeros(len(special), dtype=bool)
    vocab = tokenizer.get_vocab()
    start_markers = ("\u0120", "\u2581")
    marks_starts = any(t.startswith(start_markers) for t in vocab)
    for token, i in vocab.items():
        if i >= len(special) or special[i]:
            continue
        continuation[i] = (not token.startswith(start_markers)) if marks_starts \
            else token.startswith("##")
    return continuation


class OutOfVocabulary(ValueError):
    """Row ``row`` of a batch holds ``token``, outside the masker's vocabulary."""

    def __init__(self, row: int, token: int):
        super().__init__(f"row {row}: token id {token}")
        self.row, self.token = row, token


def collate(rows: Sequence[np.ndarray], seq_len: int, masker: Masker,
            rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Sequences of token ids -> a masked contract-2 batch padded to seq_len (static
    shapes: one compiled graph, no recompilation per length). Ids outside the vocabulary
    raise OutOfVocabulary (checked once per batch, not per sequence)."""
    n = len(rows)
    ids = np.full((n, seq_len), masker.pad_id, dtype=np.int64)
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=n)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    top, bottom = ids.max(axis=1), ids.min(axis=1)
    if top.max() >= masker.vocab_size or bottom.min() < 0:
        row = int(np.argmax((top >= masker.vocab_size) | (bottom < 0)))
        raise OutOfVocabulary(row, int(top[row] if top[row] >= masker.vocab_size
                                       else bottom[row]))
    masked, labels = masker.mask_batch(ids, lengths, rng)
    attention = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": torch.from_numpy(masked),
            "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(labels)}
