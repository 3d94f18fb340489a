"""The calibration sample `init: pruned` measures the teacher on: a few hundred sequences
of the training shards, unmasked (importance is read from natural text), the same for a
given seed on every machine.

Prep writes each input chunk to its own shards, so one shard often holds one source; the
sample takes an equal share from each of up to ``SHARDS_SAMPLED`` shards in a seeded
order (more when shards run short), instead of reading one source only. Nothing is read
until the sample is iterated (in training, rank 0 alone measures the teacher).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from distill_common import manifest as shards
from distill_pretrain.config import StudentConfig
from distill_pretrain.data import decode_ids, read_shard
from distill_pretrain.masking import IGNORE_INDEX

log = logging.getLogger(__name__)

SHARDS_SAMPLED = 16
_TAG_CALIBRATION = 5  # keeps this seeded stream apart from stream.py's (tags 1-4)


def unmasked_batch(rows: Sequence[np.ndarray], seq_len: int,
                   pad_id: int) -> dict[str, torch.Tensor]:
    """Token id sequences -> a contract-2 batch (batch, seq_len) padded with ``pad_id``,
    nothing masked (labels all -100)."""
    ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    attention = np.zeros((len(rows), seq_len), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        attention[i, :len(row)] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attention),
            "labels": torch.full(ids.shape, IGNORE_INDEX, dtype=torch.int64)}


@dataclass(frozen=True)
class CalibrationSample:
    """Iterable of contract-2 batches (input_ids, attention_mask (batch, seq_len); labels
    all -100) holding ``num_samples`` training sequences of ``data_dir``."""
    data_dir: str
    num_samples: int
    seed: int
    batch_size: int = 16

    def _sequences(self, manifest: dict) -> Iterator[np.ndarray]:
        """Up to SHARDS_SAMPLED shards in a seeded order, an even share of the sample from
        each; a shard shorter than its share (the last one of a split often is) leaves the
        rest to the shards after it, then to a second pass over the same order."""
        urls = shards.shard_urls(self.data_dir, manifest, "train")
        order = np.random.default_rng([self.seed, _TAG_CALIBRATION]).permutation(len(urls))
        spread = min(len(urls), SHARDS_SAMPLED)
        vocab_size = int(manifest["tokenizer"]["vocab_size"])
        read_from = [0] * len(urls)
        taken = 0
        for _ in range(2):
            for j, i in enumerate(order):
                want = self.num_samples - taken
                if want <= 0:
                    return
                for key, payload in read_shard(urls[i], skip=read_from[i],
                                               limit=math.ceil(want / max(spread - j, 1))):
                    yield decode_ids(payload, urls[i], key, manifest["seq_len"], vocab_size)
                    read_from[i] += 1
                    taken += 1
            spread = 1  # second pass: whatever each shard has left
        if taken < self.num_samples:
            log.warning("calibration: the training shards of %s hold %d sequences, fewer "
                        "than student.calibration_samples=%d", self.data_dir, taken,
                        self.num_samples)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        manifest = shards.load_manifest(self.data_dir)
        seq_len = manifest["seq_len"]
        pad_id = int(manifest["tokenizer"]["special_ids"]["pad"])
        rows = []
        for ids in self._sequences(manifest):
            rows.append(ids)
            if len(rows) == self.batch_size:
                yield unmasked_batch(rows, seq_len, pad_id)
                rows = []
        if rows:
            yield unmasked_batch(rows, seq_len, pad_id)


def calibration_for(cfg: StudentConfig, data_dir: Optional[str],
                    seed: int) -> Optional[CalibrationSample]:
    """The sample ``cfg`` needs (init=pruned), else None; reads nothing yet."""
    if cfg.init != "pruned" or data_dir is None:
        return None
    return CalibrationSample(str(data_dir), cfg.calibration_samples, seed)
