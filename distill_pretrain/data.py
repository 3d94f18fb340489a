"""Reading the shards of `distill prep` (contract 1, see distill_common.manifest): their
samples, the tokenizer check, the token counts.

The tar reader is our own and small: a loader worker must read >= 10,000 samples/s,
and a sample (one ``KEY.input_ids.npy`` member of ~0.5 KB) read through ``tarfile`` and
``np.load`` costs tens of microseconds in headers alone. It parses the 512-byte headers
(ustar, with the pax and GNU long-name extensions other writers use), checks each
header's checksum, can skip samples by seeking past their payloads (a shard shared by
several readers is split into contiguous parts, each reading only its own payloads),
and decodes ``.npy`` payloads with one parse per distinct header.
"""

from __future__ import annotations

import ast
import io
import logging
from typing import BinaryIO, Iterator

import numpy as np

from distill_common.manifest import DataError, join_path, open_binary

log = logging.getLogger(__name__)

__all__ = ["DataError", "read_shard", "decode_ids", "check_tokenizer", "load_token_counts"]

_BLOCK = 512
_PAYLOAD_SUFFIX = "input_ids.npy"


class _TarError(Exception):
    pass


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\x00 ").lstrip(b" ")
    if not field:
        return 0
    if field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field, "big") & ~(0x80 << (8 * (len(field) - 1)))
    try:
        return int(field, 8)
    except ValueError:
        raise _TarError(f"bad number field {field[:12]!r}") from None


def _check_header(header: bytes) -> None:
    stored = _octal(header[148:156])
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if stored != computed:
        raise _TarError("header checksum mismatch (the file is damaged or not a tar)")


def _pax_path(data: bytes) -> str | None:
    for record in data.split(b"\n"):
        _, _, kv = record.partition(b" ")
        key, eq, value = kv.partition(b"=")
        if eq and key == b"path":
            return value.decode("utf-8")
    return None


def _members(f: BinaryIO) -> Iterator[tuple[str, int]]:
    """(name, size) of each regular member; the file is positioned at its payload, which
    the caller must read or skip (``_skip``) before the next iteration."""
    long_name = None
    while True:
        header = f.read(_BLOCK)
        if len(header) < _BLOCK:
            if header.strip(b"\x00"):
                raise _TarError("truncated header")
            return  # EOF without the end-of-archive blocks: accept, like tarfile
        if not header.strip(b"\x00"):
            return  # end-of-archive
        _check_header(header)
        size, kind = _octal(header[124:136]), header[156:157]
        if kind in (b"x", b"L", b"g"):  # pax / GNU long-name data before the real header
            data = f.read(size + (-size % _BLOCK))
            if len(data) < size:
                raise _TarError("truncated extended header")
            if kind == b"x":
                long_name = _pax_path(data[:size]) or long_name
            elif kind == b"L":
                long_name = data[:size].rstrip(b"\x00").decode("utf-8")
            continue
        name = long_name
        long_name = None
        if name is None:
            name = header[:100].rstrip(b"\x00").decode("utf-8")
            if header[257:262] == b"ustar" and header[345:500].strip(b"\x00"):
                name = header[345:500].rstrip(b"\x00").decode("utf-8") + "/" + name
        if kind in (b"0", b"\x00", b"7"):
            yield name, size
        else:  # directories, links: no payload of ours
            _skip(f, size)


def _skip(f: BinaryIO, size: int) -> None:
    padded = size + (-size % _BLOCK)
    if padded:
        f.seek(padded, io.SEEK_CUR)


def _read_payload(f: BinaryIO, size: int) -> bytes:
    data = f.read(size + (-size % _BLOCK))
    if len(data) < size:
        raise _TarError("truncated member")
    return data[:size]


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's key / suffix split: at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix


def read_shard(url: str, skip: int = 0, limit: int | None = None
               ) -> Iterator[tuple[str, bytes]]:
    """(key, raw input_ids.npy bytes) of one WebDataset shard, in file order, from sample
    ``skip`` on (earlier payloads are seeked over, not read), at most ``limit``."""
    index, key, payload = 0, None, None
    try:
        with open_binary(url) as f:
            for name, size in _members(f):
                sample_key, suffix = _split_name(name)
                if sample_key != key:
                    if key is not None:
                        if index >= skip:
                            yield key, _require(payload, url, key)
                        index += 1
                        if limit is not None and index >= skip + limit:
                            return
                    key, payload = sample_key, None
                if index >= skip and suffix == _PAYLOAD_SUFFIX:
                    payload = _read_payload(f, size)
                else:
                    _skip(f, size)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"shard {url} is missing; restore it or re-run `distill prep`") from None
    except (_TarError, OSError, UnicodeDecodeError, ValueError) as err:
        where = f" after sample {key}" if key else ""
        raise DataError(f"shard {url} is corrupt or unreadable{where}: {err}; re-run "
                        f"`distill prep` (or `distill prep verify DIR` to check every "
                        f"shard's sha256)") from None
    if key is not None and index >= skip:
        yield key, _require(payload, url, key)


def _require(payload: bytes | None, url: str, key: str) -> bytes:
    if payload is None:
        raise DataError(f"shard {url}: sample {key} has no input_ids.npy; re-run `distill prep`")
    return payload


# --- .npy payloads --------------------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY"
_header_cache: dict[bytes, tuple[np.dtype, int]] = {}


def _npy_layout(payload: bytes) -> tuple[np.dtype, int, int]:
    """(dtype, element count, data offset) of a 1-D C-order .npy payload."""
    if payload[:6] != _NPY_MAGIC:
        raise ValueError("not a .npy payload")
    major = payload[6]
    if major == 1:
        header_len, start = int.from_bytes(payload[8:10], "little"), 10
    elif major in (2, 3):
        header_len, start = int.from_bytes(payload[8:12], "little"), 12
    else:
        raise ValueError(f"unknown .npy version {major}")
    header = payload[start:start + header_len]
    cached = _header_cache.get(header)
    if cached is None:
        if len(_header_cache) > 4096:
            _header_cache.clear()
        meta = ast.literal_eval(header.decode("latin1"))
        if meta.get("fortran_order") or len(meta.get("shape", ())) != 1:
            raise ValueError(f"expected a 1-D C-order array, header {meta}")
        dtype = np.dtype(meta["descr"])
        if dtype.hasobject:
            raise ValueError("object arrays are not token ids")
        cached = _header_cache[header] = (dtype, int(meta["shape"][0]))
    dtype, count = cached
    return dtype, count, start + header_len


def decode_ids(payload: bytes, url: str, key: str, seq_len: int,
               vocab_size: int | None = None) -> np.ndarray:
    """A sample's token ids as int64 (seq,), checked against seq_len and the vocabulary."""
    try:
        dtype, count, offset = _npy_layout(payload)
        ids = np.frombuffer(payload, dtype=dtype, count=count, offset=offset)
    except Exception as err:
        raise DataError(f"shard {url}: sample {key}: input_ids.npy is corrupt ({err})") from None
    if not 1 <= len(ids) <= seq_len:
        raise DataError(f"shard {url}: sample {key}: input_ids has shape {ids.shape}, "
                        f"expected a 1-D array of at most seq_len={seq_len} ids")
    ids = ids.astype(np.int64)
    if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
        raise DataError(f"shard {url}: sample {key}: token id {int(ids.max())} outside the "
                        f"vocabulary (size {vocab_size}); the shard is corrupt or from "
                        f"another tokenizer; re-run `distill prep`")
    return ids


# --- what the shards were made with ---------------------------------------------------------


def check_tokenizer(manifest: dict, tokenizer, data_dir: str, teacher_path: str) -> None:
    """The shards must have been tokenized with the teacher's vocabulary."""
    from distill_common.textnorm import vocab_hash

    shards_tok = manifest["tokenizer"]
    teacher_hash = vocab_hash(tokenizer)
    shards_hash = str(shards_tok.get("vocab_hash"))
    if shards_hash != teacher_hash:
        raise DataError(
            f"{join_path(data_dir, 'manifest.json')}: the shards were tokenized with "
            f"'{shards_tok.get('name_or_path')}' (vocab_hash {shards_hash[:12]}, "
            f"{shards_tok.get('vocab_size')} tokens) but the teacher {teacher_path} uses a "
            f"different vocabulary (vocab_hash {teacher_hash[:12]}, {len(tokenizer)} tokens). "
            f"Re-run `distill prep` with the teacher's tokenizer or point train.data_dir at "
            f"matching shards")


def load_token_counts(data_dir: str, manifest: dict) -> np.ndarray:
    entry = manifest.get("token_counts") or {"file": "token_counts.npy"}
    path = join_path(data_dir, entry["file"])
    try:
        with open_binary(path) as f:
            counts = np.load(io.BytesIO(f.read()), allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read token counts ({err}); they are needed by "
                        f"train.mask_selection=frequency. Re-run `distill prep` or use "
                        f"train.mask_selection=uniform") from None
    vocab_size = manifest["tokenizer"]["vocab_size"]
    if counts.ndim != 1 or len(counts) != vocab_size:
        raise DataError(f"{path}: shape {counts.shape} does not match vocab_size {vocab_size}")
    return counts.astype(np.int64)
