"""Writing WebDataset shards byte-for-byte reproducibly, to a folder or an fsspec URL.

Tar headers carry no clock, user or host: mtime 0, uid/gid 0, empty owner names, mode
0644, so the same sequences always give the same bytes. Every file is written under a
temporary name and renamed when complete, so a shard that exists is a whole shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import tarfile
import uuid
from typing import Iterable, Iterator

import numpy as np


class Output:
    """The output folder: a local path or an fsspec URL (memory://, file://, s3://)."""

    def __init__(self, url: str):
        import fsspec

        self.fs, root = fsspec.core.url_to_fs(url.rstrip("/"))
        self.root = root.rstrip("/")
        # Workers may run in another folder: hand them an absolute path or a full URL.
        local = "file" in self.fs.protocol or "local" in self.fs.protocol
        self.is_local = local
        self.url = self.root if local else self.fs.unstrip_protocol(self.root)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as f:
            return f.read()

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(self.path(rel), "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self.path(rel))

    def remove_tree(self, folder: str) -> None:
        if self.exists(folder):
            self.fs.rm(self.path(folder), recursive=True)

    def list(self, folder: str) -> list[str]:
        """Relative names of the files directly in ``folder`` (empty if it is absent)."""
        if not self.exists(folder):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1]
                      for p in self.fs.ls(self.path(folder), detail=False))

    @contextlib.contextmanager
    def atomic_open(self, rel: str) -> Iterator[io.RawIOBase]:
        """Write ``rel`` under a temporary name beside it; rename on success only."""
        final = self.path(rel)
        parent = final.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{final.rsplit('/', 1)[1]}"
        try:
            with self.fs.open(tmp, "wb") as f:
                yield f
            self.fs.mv(tmp, final)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm(tmp)
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.atomic_open(rel) as f:
            f.write(data)

    def remove_stale_temps(self, folder: str) -> None:
        for name in self.list(folder):
            if name.startswith(".tmp-"):
                self.remove(f"{folder}/{name}")


class _HashingWriter(io.RawIOBase):
    """Forwards writes to ``sink`` and keeps the sha256 and size of what went through."""

    def __init__(self, sink):
        self.sink, self.digest, self.size = sink, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def sample_key(shard_index: int, sample_index: int) -> str:
    return f"{shard_index:06d}-{sample_index:07d}"


# Little-endian on disk whatever the machine, so shards hash the same everywhere.
DISK_DTYPES = {"uint16": np.dtype("<u2"), "int32": np.dtype("<i4")}
TAR_BLOCK, TAR_RECORD = 512, 20 * 512


# The header bytes that are the same for every member: mode 0644, uid/gid 0, mtime 0,
# regular file, ustar magic; name, size and checksum are filled in per member.
_USTAR_MODE_IDS = b"0000644\x00" + b"0000000\x00" * 2          # [100:124]
_USTAR_MTIME = b"00000000000\x00"                               # [136:148]
_USTAR_AFTER_SUM = b"0" + bytes(100) + b"ustar\x0000" + bytes(247)  # [156:512]
# The checksum is the byte sum of the header with its own field as 8 spaces.
_USTAR_FIXED_SUM = sum(_USTAR_MODE_IDS) + sum(_USTAR_MTIME) + sum(_USTAR_AFTER_SUM) + 8 * 32


def ustar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header with no clock and no owner: mode 0644, uid/gid 0, mtime 0.

    Built by hand because tarfile's generic header code costs more than the sample it
    describes at our sample sizes; the layout is the standard one tarfile also reads.
    Only the name and size are summed per member: the rest of the checksum is fixed."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    size_field = b"%011o\x00" % size
    checksum = _USTAR_FIXED_SUM + sum(raw) + sum(size_field)
    return b"".join((raw, bytes(100 - len(raw)), _USTAR_MODE_IDS, size_field, _USTAR_MTIME,
                     b"%06o\x00 " % checksum, _USTAR_AFTER_SUM))


def _npy_header(dtype: np.dtype, length: int, cache: dict) -> bytes:
    key = (dtype.str, length)
    if key not in cache:  # np.save's own header, taken from an empty array of that shape
        cache[key] = npy_bytes(np.zeros(length, dtype=dtype))[:-length * dtype.itemsize or None]
    return cache[key]


def write_shard(out: Output, rel: str, shard_index: int, sequences: Iterable[np.ndarray],
                dtype: str) -> dict:
    """Write one shard of samples ``{key}.input_ids.npy`` (1-D arrays of ``dtype``);
    returns its manifest entry (file, samples, tokens, sha256, bytes)."""
    disk_dtype = DISK_DTYPES[dtype]
    headers: dict = {}
    samples = tokens = 0
    with out.atomic_open(rel) as f:
        writer = _HashingWriter(f)
        for seq in sequences:
            seq = np.asarray(seq)
            data = _npy_header(disk_dtype, len(seq), headers) + \
                seq.astype(disk_dtype, copy=False).tobytes()
            name = f"{sample_key(shard_index, samples)}.input_ids.npy"
            writer.write(ustar_header(name, len(data)) + data +
                         bytes(-len(data) % TAR_BLOCK))
            samples += 1
            tokens += len(seq)
        end = 2 * TAR_BLOCK  # end-of-archive, then pad to a whole record like tar does
        writer.write(bytes(end + (-(writer.size + end) % TAR_RECORD)))
    return {"file": rel, "samples": samples, "tokens": tokens,
            "sha256": writer.digest.hexdigest(), "bytes": writer.size}


def read_shard(out: Output, rel: str) -> list[np.ndarray]:
    """The sequences of a shard in order (for checks and tests; the trainer streams)."""
    seqs = []
    with tarfile.open(fileobj=io.BytesIO(out.read_bytes(rel)), mode="r") as tar:
        for member in tar:
            seqs.append(np.load(io.BytesIO(tar.extractfile(member).read())))
    return seqs
