"""Streaming the shards of `distill prep` into masked batches, resumably.

Layout (contract 1): ``<data_dir>/manifest.json``, ``train/shard-*.tar``,
``validation/shard-*.tar`` and ``token_counts.npy``; each WebDataset sample holds
``input_ids.npy`` (one packed sequence). Batches follow contract 2: ``input_ids``,
``attention_mask`` and ``labels`` (original id at masked positions, -100 elsewhere).

Why the stream is built the way it is (exact resume):

* Every (rank, loader worker) pair is a *slot*. In epoch ``e`` the shard list is permuted
  with a seed of ``(seed, e)`` and slot ``s`` reads shards ``s, s + slots, ...`` (or, when
  there are fewer shards than slots, every ``slots``-th sample of all shards). So slots
  read disjoint data and together read every sample once per epoch.
* Each slot's stream is infinite (epoch after epoch) and batches may span an epoch
  boundary, so a DataLoader never sees a worker run dry and serves workers strictly
  round-robin: batch ``i`` comes from worker ``i % workers``.
* Shuffling (a buffer seeded by ``(seed, epoch, slot)``) and masking (a generator seeded by
  ``(seed, epoch, slot, index)`` per sample) are pure functions of the position, so a slot
  restarted at ``(epoch, offset)`` yields exactly what it would have yielded; a resumed
  DataLoader rotates which logical worker each process plays so that the round-robin
  continues where it stopped.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Stream tags keep the seeded generators of different purposes independent.
_TAG_SHARD_ORDER, _TAG_SHUFFLE, _TAG_MASK, _TAG_VALIDATION = 1, 2, 3, 4


class DataError(RuntimeError):
    """Missing, corrupt or mismatched shards; the message names the shard and the fix."""


# --- manifest ---------------------------------------------------------------------------------


def _is_url(path: str) -> bool:
    return "://" in str(path)


def _open_binary(path: str):
    if _is_url(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def join_path(root: str, name: str) -> str:
    return f"{str(root).rstrip('/')}/{name}" if _is_url(root) else str(Path(root) / name)


def load_manifest(data_dir: str) -> dict:
    """Read ``manifest.json``; the manifest is written last, so its absence means the
    prep run did not finish."""
    path = join_path(data_dir, "manifest.json")
    try:
        with _open_binary(path) as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no manifest; the shards are missing or `distill prep` did "
                        f"not finish. Run `distill prep RECIPE` or set train.data_dir") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable manifest ({err}); re-run `distill prep`") from None
    for key in ("tokenizer", "seq_len", "dtype", "splits"):
        if key not in manifest:
            raise DataError(f"{path}: manifest has no '{key}'; it was not written by "
                            f"`distill prep` (format_version 1)")
    if manifest.get("format_version") != 1:
        raise DataError(f"{path}: format_version {manifest.get('format_version')!r} is not "
                        f"supported (expected 1); re-run `distill prep`")
    return manifest


def shard_urls(data_dir: str, manifest: dict, split: str) -> list[str]:
    """The split's shard paths; local ones must exist."""
    splits = manifest["splits"]
    if split not in splits or not splits[split].get("shards"):
        raise DataError(f"{join_path(data_dir, 'manifest.json')}: no '{split}' shards; "
                        f"re-run `distill prep` (it writes train and validation splits)")
    urls = [join_path(data_dir, s["file"]) for s in splits[split]["shards"]]
    if not _is_url(data_dir):
        for url in urls:
            if not Path(url).is_file():
                raise DataError(f"shard {url} listed in the manifest is missing; restore it "
                                f"or re-run `distill prep`")
    return urls


def check_tokenizer(manifest: dict, tokenizer, data_dir: str, teacher_path: str) -> None:
    """The shards must have been tokenized with the teacher's vocabulary."""
    from distill_common.textnorm import vocab_hash

    shards_tok = manifest["tokenizer"]
    teacher_hash = vocab_hash(tokenizer)
    shards_hash = str(shards_tok.get("vocab_hash"))
    if shards_hash != teacher_hash:
        raise DataError(
            f"{join_path(data_dir, 'manifest.json')}: the shards were tokenized with "
            f"'{shards_tok.get('name_or_path')}' (vocab_hash {shards_hash[:12]}, "
            f"{shards_tok.get('vocab_size')} tokens) but the teacher {teacher_path} uses a "
            f"different vocabulary (vocab_hash {teacher_hash[:12]}, {len(tokenizer)} tokens). "
            f"Re-run `distill prep` with the teacher's tokenizer or point train.data_dir at "
            f"matching shards")


def load_token_counts(data_dir: str, manifest: dict) -> np.ndarray:
    entry = manifest.get("token_counts") or {"file": "token_counts.npy"}
    path = join_path(data_dir, entry["file"])
    try:
        with _open_binary(path) as f:
            counts = np.load(io.BytesIO(f.read()), allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read token counts ({err}); they are needed by "
                        f"train.mask_selection=frequency. Re-run `distill prep` or use "
                        f"train.mask_selection=uniform") from None
    vocab_size = manifest["tokenizer"]["vocab_size"]
    if counts.ndim != 1 or len(counts) != vocab_size:
        raise DataError(f"{path}: shape {counts.shape} does not match vocab_size {vocab_size}")
    return counts.astype(np.int64)


# --- reading shards ---------------------------------------------------------------------------


def read_shard(url: str) -> Iterator[tuple[str, bytes]]:
    """(key, raw input_ids.npy bytes) of one WebDataset shard, in file order."""
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    key, payload = None, None
    try:
        with _open_binary(url) as stream:
            for member in tar_file_iterator(stream):
                prefix, suffix = base_plus_ext(member["fname"])
                if prefix is None:
                    continue
                if prefix != key:
                    if key is not None:
                        yield key, _require(payload, url, key)
                    key, payload = prefix, None
                if suffix == "input_ids.npy":
                    payload = member["data"]
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"shard {url} is missing; restore it or re-run `distill prep`") from None
    except Exception as err:  # tarfile.ReadError, truncated streams, fsspec errors
        where = f" after sample {key}" if key else ""
        raise DataError(f"shard {url} is corrupt or unreadable{where}: {err}; re-run "
                        f"`distill prep` (or `distill prep verify DIR` to check every "
                        f"shard's sha256)") from None
    if key is not None:
        yield key, _require(payload, url, key)


def _require(payload: bytes | None, url: str, key: str) -> bytes:
    if payload is None:
        raise DataError(f"shard {url}: sample {key} has no input_ids.npy; re-run `distill prep`")
    return payload


def decode_ids(payload: bytes, url: str, key: str, seq_len: int,
               vocab_size: int | None = None) -> np.ndarray:
    try:
        ids = np.load(io.BytesIO(payload), allow_pickle=False)
    except Exception as err:
        raise DataError(f"shard {url}: sample {key}: input_ids.npy is corrupt ({err})") from None
    if ids.ndim != 1 or not 1 <= len(ids) <= seq_len:
        raise DataError(f"shard {url}: sample {key}: input_ids has shape {ids.shape}, "
                        f"expected a 1-D array of at most seq_len={seq_len} ids")
    ids = ids.astype(np.int64)
    if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
        raise DataError(f"shard {url}: sample {key}: token id {int(ids.max())} outside the "
                        f"vocabulary (size {vocab_size}); the shard is corrupt or from "
                        f"another tokenizer; re-run `distill prep`")
    return ids


# --- masking ----------------------------------------------------------------------------------


@dataclass
class Masker:
    """15% / 80-10-10 masking with optional whole-word and frequency-smoothed selection.

    ``special`` (vocab_size,) bool: never chosen. ``continuation`` (vocab_size,) bool:
    pieces that continue the previous word (``##x``), used by whole-word masking.
    ``weight`` (vocab_size,) float or None: selection weight per token id (count^-0.7).
    """

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

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """ids (S,) -> (masked input ids (S,), labels (S,) with -100 where not chosen)."""
        candidates = np.flatnonzero(~self.special[ids])
        labels = np.full_like(ids, IGNORE_INDEX)
        if len(candidates) == 0:
            return ids.copy(), labels
        n_target = max(1, int(round(self.mask_prob * len(candidates))))
        chosen = self._choose(ids, candidates, n_target, rng)
        labels[chosen] = ids[chosen]
        out = ids.copy()
        action = rng.random(len(chosen))
        to_mask = chosen[action < self.replace_prob]
        to_random = chosen[(action >= self.replace_prob)
                           & (action < self.replace_prob + self.random_prob)]
        out[to_mask] = self.mask_id
        out[to_random] = rng.choice(self.random_pool, size=len(to_random))
        return out, labels

    def _choose(self, ids, candidates, n_target, rng) -> np.ndarray:
        if self.continuation is None:
            p = self._probabilities(ids[candidates])
            return np.sort(rng.choice(candidates, size=n_target, replace=False, p=p))
        # Whole words: a word is a candidate start plus the continuation pieces after it.
        is_start = ~self.continuation[ids[candidates]]
        is_start[0] = True
        word_of = np.cumsum(is_start) - 1  # (n_candidates,) word index of each piece
        n_words = int(word_of[-1]) + 1
        p = None
        if self.weight is not None:
            piece_w = self.weight[ids[candidates]]
            word_w = np.bincount(word_of, weights=piece_w) / np.bincount(word_of)
            p = word_w / word_w.sum() if word_w.sum() > 0 else None
        order = rng.choice(n_words, size=n_words, replace=False, p=p)
        sizes = np.bincount(word_of)
        taken, total = [], 0
        for w in order:
            if total and total + sizes[w] > n_target:
                continue
            taken.append(w)
            total += sizes[w]
            if total >= n_target:
                break
        return candidates[np.isin(word_of, taken)]

    def _probabilities(self, candidate_ids: np.ndarray) -> np.ndarray | None:
        if self.weight is None:
            return None
        w = self.weight[candidate_ids]
        return w / w.sum() if w.sum() > 0 else None


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
    continuation = None
    if whole_word:
        continuation = np.zeros(vocab_size, dtype=bool)
        vocab = tokenizer.get_vocab()
        word_start_markers = any(t.startswith(("\u0120", "\u2581")) for t in vocab)
        for token, i in vocab.items():
            if i >= vocab_size or special[i]:
                continue
            if word_start_markers:  # BPE / SentencePiece mark the start of a word
                continuation[i] = not token.startswith(("\u0120", "\u2581"))
            else:  # WordPiece marks the continuation
                continuation[i] = token.startswith("##")
    weight = None
    if token_counts is not None:
        weight = np.maximum(token_counts.astype(np.float64), 1.0) ** (-smoothing)
        weight[special] = 0.0
    return Masker(mask_id=int(ids["mask"]), pad_id=int(ids["pad"]), special=special,
                  mask_prob=mask_prob, replace_prob=replace_prob, random_prob=random_prob,
                  continuation=continuation, weight=weight)


def collate(rows: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int,
            pad_id: int) -> dict[str, torch.Tensor]:
    """[(masked ids, labels)] -> contract-2 batch, padded to seq_len (static shapes)."""
    n = len(rows)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    attention = np.zeros((n, seq_len), dtype=np.int64)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, :len(ids)] = ids
        labels[i, :len(lab)] = lab
        attention[i, :len(ids)] = 1
    return {"input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(labels)}


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


# --- the training stream ----------------------------------------------------------------------


@dataclass
class StreamPosition:
    """Where a rank's training stream stands; saved in every checkpoint.

    ``workers[w] = [epoch, offset]``: the next sample logical worker ``w`` yields is number
    ``offset`` of its epoch ``epoch``. ``next_worker``: the logical worker that serves the
    next batch (the DataLoader's round-robin pointer).
    """

    num_workers: int = 1
    next_worker: int = 0
    workers: dict[int, list[int]] = field(default_factory=dict)

    def after(self, batch_meta: dict) -> None:
        """Advance past a batch the trainer consumed."""
        w = int(batch_meta["worker"])
        if w != self.next_worker:
            raise RuntimeError(f"data order broken: expected a batch of logical worker "
                               f"{self.next_worker}, got {w}")
        self.workers[w] = [int(batch_meta["epoch"]), int(batch_meta["offset"])]
        self.next_worker = (w + 1) % self.num_workers

    def epoch(self) -> float:
        """The lowest epoch any worker is in (for logging)."""
        return min((e for e, _ in self.workers.values()), default=0)

    def to_dict(self) -> dict:
        return {"num_workers": self.num_workers, "next_worker": self.next_worker,
                "workers": {str(k): list(v) for k, v in self.workers.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "StreamPosition":
        return cls(num_workers=int(d["num_workers"]), next_worker=int(d["next_worker"]),
                   workers={int(k): [int(v[0]), int(v[1])] for k, v in d["workers"].items()})


# Shards a loader worker reads at once, one sample from each in turn. Prep writes each
# input chunk to its own shards, so one shard is often one source (all WordNet, all BBC);
# read one after another, a run shorter than an epoch would see a single source.
INTERLEAVED_SHARDS = 8


def _interleave(urls: Sequence[str], width: int):
    """(url, key, payload) round-robin over up to ``width`` open shards; when one ends the
    next in ``urls`` takes its place. Deterministic, so resume can replay it."""
    pending = iter(urls)
    active: list[tuple[str, Iterator]] = []
    while True:
        active += [(url, iter(read_shard(url)))
                   for url in itertools.islice(pending, width - len(active))]
        if not active:
            return
        still_open = []
        for url, samples in active:
            item = next(samples, None)
            if item is not None:
                yield url, item[0], item[1]
                still_open.append((url, samples))
        active = still_open


class TrainStream(torch.utils.data.IterableDataset):
    """An endless stream of masked training batches for one rank (see module docstring).

    Yields contract-2 batches of ``batch_size`` plus ``"meta"``: ``worker`` (logical
    worker), ``epoch``/``offset`` (the worker's position after this batch), ``keys`` and
    ``epochs`` (per sample; for tests and debugging).
    """

    def __init__(self, urls: Sequence[str], *, seq_len: int, batch_size: int, masker: Masker,
                 seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 shuffle_buffer: int = 1000, position: StreamPosition | None = None):
        super().__init__()
        self.urls = list(urls)
        self.seq_len, self.batch_size, self.masker = seq_len, batch_size, masker
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.workers = max(1, num_workers)
        self.shuffle_buffer = shuffle_buffer
        self.position = position or StreamPosition(num_workers=self.workers)
        if self.position.num_workers != self.workers:
            raise DataError(f"the checkpoint's data position is for {self.position.num_workers}"
                            f" loader workers per rank, this run has {self.workers}; resume "
                            f"with train.num_workers={self.position.num_workers}")

    # One slot's samples of one epoch, before shuffling: (url, key, payload).
    def _epoch_samples(self, epoch: int, slot: int, slots: int):
        order = _rng(self.seed, _TAG_SHARD_ORDER, epoch).permutation(len(self.urls))
        if len(self.urls) >= slots:
            yield from _interleave([self.urls[i] for i in order[slot::slots]],
                                   INTERLEAVED_SHARDS)
        else:  # fewer shards than readers: split by sample instead
            n = 0
            for i in order:
                for key, payload in read_shard(self.urls[i]):
                    if n % slots == slot:
                        yield self.urls[i], key, payload
                    n += 1

    def _shuffled(self, samples, rng: np.random.Generator):
        buffer: list = []
        for item in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], item = item, buffer[j]
            yield item
        rng.shuffle(buffer)
        yield from buffer

    def _samples(self, worker: int) -> Iterator[tuple[int, int, str, np.ndarray, np.ndarray]]:
        """Endless (epoch, offset, key, masked ids, labels) of one logical worker."""
        slots = self.world_size * self.workers
        slot = self.rank * self.workers + worker
        epoch, start = self.position.workers.get(worker, [0, 0])
        while True:
            stream = self._shuffled(self._epoch_samples(epoch, slot, slots),
                                    _rng(self.seed, _TAG_SHUFFLE, epoch, slot))
            n = 0
            for offset, (url, key, payload) in enumerate(stream):
                n += 1
                if offset < start:
                    continue  # replaying up to the resume point: no decoding, no masking
                ids = decode_ids(payload, url, key, self.seq_len, len(self.masker.special))
                masked, labels = self.masker(ids, _rng(self.seed, _TAG_MASK, epoch, slot, offset))
                yield epoch, offset, key, masked, labels
            if n == 0:
                raise DataError(f"rank {self.rank} loader worker {worker} got no training "
                                f"samples from {len(self.urls)} shard(s) split over "
                                f"{self.world_size} rank(s) x {self.workers} worker(s); use "
                                f"fewer train.num_workers or more data")
            epoch, start = epoch + 1, 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        process = info.id if info is not None else 0
        # The DataLoader serves its processes round-robin from process 0: process j plays
        # the logical worker that is j turns after the next one due.
        worker = (self.position.next_worker + process) % self.workers
        rows, keys, epochs = [], [], []
        for epoch, offset, key, masked, labels in self._samples(worker):
            rows.append((masked, labels))
            keys.append(key)
            epochs.append(epoch)
            if len(rows) == self.batch_size:
                batch = collate(rows, self.seq_len, self.masker.pad_id)
                batch["meta"] = {"worker": worker, "epoch": epoch, "offset": offset + 1,
                                 "keys": keys, "epochs": epochs}
                yield batch
                rows, keys, epochs = [], [], []


def train_loader(stream: TrainStream, num_workers: int) -> torch.utils.data.DataLoader:
    """Batches are made in the workers (batch_size=None); ``in_order`` keeps the
    round-robin the resume logic relies on. The loader gets its own generator: by default
    it draws a seed from the global torch RNG, which would shift the dropout stream of a
    resumed run against an uninterrupted one."""
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=num_workers, in_order=True,
        generator=torch.Generator().manual_seed(stream.seed),
        worker_init_fn=_ignore_sigterm if num_workers > 0 else None,
        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
        multiprocessing_context="fork" if num_workers > 0 and os.name == "posix" else None)


def _ignore_sigterm(_worker_id: int) -> None:
    """A SIGTERM sent to the whole job (Slurm, torchrun) is handled by the training process,
    which checkpoints and then shuts its loader down; a worker dying first would abort that.
    Workers still exit when their parent dies (DataLoader's watchdog)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def split_meta(batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Contract-2 tensors and the stream metadata of a loader batch."""
    meta = batch.pop("meta")
    return batch, meta


# --- validation -------------------------------------------------------------------------------


def validation_batches(urls: Sequence[str], *, seq_len: int, batch_size: int, masker: Masker,
                       seed: int, rank: int = 0, world_size: int = 1,
                       max_samples: int | None = None) -> list[dict[str, torch.Tensor]]:
    """This rank's share of the first ``max_samples`` validation samples (sample ``i`` goes
    to rank ``i % world_size``), masked the same way at every evaluation."""
    rows: list = []
    batches: list = []
    i = 0
    for url in urls:
        for key, payload in read_shard(url):
            if max_samples is not None and i >= max_samples:
                break
            if i % world_size == rank:
                ids = decode_ids(payload, url, key, seq_len, len(masker.special))
                rows.append(masker(ids, _rng(seed, _TAG_VALIDATION, i)))
                if len(rows) == batch_size:
                    batches.append(collate(rows, seq_len, masker.pad_id))
                    rows = []
            i += 1
        if max_samples is not None and i >= max_samples:
            break
    if rows:
        batches.append(collate(rows, seq_len, masker.pad_id))
    return batches
