"""FolderLock with real processes: a live holder (in another process) excludes with a
message naming it, a SIGKILLed holder's lock is taken over with a warning, a holder's
forked child keeps it, and the record-only fallback judges PIDs on this host."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from cli_process import child_env
from distill_common.folder_lock import (LOCK_NAME, FolderInUseUserError, FolderLock,
                                        _holder_is_alive, lock_holder)

# Takes the lock, then (with FORK) forks a child that keeps the lock's open file and exits
# itself; prints the PID that sleeps holding it and waits to be killed.
HOLDER = """
import os, sys, time
from distill_common.folder_lock import FolderLock
lock = FolderLock(sys.argv[1], what="prep", command="distill prep holder.yaml").acquire()
if len(sys.argv) > 2:
    if os.fork():
        os._exit(0)
print(os.getpid(), flush=True)
time.sleep(600)
"""


def start_holder(folder, fork: bool = False) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)]
                            + (["fork"] if fork else []),
                            env=child_env(), stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def kill(pid: int) -> None:
    """SIGKILL ``pid`` and wait until it is gone (it may not be our child)."""
    import psutil

    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).wait(timeout=10)


def test_a_second_lock_in_this_process_is_refused_then_free_after_release(tmp_path):
    folder = tmp_path / "out"
    with FolderLock(folder, what="prep", command="distill prep a.yaml") as lock:
        assert lock.held
        record = lock_holder(folder)
        assert (record["what"], record["pid"], record["host"], record["command"]) == \
            ("prep", os.getpid(), socket.gethostname(), "distill prep a.yaml")
        with pytest.raises(FolderInUseUserError) as err:
            FolderLock(folder, what="prep").acquire()
        assert err.value.holder["pid"] == os.getpid()
    assert not (folder / LOCK_NAME).exists()
    with FolderLock(folder, what="pretrain"):
        assert lock_holder(folder)["what"] == "pretrain"


def test_a_live_holder_in_another_process_is_named_in_the_error(tmp_path):
    proc, pid = start_holder(tmp_path)
    try:
        with pytest.raises(FolderInUseUserError) as err:
            FolderLock(tmp_path, what="prep").acquire()
        message = str(err.value)
        assert f"{tmp_path} is in use by prep PID {pid} on host {socket.gethostname()}" \
            in message
        assert "distill prep holder.yaml" in message and "another output folder" in message
        assert "\n" not in message
    finally:
        kill(proc.pid)
        proc.wait()


def test_the_lock_of_a_sigkilled_holder_is_taken_over_with_a_warning(tmp_path, caplog):
    proc, pid = start_holder(tmp_path)
    kill(pid)
    proc.wait()
    assert lock_holder(tmp_path)["pid"] == pid  # the record outlives its process
    with FolderLock(tmp_path, what="prep"):
        assert lock_holder(tmp_path)["pid"] == os.getpid()
    assert f"taking over the lock left by prep PID {pid}" in caplog.text
    assert "that process is gone" in caplog.text


def test_a_child_that_inherited_the_lock_keeps_it_after_its_parent_died(tmp_path):
    """flock belongs to the open file, which a forked child shares: its parent's PID is
    gone, yet the folder is still in use, and the message says so."""
    proc, child = start_holder(tmp_path, fork=True)
    proc.wait()  # the process that took the lock has exited
    holder = lock_holder(tmp_path)["pid"]
    try:
        assert holder != child
        with pytest.raises(FolderInUseUserError, match=rf"PID {holder} is gone, but a "
                                                       rf"process it started still holds"):
            FolderLock(tmp_path, what="prep").acquire()
    finally:
        kill(child)
    FolderLock(tmp_path, what="prep").acquire().release()


def test_record_only_fallback_judges_pids_on_this_host():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host, now = socket.gethostname(), time.time()
    assert not _holder_is_alive({"host": host, "pid": gone.pid, "started_unix": now})
    assert _holder_is_alive({"host": host, "pid": os.getpid(), "started_unix": now})
    # this PID, but the record is older than this process: the PID was reused since
    assert not _holder_is_alive({"host": host, "pid": os.getpid(), "started_unix": 1.0})
    assert _holder_is_alive({"host": "another-host", "pid": gone.pid, "started_unix": now})


def test_the_record_is_json_with_the_holder(tmp_path):
    with FolderLock(tmp_path, what="prep", command="distill prep r.yaml prep.sources="
                    "[https://h/a.txt?sig=SECRET]"):
        text = (tmp_path / LOCK_NAME).read_text()
    record = json.loads(text)
    assert set(record) == {"what", "host", "pid", "started", "started_unix", "command"}
    assert "SECRET" not in text and "https://h/a.txt" in text
