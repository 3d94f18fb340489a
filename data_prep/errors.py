"""The one error a user sees from `distill prep`: it names the file (and line) and the fix."""

from __future__ import annotations


class PrepError(RuntimeError):
    """Bad input or config for prep; printed as `error: ...` without a traceback."""

    def __reduce__(self):  # keep the plain message when Ray sends it back to the driver
        return (type(self), (str(self),))
