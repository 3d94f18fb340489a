"""The one error a user sees from `distill prep`: it names the file (and line) and the fix."""

from __future__ import annotations

from distill_common.urls import redact_text


class PrepError(RuntimeError):
    """Bad input or config for prep; printed as `error: ...` without a traceback. URLs in
    the message lose their query string and credentials (a presigned URL is a secret)."""

    def __init__(self, message: str = ""):
        super().__init__(redact_text(message))

    def __reduce__(self):  # keep the plain message when Ray sends it back to the driver
        return (type(self), (str(self),))
