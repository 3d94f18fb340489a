"""Running `distill` as a user does, in a process of its own, and what its stderr must
look like when it refuses: exit code 2, one `error:` line, no traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO


def child_env() -> dict:
    """This environment, with this checkout first on the path of a child Python."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO)] + sys.path)}


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m distill_cli ARGS``."""
    return subprocess.run([sys.executable, "-m", "distill_cli", *args], env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def assert_one_clean_error(proc: subprocess.CompletedProcess, pattern: str) -> str:
    """The one `error:` line, after checking it matches ``pattern`` (a regex)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]
