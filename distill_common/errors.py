"""The one base class of errors a user can fix.

Every stage raises a subclass of ``DistillUserError`` for bad input, config or state (a
missing file, a recipe that does not fit its teacher, a checkpoint from another run); its
message names the file or field and the fix. The CLI prints such an error as one line
and exits with code 2; any other exception is a bug and keeps its traceback.

Subclasses may also derive from a built-in type (``ValueError``, ``RuntimeError``) where
callers catch that.
"""

from __future__ import annotations


class DistillUserError(Exception):
    """Something the user can fix; the message says what, where and how."""

    def __reduce__(self):
        # Keep the plain message when the error crosses a process boundary (Ray tasks,
        # pickled results): subclasses with other __init__ signatures still rebuild.
        return (_rebuild, (type(self), str(self)))


def _rebuild(cls: type, message: str) -> DistillUserError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err
