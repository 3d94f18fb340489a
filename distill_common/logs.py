"""Logging set up once, at the entry point, rank-aware. Never configured at import."""

from __future__ import annotations

import logging
import os
import sys


def current_rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def setup_logging(verbose: bool = False, all_ranks: bool | None = None) -> None:
    """Rank 0 logs at INFO (DEBUG with ``verbose``); other ranks only warnings unless
    ``all_ranks`` (or ``DISTILL_LOG_ALL_RANKS=1``)."""
    if all_ranks is None:
        all_ranks = os.environ.get("DISTILL_LOG_ALL_RANKS", "") == "1"
    rank = current_rank()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    level = logging.DEBUG if verbose else logging.INFO
    if rank != 0 and not all_ranks:
        level = logging.WARNING
    prefix = f"[rank {rank}] " if world > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s {prefix}%(levelname).1s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Chatty third-party loggers stay at warnings.
    for name in ("urllib3", "filelock", "fsspec", "matplotlib", "PIL", "torch.distributed",
                 "DeepSpeed", "datasets", "transformers"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
