"""One run per output folder: an exclusive lock on ``<folder>/.lock``.

Two runs writing one folder delete each other's temporary files, shards and checkpoints.
``with FolderLock(folder, what="prep"):`` makes the second one stop at once with a message
naming the holder (host, PID, start time, command) instead.

How it holds:

- ``fcntl.flock`` on the kept-open lock file is what excludes. The kernel drops it when
  the holder dies, however it dies (SIGKILL included), so a dead run never blocks the next
  one; on NFS, Linux maps it to a server-side lock that the server also drops.
- The file also records who holds it, for the message. A record found in a file whose
  flock is free is what a killed run left: it is taken over with a warning.
- Where the filesystem refuses flock (some FUSE and parallel filesystems), the record
  alone decides: a holder on this host whose PID is gone (or was reused since) is stale;
  a holder on another host cannot be checked and is believed. That fallback is advisory
  (two runs starting in the same instant can both pass it) and says so in a warning.

Multi-process runs take it in one process only (rank 0), before the others start
writing: ``lock = FolderLock(out, "pretrain").acquire() if rank == 0 else None``, then
``lock.release()`` at the end (or use ``with`` on rank 0). A second ``acquire`` of the
same folder, even in the same process, fails: the lock is per open file, not per process.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from distill_common.errors import DistillUserError
from distill_common.urls import redact_text

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class FolderInUseUserError(DistillUserError, RuntimeError):
    """Another live run holds the folder; ``holder`` is its record (may be empty)."""

    def __init__(self, message: str, holder: Optional[dict] = None):
        super().__init__(message)
        self.holder = holder or {}

    def __reduce__(self):
        return (type(self), (str(self), self.holder))


def lock_holder(folder: str | os.PathLike) -> Optional[dict]:
    """The record in ``<folder>/.lock`` (the holder, or a dead run's leftover), if any."""
    try:
        return _parse_record(Path(folder, LOCK_NAME).read_bytes())
    except FileNotFoundError:
        return None


def _parse_record(blob: bytes) -> Optional[dict]:
    try:
        record = json.loads(blob.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None  # empty (being written) or not ours
    return record if isinstance(record, dict) else None


def _describe(record: Optional[dict]) -> str:
    if not record:
        return "a process that has not recorded itself yet"
    started = record.get("started", "?")
    return (f"{record.get('what', 'a run')} PID {record.get('pid', '?')} on host "
            f"{record.get('host', '?')} (started {started}: {record.get('command', '?')})")


def _pid_is_alive(pid: int, started_unix: Optional[float]) -> bool:
    """On this host: is ``pid`` still the process that started at ``started_unix``?"""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # exited, not yet reaped
            return False
        # A PID reused since: its process started after the record was written.
        return started_unix is None or process.create_time() <= started_unix + 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # access denied: it exists
        return True


def _holder_is_alive(record: Optional[dict]) -> bool:
    if not record:
        return True  # a holder between creating the file and writing its record
    if record.get("host") != socket.gethostname():
        return True  # cannot be checked from here
    try:
        return _pid_is_alive(int(record["pid"]), record.get("started_unix"))
    except (KeyError, TypeError, ValueError):
        return True


class FolderLock:
    """``with FolderLock(folder, what="prep"):`` -- exclusive use of ``folder`` (created
    if missing) by this process; raises :class:`FolderInUseUserError` if a live run has
    it. ``what`` names the kind of run in the holder's record and in messages."""

    def __init__(self, folder: str | os.PathLike, what: str, command: Optional[str] = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.command = redact_text(command or _this_command())
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FolderLock":
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: this FolderLock is already held")
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                previous = self._lock_or_raise(fd)
            except BaseException:
                os.close(fd)
                raise
            if self._is_current(fd):
                break
            os.close(fd)  # the holder released (unlinked) it while we opened: again
        self._fd = fd
        if previous:
            log.warning("%s: taking over the lock left by %s: that process is gone",
                        self.folder, _describe(previous))
        self._write_record(fd)
        return self

    def _lock_or_raise(self, fd: int) -> Optional[dict]:
        """Lock ``fd``; returns the record a dead holder left (None if none)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._in_use(_parse_record(_read_all(fd)), flock=True) from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            record = _parse_record(_read_all(fd))
            log.warning("%s: this filesystem refuses file locks (%s); relying on the "
                        "recorded holder alone, which cannot stop two runs started at "
                        "the same instant", self.folder, err.strerror)
            if record and _holder_is_alive(record):
                raise self._in_use(record, flock=False) from None
            return record
        return _parse_record(_read_all(fd))

    def _in_use(self, record: Optional[dict], flock: bool) -> FolderInUseUserError:
        note = ""
        if flock and record and record.get("host") == socket.gethostname() \
                and not _holder_is_alive(record):
            note = (f" (PID {record.get('pid')} is gone, but a process it started still "
                    f"holds the lock: stop that one)")
        elif not flock:
            note = f" (if no run is using it, delete {self.path})"
        return FolderInUseUserError(
            f"{self.folder} is in use by {_describe(record)}{note}; two runs on one "
            f"folder overwrite each other's files: wait for that run to finish, stop it, "
            f"or give this run another output folder", record)

    def _is_current(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _write_record(self, fd: int) -> None:
        now = time.time()
        record = {"what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
                  "started_unix": now, "command": self.command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (the file first: see ``acquire``)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._is_current(fd):
                os.unlink(self.path)
        finally:
            os.close(fd)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _this_command() -> str:
    program = Path(sys.argv[0])
    name = f"python -m {program.parent.name}" if program.name == "__main__.py" \
        else program.name
    return " ".join([name] + sys.argv[1:])


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, min(size, 1 << 16), 0)


__all__ = ["FolderInUseUserError", "FolderLock", "LOCK_NAME", "lock_holder"]
