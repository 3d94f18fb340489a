"""manifest.json: what the shards hold and how they were made; `verify` re-hashes them.
The layout and the format check are the shared contract in distill_common.manifest."""

from __future__ import annotations

from data_prep.shards import Output
from distill_common.manifest import (FORMAT_VERSION, MANIFEST, TOKEN_COUNTS, listed_files,
                                     load_manifest)

__all__ = ["FORMAT_VERSION", "MANIFEST", "TOKEN_COUNTS", "read_manifest", "verify"]


def read_manifest(folder: str) -> dict:
    return load_manifest(folder)


def verify(folder: str) -> list[str]:
    """Re-hash every file the manifest lists; returns those missing or differing."""
    manifest = read_manifest(folder)
    out = Output(folder)
    return [rel for rel, digest in listed_files(manifest)
            if not out.exists(rel) or out.sha256(rel) != digest]
