"""The contract between `distill prep` and its readers: the shard folder's layout.

``<data_dir>/manifest.json`` (written last by prep, so its presence means prep
finished), ``train/shard-*.tar`` and ``validation/shard-*.tar`` (WebDataset; each sample
holds ``input_ids.npy``, one packed sequence) and ``token_counts.npy``. ``data_dir`` is
a local folder or an fsspec URL. Prep writes it (data_prep/run.py); pretraining reads it
(distill_pretrain/data.py); both go through this module for paths and the format check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from distill_common.errors import DistillUserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKEN_COUNTS = "token_counts.npy"
REQUIRED_KEYS = ("tokenizer", "seq_len", "dtype", "splits")


class DataError(DistillUserError, RuntimeError):
    """Missing, corrupt or mismatched shards; the message names the shard and the fix."""


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def open_binary(path: str) -> IO[bytes]:
    if is_url(path):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path, "rb")


def join_path(root: str | Path, name: str) -> str:
    return f"{str(root).rstrip('/')}/{name}" if is_url(root) else str(Path(root) / name)


def load_manifest(data_dir: str | Path) -> dict:
    """Read and check ``manifest.json``; its absence means prep did not finish."""
    path = join_path(data_dir, MANIFEST)
    try:
        with open_binary(path) as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no manifest; the shards are missing or `distill prep` did "
                        f"not finish. Run `distill prep RECIPE` or set train.data_dir") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable manifest ({err}); re-run `distill prep`") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: not a manifest (a JSON object); re-run `distill prep`")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {manifest.get('format_version')!r} is not "
                        f"supported (this code reads {FORMAT_VERSION}); re-run `distill prep` "
                        f"with this version")
    for key in REQUIRED_KEYS:
        if key not in manifest:
            raise DataError(f"{path}: manifest has no '{key}'; it was not written by "
                            f"`distill prep` (format_version {FORMAT_VERSION})")
    return manifest


def shard_urls(data_dir: str | Path, manifest: dict, split: str) -> list[str]:
    """The split's shard paths, in manifest order; local ones must exist."""
    splits = manifest["splits"]
    if split not in splits or not splits[split].get("shards"):
        raise DataError(f"{join_path(data_dir, MANIFEST)}: no '{split}' shards; re-run "
                        f"`distill prep` (it writes train and validation splits)")
    urls = [join_path(data_dir, s["file"]) for s in splits[split]["shards"]]
    if not is_url(data_dir):
        for url in urls:
            if not Path(url).is_file():
                raise DataError(f"shard {url} listed in the manifest is missing; restore it "
                                f"or re-run `distill prep`")
    return urls


def shard_sample_counts(manifest: dict, split: str) -> list[int | None]:
    """Samples per shard of ``split`` as prep recorded them (None where unrecorded)."""
    return [s.get("samples") for s in manifest["splits"][split]["shards"]]


def listed_files(manifest: dict) -> list[tuple[str, str]]:
    """(relative file, sha256) of every shard and the token counts."""
    files = [(s["file"], s["sha256"]) for split in manifest["splits"].values()
             for s in split["shards"]]
    files.append((manifest["token_counts"]["file"], manifest["token_counts"]["sha256"]))
    return files


def fingerprint(manifest: dict) -> str:
    """A digest of what the shards hold (every file's sha256, the tokenizer, seq_len):
    checkpoints record it, so a resume onto re-prepared shards is caught."""
    import hashlib

    h = hashlib.sha256()
    for rel, digest in sorted(listed_files(manifest)):
        h.update(f"{rel}\0{digest}\n".encode())
    h.update(json.dumps({"tokenizer": manifest["tokenizer"].get("vocab_hash"),
                         "seq_len": manifest["seq_len"]}, sort_keys=True).encode())
    return h.hexdigest()
