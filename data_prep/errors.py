"""The one error a user sees from `distill prep`: it names the file (and line) and the fix."""

from __future__ import annotations

from distill_common.errors import DistillUserError


class PrepError(DistillUserError, RuntimeError):
    """Bad input or config for prep; printed as `error: ...` without a traceback."""
