"""The one exception the launcher raises for things a user can fix."""

from __future__ import annotations

from distill_common.errors import DistillUserError


class LaunchError(DistillUserError, RuntimeError):
    """Nothing was submitted; the message says what is wrong (file, field) and the fix."""
