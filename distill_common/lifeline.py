"""Processes that die with the `distill` command that started them.

`distill launch` / `distill run` start torchrun (or DeepSpeed's runner, or a stage), which
starts the ranks, in sessions of their own (torchrun does): a launcher killed with
SIGKILL used to leave every rank running. Two mechanisms (Linux; elsewhere they do
nothing):

- The launcher's direct children get a parent-death signal (``die_with_parent`` as the
  ``preexec_fn`` of ``subprocess``): SIGTERM when the launcher dies, which torchrun and
  DeepSpeed's runner answer by stopping their ranks.
- Every rank calls ``install_lifeline()`` first thing. It sets a parent-death signal on
  itself when an agent started it (torchrun, DeepSpeed's per-node launcher, our
  launcher); and when the launcher passed its PID (``child_env()``), a watchdog thread
  polls it, because SIGKILL reaches only the launcher and the agent in between may live
  on. When it is gone the rank gets SIGTERM (training saves a checkpoint and stops) and,
  ``GRACE_S`` later, SIGKILL for its process group.

A parent-death signal fires when the *thread* that forked the process exits, not the
process: the launcher forks from its main thread, which lives as long as it does.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time

log = logging.getLogger(__name__)

LAUNCHER_PID_ENV = "DISTILL_LAUNCHER_PID"
"""PID of the launcher whose death stops this process."""
LAUNCHER_HOST_ENV = "DISTILL_LAUNCHER_HOST"
"""Host name of that launcher: a PID means nothing on another machine."""
DIE_WITH_PARENT_ENV = "DISTILL_DIE_WITH_PARENT"
"""`1`: take a parent-death signal even without torchrun (DeepSpeed's per-node launcher)."""
GRACE_S = 10.0
"""Seconds between the SIGTERM (time to save a checkpoint) and the SIGKILL."""
POLL_S = 1.0
_PR_SET_PDEATHSIG = 1
_installed = threading.Event()


def _prctl():
    """libc's prctl, looked up before any fork (a forked child must not load libraries)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent thread exits.
    Safe as a ``preexec_fn`` (one system call, nothing allocated)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def child_env() -> dict[str, str]:
    """Variables that tie a child's ranks to this process (see ``install_lifeline``)."""
    return {LAUNCHER_PID_ENV: str(os.getpid()), LAUNCHER_HOST_ENV: socket.gethostname()}


def untied(env: dict[str, str]) -> dict[str, str]:
    """``env`` without the tie to a launcher, for work that must outlive it (a batch job)."""
    return {k: v for k, v in env.items() if k not in (LAUNCHER_PID_ENV, LAUNCHER_HOST_ENV)}


def _started_by_agent() -> bool:
    env = os.environ
    return bool(env.get("TORCHELASTIC_RUN_ID") or env.get(LAUNCHER_PID_ENV)
                or env.get(DIE_WITH_PARENT_ENV) == "1")


def _launcher_identity():
    """(pid, start time) of our launcher when it runs on this host, else None."""
    import psutil

    pid = os.environ.get(LAUNCHER_PID_ENV, "")
    if not pid.isdigit() or os.environ.get(LAUNCHER_HOST_ENV) != socket.gethostname():
        return None
    try:
        return int(pid), psutil.Process(int(pid)).create_time()
    except psutil.Error:
        return int(pid), None  # already gone


def _alive(pid: int, created: float | None) -> bool:
    import psutil

    if created is None:
        return False
    try:
        proc = psutil.Process(pid)
        # A killed launcher stays a zombie until its own parent reaps it.
        return proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _stop_self(pid: int) -> None:
    log.warning("launcher (pid %d) is gone: stopping this process (SIGTERM now, SIGKILL "
                "in %.0f s)", pid, GRACE_S)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    # torchrun gives each rank a process group of its own: take its loader workers too.
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(pid: int, created: float | None) -> None:
    while _alive(pid, created):
        time.sleep(POLL_S)
    _stop_self(pid)


def install_lifeline() -> None:
    """Make this process die with the launcher that started it. Call it first in every
    entry point a launcher starts; outside a launcher (a plain `distill pretrain` from a
    shell, `nohup`) it does nothing. Idempotent."""
    if _installed.is_set() or not _started_by_agent():
        return
    _installed.set()
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
    launcher = _launcher_identity()
    if launcher is not None:
        threading.Thread(target=_watch, args=launcher, name="distill-lifeline",
                         daemon=True).start()
