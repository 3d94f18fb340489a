"""SIGTERM remembered, not obeyed at once: the training loop checks the flag collectively
before each step, saves a checkpoint and stops (every rank at the same step).

Installed as early as the pretrain process can (before the recipe, the models and the
process group), so that a SIGTERM during setup (Slurm's ``--signal`` lead arriving while a
large teacher loads, a preemption during the rendezvous) lets setup finish and stops at
step 0 with a checkpoint, instead of killing one rank mid-setup and leaving the others to
fail in a collective. No torch import here: this module is imported first.
"""

from __future__ import annotations

import signal
import threading

_STOP = threading.Event()
_installed: list["StopSignal"] = []
"""The active handlers, outermost first; only the outermost installs and clears."""


def request_stop() -> None:
    """Ask the running loop to checkpoint and stop before its next step (what SIGTERM
    does); callable from any thread, e.g. a Ray Train worker's own signal handling."""
    _STOP.set()


class StopSignal:
    """Remembers a SIGTERM instead of dying. The handler can only be installed from the
    main thread; a loop in another thread (Ray Train) relies on whoever owns the main
    thread calling ``request_stop``. Nested use (the CLI, then ``pretrain`` inside it)
    keeps the outer handler and what it already caught."""

    def __init__(self):
        self._previous = None
        self._outer = not _installed
        _installed.append(self)
        if not self._outer:
            return
        _STOP.clear()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: _STOP.set())
            # A process started from a thread that blocks SIGTERM (Ray's worker threads do)
            # inherits the block, and the signal would stay pending forever.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})

    @staticmethod
    def is_set() -> bool:
        return _STOP.is_set()

    def restore(self) -> None:
        if self in _installed:
            _installed.remove(self)
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
