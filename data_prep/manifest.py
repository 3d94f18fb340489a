"""manifest.json: what the shards hold and how they were made; `verify` re-hashes them."""

from __future__ import annotations

import json

from data_prep.errors import PrepError
from data_prep.shards import Output

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKEN_COUNTS = "token_counts.npy"


def read_manifest(folder: str) -> dict:
    out = Output(folder)
    if not out.exists(MANIFEST):
        raise PrepError(f"{out.path(MANIFEST)}: no manifest; the folder is not a finished "
                        f"prep output (rerun `distill prep` to complete it)")
    try:
        manifest = json.loads(out.read_bytes(MANIFEST))
    except (ValueError, UnicodeDecodeError) as err:
        raise PrepError(f"{out.path(MANIFEST)}: not valid JSON ({err}); rerun `distill "
                        f"prep`") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PrepError(f"{out.path(MANIFEST)}: format_version "
                        f"{manifest.get('format_version')!r}, this code reads "
                        f"{FORMAT_VERSION}; rerun `distill prep` with this version")
    return manifest


def listed_files(manifest: dict) -> list[tuple[str, str]]:
    """(relative file, sha256) of every shard and the token counts."""
    files = [(s["file"], s["sha256"]) for split in manifest["splits"].values()
             for s in split["shards"]]
    files.append((manifest["token_counts"]["file"], manifest["token_counts"]["sha256"]))
    return files


def verify(folder: str) -> list[str]:
    """Re-hash every file the manifest lists; returns those missing or differing."""
    manifest = read_manifest(folder)
    out = Output(folder)
    return [rel for rel, digest in listed_files(manifest)
            if not out.exists(rel) or out.sha256(rel) != digest]
