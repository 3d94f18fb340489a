"""The one exception the launcher raises for things a user can fix."""


class LaunchError(RuntimeError):
    """Nothing was submitted; the message says what is wrong (file, field) and the fix.
    `distill` prints it without a traceback (its class name ends with ``LaunchError``)."""
