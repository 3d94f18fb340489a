"""Corpus -> tokenized, packed WebDataset shards with a manifest, in parallel on Ray.

``run_prep(cfg, tokenizer_path, *, ray_address=None, workers=None) -> manifest`` and
``verify(folder) -> [bad files]`` are the API; both import their (heavy) modules on first
call, so importing this package stays cheap.
"""

from __future__ import annotations


def run_prep(cfg, tokenizer_path: str, *, ray_address: str | None = None,
             workers: int | None = None) -> dict:
    from data_prep.run import run_prep as _run_prep

    return _run_prep(cfg, tokenizer_path, ray_address=ray_address, workers=workers)


def verify(folder: str) -> list[str]:
    from data_prep.manifest import verify as _verify

    return _verify(folder)


__all__ = ["run_prep", "verify"]
