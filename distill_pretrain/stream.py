"""The resumable stream of masked training batches, and the validation batches.

Why the stream is built the way it is (exact resume, any world size, no duplicated reads):

* The data is read through a fixed number of *data slots* (``train.data_slots``; by
  default ranks x loader workers at the run's first start, then recorded in its
  checkpoints). In epoch ``e`` the shard list is permuted with a seed of ``(seed, e)``;
  with at least as many shards as slots, slot ``v`` reads shards ``v, v + slots, ...``
  (several at once, interleaved), with fewer each shard is cut into contiguous parts, one
  per slot, and a slot seeks past the samples before its part. Every sample's payload is
  read by one slot, once per epoch.
* Loader process ``g`` (rank x workers + worker, of ``P``) serves slots ``g, g + P, ...``
  in turn. A restart with another number of ranks or workers hands the same slots, each
  at its saved position, to the new processes: no sample of the epoch is skipped or
  repeated. (With one slot per process, as by default, nothing changes for a run that
  keeps its size.)
* Each slot's stream is infinite (epoch after epoch) and batches may span an epoch
  boundary, so a DataLoader never sees a worker run dry and serves workers strictly
  round-robin: batch ``i`` comes from worker ``i % workers``.
* Shuffling (a buffer seeded by ``(seed, epoch, slot)``) and masking (one generator per
  batch, seeded by ``(seed, slot, epoch, offset)`` of its first sample) are pure
  functions of the position, and batches start only where a batch of the uninterrupted
  run started, so a slot restarted at ``(epoch, offset)`` yields exactly what it would
  have yielded; a resumed DataLoader rotates which logical worker each process plays so
  that the round-robin continues where it stopped.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from distill_common.manifest import DataError
from distill_pretrain.data import decode_ids, read_shard
from distill_pretrain.masking import Masker, OutOfVocabulary, collate

log = logging.getLogger(__name__)

# Stream tags keep the seeded generators of different purposes independent.
_TAG_SHARD_ORDER, _TAG_SHUFFLE, _TAG_MASK, _TAG_VALIDATION = 1, 2, 3, 4

# Shards a loader process reads at once, one sample from each in turn. Prep writes each
# input chunk to its own shards, so one shard is often one source (all WordNet, all BBC);
# read one after another, a run shorter than an epoch would see a single source.
INTERLEAVED_SHARDS = 8


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


@dataclass
class StreamPosition:
    """Where a rank's training stream stands; saved in every checkpoint.

    ``slots[v] = [epoch, offset]``: the next sample data slot ``v`` yields is number
    ``offset`` of its epoch ``epoch``. ``next_worker``: the logical worker that serves
    the next batch (the DataLoader's round-robin pointer); ``next_slot[w]``: which of
    worker ``w``'s slots serves its next batch.
    """

    num_workers: int = 1
    next_worker: int = 0
    slots: dict[int, list[int]] = field(default_factory=dict)
    next_slot: dict[int, int] = field(default_factory=dict)

    def after(self, batch_meta: dict) -> None:
        """Advance past a batch the trainer consumed."""
        w = int(batch_meta["worker"])
        if w != self.next_worker:
            raise RuntimeError(f"data order broken: expected a batch of logical worker "
                               f"{self.next_worker}, got {w}")
        self.slots[int(batch_meta["slot"])] = [int(batch_meta["epoch"]),
                                               int(batch_meta["offset"])]
        self.next_slot[w] = int(batch_meta["next_slot"])
        self.next_worker = (w + 1) % self.num_workers

    def epoch(self) -> float:
        """The lowest epoch any slot is in (for logging)."""
        return min((e for e, _ in self.slots.values()), default=0)

    def to_dict(self) -> dict:
        return {"num_workers": self.num_workers, "next_worker": self.next_worker,
                "slots": {str(k): list(v) for k, v in self.slots.items()},
                "next_slot": {str(k): v for k, v in self.next_slot.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "StreamPosition":
        return cls(num_workers=int(d["num_workers"]), next_worker=int(d["next_worker"]),
                   slots={int(k): [int(v[0]), int(v[1])] for k, v in d["slots"].items()},
                   next_slot={int(k): int(v) for k, v in d.get("next_slot", {}).items()})

    @classmethod
    def merged(cls, saved: Sequence[dict], num_workers: int) -> "StreamPosition":
        """The slot positions of every rank of a run of another size, for a process
        layout that differs: slots keep their positions, the round-robin restarts."""
        slots: dict[int, list[int]] = {}
        for d in saved:
            slots.update(cls.from_dict(d).slots)
        return cls(num_workers=num_workers, slots=slots)


@dataclass(frozen=True)
class _Part:
    """Samples [start, stop) of one shard."""
    url: str
    start: int
    stop: int


def slot_parts(urls: Sequence[str], sample_counts: Sequence[int], order: Sequence[int],
               slot: int, slots: int) -> list[_Part]:
    """What data slot ``slot`` of ``slots`` reads in an epoch whose shard order is
    ``order``: whole shards when there are enough, else one contiguous part of one."""
    if len(urls) >= slots:
        return [_Part(urls[i], 0, sample_counts[i]) for i in order[slot::slots]]
    shard = order[slot % len(urls)]
    parts = len(range(slot % len(urls), slots, len(urls)))  # slots sharing this shard
    part = slot // len(urls)
    n = sample_counts[shard]
    return [_Part(urls[shard], part * n // parts, (part + 1) * n // parts)]


def _interleave(parts: Sequence[_Part], width: int):
    """(url, key, payload) round-robin over up to ``width`` open parts; when one ends the
    next in ``parts`` takes its place. Deterministic, so resume can replay it."""
    pending = iter(parts)
    active: list[tuple[str, Iterator]] = []
    while True:
        active += [(p.url, iter(read_shard(p.url, skip=p.start, limit=p.stop - p.start)))
                   for p in itertools.islice(pending, width - len(active))]
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
    worker), ``slot``, ``epoch``/``offset`` (the slot's position after this batch),
    ``next_slot`` (the worker's next slot index), ``keys`` and ``epochs`` (per sample;
    for tests and debugging).
    """

    def __init__(self, urls: Sequence[str], *, sample_counts: Sequence[int], seq_len: int,
                 batch_size: int, masker: Masker, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, data_slots: int | None = None,
                 shuffle_buffer: int = 1000, position: StreamPosition | None = None):
        super().__init__()
        if len(sample_counts) != len(urls) or any(n is None for n in sample_counts):
            raise DataError("the manifest does not record each shard's sample count; "
                            "re-run `distill prep` with this version")
        self.urls, self.sample_counts = list(urls), [int(n) for n in sample_counts]
        self.seq_len, self.batch_size, self.masker = seq_len, batch_size, masker
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.workers = max(1, num_workers)
        self.processes = world_size * self.workers
        self.data_slots = data_slots or self.processes
        self.shuffle_buffer = shuffle_buffer
        self.position = position or StreamPosition(num_workers=self.workers)
        if self.data_slots < self.processes:
            raise DataError(f"train.data_slots={self.data_slots} is less than the "
                            f"{world_size} rank(s) x {self.workers} loader worker(s) that "
                            f"read them; the run started with {self.data_slots} slots, so "
                            f"resume it with at most that many ranks x workers (set "
                            f"train.data_slots higher at the first start for elastic runs)")
        if len(self.urls) < self.data_slots:
            log.info("%d training shards for %d data slots: each shard is read in %d "
                     "contiguous parts", len(self.urls), self.data_slots,
                     math.ceil(self.data_slots / len(self.urls)))

    def slots_of(self, worker: int) -> list[int]:
        """The data slots loader process (this rank, ``worker``) serves, in turn."""
        return list(range(self.rank * self.workers + worker, self.data_slots, self.processes))

    def _epoch_samples(self, epoch: int, slot: int, width: int):
        """One slot's samples of one epoch, before shuffling: (url, key, payload)."""
        order = _rng(self.seed, _TAG_SHARD_ORDER, epoch).permutation(len(self.urls))
        parts = slot_parts(self.urls, self.sample_counts, order, slot, self.data_slots)
        yield from _interleave(parts, width)

    def _shuffled(self, samples, rng: np.random.Generator):
        """A seeded shuffle buffer; its random draws come in blocks (one generator call
        per 1,024 samples, not one each)."""
        buffer: list = []
        draws = iter(())
        for item in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            u = next(draws, None)
            if u is None:
                draws = iter(rng.random(1024).tolist())
                u = next(draws)
            j = int(u * len(buffer))
            buffer[j], item = item, buffer[j]
            yield item
        rng.shuffle(buffer)
        yield from buffer

    def _samples(self, slot: int, width: int) -> Iterator[tuple[int, int, str, str, bytes]]:
        """Endless (epoch, offset, url, key, payload) of one data slot, from its saved
        position on."""
        epoch, start = self.position.slots.get(slot, [0, 0])
        while True:
            stream = self._shuffled(self._epoch_samples(epoch, slot, width),
                                    _rng(self.seed, _TAG_SHUFFLE, epoch, slot))
            n = 0
            for offset, (url, key, payload) in enumerate(stream):
                n += 1
                if offset >= start:  # before: replaying up to the resume point
                    yield epoch, offset, url, key, payload
            if n == 0:
                raise DataError(f"data slot {slot} got no training samples from "
                                f"{len(self.urls)} shard(s) split over {self.data_slots} "
                                f"slot(s); use fewer ranks x train.num_workers (or "
                                f"train.data_slots) or more data")
            epoch, start = epoch + 1, 0

    def _batches(self, slot: int, width: int) -> Iterator[tuple[dict, dict]]:
        """(batch, meta) of one data slot."""
        rows, keys, urls, epochs, first = [], [], [], [], None
        for epoch, offset, url, key, payload in self._samples(slot, width):
            first = first or (epoch, offset)
            rows.append(decode_ids(payload, url, key, self.seq_len))
            keys.append(key)
            urls.append(url)
            epochs.append(epoch)
            if len(rows) == self.batch_size:
                batch = _collate(rows, keys, urls, self.seq_len, self.masker,
                                 _rng(self.seed, _TAG_MASK, slot, *first))
                yield batch, {"slot": slot, "epoch": epoch, "offset": offset + 1,
                              "keys": keys, "epochs": epochs}
                rows, keys, urls, epochs, first = [], [], [], [], None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        process = info.id if info is not None else 0
        # The DataLoader serves its processes round-robin from process 0: process j plays
        # the logical worker that is j turns after the next one due.
        worker = (self.position.next_worker + process) % self.workers
        slots = self.slots_of(worker)
        width = max(1, INTERLEAVED_SHARDS // len(slots))
        streams = [self._batches(slot, width) for slot in slots]
        turn = self.position.next_slot.get(worker, 0) % len(slots)
        while True:
            batch, meta = next(streams[turn])
            turn = (turn + 1) % len(slots)
            batch["meta"] = {"worker": worker, "next_slot": turn, **meta}
            yield batch


def _collate(rows, keys, urls, seq_len: int, masker: Masker, rng) -> dict:
    try:
        return collate(rows, seq_len, masker, rng)
    except OutOfVocabulary as err:
        raise DataError(f"shard {urls[err.row]}: sample {keys[err.row]}: token id "
                        f"{err.token} outside the vocabulary (size {masker.vocab_size}); the "
                        f"shard is corrupt or from another tokenizer; re-run `distill prep`"
                        ) from None


def train_loader(stream: TrainStream, num_workers: int,
                 pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Batches are made in the workers (batch_size=None); ``in_order`` keeps the
    round-robin the resume logic relies on. ``pin_memory`` (on CUDA) makes the
    trainer's ``non_blocking`` copies asynchronous. The loader gets its own generator:
    by default it draws a seed from the global torch RNG, which would shift the dropout
    stream of a resumed run against an uninterrupted one."""
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=num_workers, in_order=True,
        pin_memory=pin_memory,
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


def validation_batches(urls: Sequence[str], *, seq_len: int, batch_size: int, masker: Masker,
                       seed: int, rank: int = 0, world_size: int = 1,
                       max_samples: int | None = None) -> list[dict[str, torch.Tensor]]:
    """This rank's share of the first ``max_samples`` validation samples (sample ``i`` goes
    to rank ``i % world_size``), masked the same way at every evaluation."""
    rows: list[np.ndarray] = []
    batches: list[dict[str, torch.Tensor]] = []
    samples = ((url, key, payload) for url in urls for key, payload in read_shard(url))
    for i, (url, key, payload) in enumerate(itertools.islice(samples, max_samples)):
        if i % world_size != rank:
            continue
        rows.append(decode_ids(payload, url, key, seq_len, masker.vocab_size))
        if len(rows) == batch_size:
            batches.append(collate(rows, seq_len, masker,
                                   _rng(seed, _TAG_VALIDATION, len(batches), rank)))
            rows = []
    if rows:
        batches.append(collate(rows, seq_len, masker,
                               _rng(seed, _TAG_VALIDATION, len(batches), rank)))
    return batches
