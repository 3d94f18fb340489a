"""Loading Hugging Face models without transformers' per-load chatter."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def quiet_hf_loading() -> Iterator[None]:
    """transformers prints a load report listing every fresh head weight as MISSING, and a
    progress bar, on each load; we check the loading info ourselves and say what matters."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
