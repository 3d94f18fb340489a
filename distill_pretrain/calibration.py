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
        urls = shards.shard_urls(self.data_dir, manifest, "train")
        order = np.random.default_rng([self.seed, _TAG_CALIBRATION]).permutation(len(urls))
        per_shard = math.ceil(self.num_samples / min(len(urls), SHARDS_SAMPLED))
        vocab_size = int(manifest["tokenizer"]["vocab_size"])
        taken = 0
        for i in order:
            for key, payload in read_shard(urls[i], limit=per_shard):
                yield decode_ids(payload, urls[i], key, manifest["seq_len"], vocab_size)
                taken += 1
                if taken == self.num_samples:
                    return
        log.warning("calibration: the training shards of %s hold %d sequences, fewer than "
                    "student.calibration_samples=%d", self.data_dir, taken, self.num_samples)

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
