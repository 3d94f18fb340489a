"""The one error a user sees from `distill prep`: it names the file (and line) and the fix."""

from __future__ import annotations

from distill_common.errors import DistillUserError
from distill_common.urls import redact_text


class PrepError(DistillUserError, RuntimeError):
    """Bad input or config for prep; printed as `error: ...` without a traceback. URLs in
    the message lose their query string and credentials (a presigned URL is a secret)."""

    def __init__(self, message: str = ""):
        super().__init__(redact_text(message))
