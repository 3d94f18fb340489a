"""Compiled ops: built in a cache we own, never waited on in silence, verified before load.

DeepSpeed JIT-compiles its CPU shared-memory collective (``deepspeed_shm_comm``) on first
use, through torch's ``cpp_extension``, under a ``lock`` file in the build folder that
nothing removes when the compiling process is killed; every later run then waits on it
forever, printing nothing. Here:

- ``extensions_dir()``: where torch builds extensions. A ``TORCH_EXTENSIONS_DIR`` the user
  set is respected; otherwise ``$DISTILL_CACHE/torch_extensions/<python>_<cpu|cuXY>``,
  exported before DeepSpeed builds anything.
- ``clear_stale_locks()``: a ``lock`` no process on this host holds (open, as its working
  folder, or named by a running compiler) is stale: removed, with a warning naming it.
  On a shared filesystem another host may hold it, so there it must also have seen no
  activity for ``SHARED_STALE_S``.
- ``announce_wait()``: a watcher thread that says what a wait of more than a few seconds
  is waiting for, and clears a lock that goes stale meanwhile.
- ``use_extensions_dir()``, ``clear_stale_locks()`` and ``announce_wait()`` are what
  ``distill_pretrain.compiled_ops.prepare_compiled_ops()`` (the one call pretraining makes
  before DeepSpeed starts) is built from: DeepSpeed itself stays out of this layer.
- ``cached_build()``: our own compiled files (the relation kernel): one builder at a time
  (``flock``), SHA-256 recorded beside the file, checked before every load.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from distill_common.fsio import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

SHARED_STALE_S = 300.0
"""On a network filesystem: seconds without activity in a build folder after which a
lock no local process holds counts as stale (a build on another host writes files)."""
ANNOUNCE_AFTER_S = 5.0
ANNOUNCE_EVERY_S = 30.0
_NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph",
               "glusterfs", "9p", "afs", "panfs", "wekafs")


def extensions_dir() -> Path:
    """The folder torch builds extensions into (a user's TORCH_EXTENSIONS_DIR wins)."""
    if env := os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(env).expanduser()
    import torch

    from distill_common.assets import cache_dir

    accel = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    return cache_dir() / "torch_extensions" / f"{python}_{accel}"


def use_extensions_dir() -> Path:
    """Export TORCH_EXTENSIONS_DIR (ours unless the user set one) and return it."""
    root = extensions_dir()
    root.mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(root)
    return root


# ------------------------------------------------------------------ build locks

def _holders(build_dir: Path) -> list[tuple[int, str]]:
    """(pid, name) of the processes on this host working on ``build_dir``: the lock open
    (torch's build, this process included), the folder as their working directory
    (ninja), or its path on their command line (the compiler)."""
    import psutil

    lock, folder = str(build_dir / "lock"), str(build_dir)
    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            busy = any(f.path == lock for f in proc.open_files())
            if not busy and proc.pid != os.getpid():
                cwd = proc.cwd()
                busy = (cwd == folder or cwd.startswith(folder + os.sep)
                        or any(folder in arg for arg in proc.cmdline()))
        except psutil.Error:
            continue
        if busy:
            found.append((proc.pid, proc.info["name"]))
    return found


def _mount_type(path: Path) -> str:
    import psutil

    path_str, best, fstype = str(path.resolve()), "", ""
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint.rstrip("/") or "/"
        inside = path_str == mount or path_str.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fstype = mount, part.fstype
    return fstype


def _on_shared_filesystem(path: Path) -> bool:
    fstype = _mount_type(path)
    return fstype.startswith(_NETWORK_FS) or fstype.startswith("fuse.")


def _quiet_seconds(folder: Path) -> float:
    """Seconds since anything in ``folder`` changed."""
    mtimes = [folder.stat().st_mtime]
    mtimes += [p.stat().st_mtime for p in folder.iterdir() if p.exists()]
    return time.time() - max(mtimes)


def _is_stale(lock: Path) -> bool:
    if _holders(lock.parent):
        return False
    # torch releases a lock by closing it, then deleting it: a lock seen between the two
    # is gone a moment later.
    time.sleep(1.0)
    if not lock.exists() or _holders(lock.parent):
        return False
    if _on_shared_filesystem(lock):
        return _quiet_seconds(lock.parent) >= SHARED_STALE_S
    return True


def clear_stale_locks(root: Path | None = None) -> list[Path]:
    """Remove the build locks under ``root`` (default: ``extensions_dir()``) that no
    build holds any more; return them."""
    root = root or extensions_dir()
    cleared = []
    for lock in sorted(root.glob("*/lock")) if root.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            if _is_stale(lock):
                lock.unlink()
                cleared.append(lock)
                log.warning("removed a stale build lock %s: the build that made it was "
                            "killed (no process holds it), and every later run would have "
                            "waited on it forever", lock)
    return cleared


def describe_build(build_dir: Path) -> str:
    """What a build folder is doing now, for a waiting message."""
    import psutil

    ours = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
    holders = _holders(build_dir)
    listed = ", ".join(f"pid {pid} ({name})" for pid, name in holders[:4])
    if any(pid in ours for pid, _ in holders):
        return f"compiling in {build_dir}: {listed}"
    if holders:
        return f"another process builds in {build_dir}: {listed}"
    if (build_dir / "lock").exists():
        return f"{build_dir}/lock is held by no process on this host (another host?)"
    return f"{build_dir}: no build running"


@contextlib.contextmanager
def announce_wait(what: str, details: Callable[[], str] | None = None,
                  build_dir: Path | None = None) -> Iterator[list[Path]]:
    """Log what we are waiting for if the body takes more than ``ANNOUNCE_AFTER_S``, then
    every ``ANNOUNCE_EVERY_S``. With ``build_dir``, its lock is removed if it goes stale
    meanwhile; the list yielded collects the locks removed."""
    done = threading.Event()
    started = time.monotonic()
    cleared: list[Path] = []

    def watch() -> None:
        delay = ANNOUNCE_AFTER_S
        while not done.wait(delay):
            extra = details() if details else ""
            log.warning("still waiting after %.0f s for %s%s", time.monotonic() - started,
                        what, f": {extra}" if extra else "")
            if build_dir is not None and build_dir.is_dir():
                cleared.extend(clear_stale_locks(build_dir.parent))
            delay = ANNOUNCE_EVERY_S

    thread = threading.Thread(target=watch, name="distill-wait-watcher", daemon=True)
    thread.start()
    try:
        yield cleared
    finally:
        done.set()
        thread.join()


# ------------------------------------------------------------------ our own builds

@contextlib.contextmanager
def exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """One holder at a time across processes (an ``flock``, released by the kernel when
    its holder dies, so it can never go stale); waiting is announced."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with announce_wait(f"another process building {what} (lock {lock_path})"):
                fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _hash_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def hash_matches(path: Path) -> bool:
    """Whether ``path`` still has the SHA-256 recorded when we built it."""
    recorded = _hash_file(path)
    if not (path.is_file() and recorded.is_file()):
        return False
    return recorded.read_text().split()[0:1] == [sha256_file(path)]


def cached_build(target: Path, build: Callable[[Path], None], what: str) -> Path:
    """``target``, built by ``build(tmp_path)`` unless a build whose SHA-256 we recorded is
    already there. A file that does not match its record (changed, truncated, or never
    recorded) is rebuilt, with a warning, rather than loaded."""
    with exclusive(target.with_name(f"{target.name}.lock"), what):
        if hash_matches(target):
            return target
        if target.exists() and not _hash_file(target).exists():
            log.warning("%s has no SHA-256 record (built by an older version, or not by "
                        "us): building it again instead of loading it", target)
        elif target.exists():
            log.warning("%s does not match the SHA-256 recorded when it was built (changed "
                        "or damaged since): building it again instead of loading it", target)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=target.suffix,
                                   dir=target.parent)
        os.close(fd)
        try:
            with announce_wait(f"{what} to compile into {target}"):
                build(Path(tmp))
            digest = sha256_file(tmp)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        atomic_write_text(_hash_file(target), f"{digest}  {target.name}\n")
    return target
