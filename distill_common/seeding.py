"""Random streams per (seed, rank), on every device.

Dropout must differ between data-parallel ranks (the same masks on every rank would
waste the extra ranks' noise) and be reproducible for a given seed and rank.
``torch.manual_seed`` seeds the CPU generator and every CUDA device's, so it is called
once per rank with a seed derived from (seed, rank), after everything that needs the
*shared* seed (model initialisation) has run under ``shared_seed``.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


def rank_seed(seed: int, rank: int) -> int:
    """A 63-bit seed for (seed, rank); distinct pairs give unrelated streams (seed + rank
    would make (0, 1) and (1, 0) the same)."""
    state = np.random.SeedSequence([int(seed), int(rank)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def seed_rank_streams(seed: int, rank: int) -> None:
    """Python, NumPy, torch CPU and every CUDA device: this rank's own streams."""
    s = rank_seed(seed, rank)
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)  # also every CUDA device (lazily, if CUDA is not yet initialised)


@contextlib.contextmanager
def shared_seed(seed: int) -> Iterator[None]:
    """Run a block (model construction, on the CPU) with the CPU generator seeded by
    ``seed``, then restore it: the per-rank streams seeded before are untouched
    afterwards. Only the CPU generator is touched: ``torch.manual_seed`` here would also
    (re)seed every CUDA device, which ``fork_rng(devices=[])`` does not restore, leaving
    every rank's CUDA dropout stream at the shared seed."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def capture_rng() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as plain types and tensors."""
    np_state = np.random.get_state(legacy=False)
    version, py_state, gauss = random.getstate()
    state = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": npy["key"].numpy().astype(np.uint32),
                                   "pos": npy["pos"]},
                         "has_gauss": npy["has_gauss"], "gauss": npy["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
