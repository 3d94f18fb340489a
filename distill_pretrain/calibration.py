"""The calibration sample `init: pruned` measures the teacher on: a few hundred sequences
of the training shards, unmasked (importance is read from natural text), the same for a
given seed on every machine.

Prep writes each input chunk to its own shards, so one shard often holds one source; the
sample takes an equal share from each of up to ``SHARDS_SAMPLED`` shards in a seeded
order (more when shards run short), instead of reading one source only. Nothing is read
until the sample is iterated (in training, rank 0 alone measures the teacher).
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from distill_pretrain import data as D
from distill_pretrain.config import StudentConfig

log = logging.getLogger(__name__)

SHARDS_SAMPLED = 16
_TAG_CALIBRATION = 5  # keeps this seeded stream apart from data.py's (tags 1-4)


@dataclass(frozen=True)
class CalibrationSample:
    """Iterable of contract-2 batches (input_ids, attention_mask (batch, seq_len); labels
    all -100) holding ``num_samples`` training sequences of ``data_dir``."""
    data_dir: str
    num_samples: int
    seed: int
    batch_size: int = 16

    def _sequences(self, manifest: dict) -> Iterator[np.ndarray]:
        urls = D.shard_urls(self.data_dir, manifest, "train")
        order = np.random.default_rng([self.seed, _TAG_CALIBRATION]).permutation(len(urls))
        per_shard = math.ceil(self.num_samples / min(len(urls), SHARDS_SAMPLED))
        vocab_size = int(manifest["tokenizer"]["vocab_size"])
        taken = 0
        for i in order:
            for key, payload in itertools.islice(D.read_shard(urls[i]), per_shard):
                yield D.decode_ids(payload, urls[i], key, manifest["seq_len"], vocab_size)
                taken += 1
                if taken == self.num_samples:
                    return
        log.warning("calibration: the training shards of %s hold %d sequences, fewer than "
                    "student.calibration_samples=%d", self.data_dir, taken, self.num_samples)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        manifest = D.load_manifest(self.data_dir)
        seq_len = manifest["seq_len"]
        pad_id = int(manifest["tokenizer"]["special_ids"]["pad"])
        rows = []
        for ids in self._sequences(manifest):
            rows.append((ids, np.full_like(ids, D.IGNORE_INDEX)))
            if len(rows) == self.batch_size:
                yield D.collate(rows, seq_len, pad_id)
                rows = []
        if rows:
            yield D.collate(rows, seq_len, pad_id)


def calibration_for(cfg: StudentConfig, data_dir: Optional[str],
                    seed: int) -> Optional[CalibrationSample]:
    """The sample ``cfg`` needs (init=pruned), else None; reads nothing yet."""
    if cfg.init != "pruned" or data_dir is None:
        return None
    return CalibrationSample(str(data_dir), cfg.calibration_samples, seed)
