"""SIGTERM remembered, not obeyed at once: the training loop checks the flag collectively
before each step, saves a checkpoint and stops (every rank at the same step).

Installed as early as the pretrain process can (before the recipe, the models and the
process group), so that a SIGTERM during setup (Slurm's ``--signal`` lead arriving while a
large teacher loads, a preemption during the rendezvous) lets setup finish and stops at
step 0 with a checkpoint, instead of killing one rank mid-setup and leaving the others to
fail in a collective. No torch import here: this module is imported first.

The handler only assigns a flag: no lock. A SIGTERM can arrive while the handler of an
earlier one is still running (Slurm signals every process of a step and torchrun forwards
the same signal a moment later), and Python runs the second handler nested inside the
first; a handler that takes a lock (``threading.Event.set`` does) then waits on itself
forever, and the other ranks wait on that rank in the next collective until they are
killed, with no checkpoint.
"""

from __future__ import annotations

import signal
import threading

_stop_requested = False
"""Set by SIGTERM or ``request_stop``; reading or assigning a bool needs no lock."""
_installed: list["StopSignal"] = []
"""The active handlers, outermost first; only the outermost installs and clears."""


def request_stop(*_signal_args) -> None:
    """Ask the running loop to checkpoint and stop before its next step; the SIGTERM
    handler itself, and callable from any thread (e.g. a Ray Train worker's own signal
    handling)."""
    global _stop_requested
    _stop_requested = True


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
        global _stop_requested
        _stop_requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, request_stop)
            # A process started from a thread that blocks SIGTERM (Ray's worker threads do)
            # inherits the block, and the signal would stay pending forever.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})

    @staticmethod
    def is_set() -> bool:
        return _stop_requested

    def restore(self) -> None:
        if self in _installed:
            _installed.remove(self)
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
