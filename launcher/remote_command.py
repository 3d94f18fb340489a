"""A distill command line that reaches other hosts through a remote shell unchanged.

DeepSpeed's pdsh runner joins its arguments with spaces into one command for ``ssh``
(deepspeed/launcher/multinode_runner.py, ``PDSHRunner``): an argument without a space goes
in as it is and one with a space only inside double quotes, so ``$(...)`` or a backquote
in a recipe path or an override would run on every host. So the whole command (argv,
working folder, environment) travels as ONE word of base64url (``A-Z a-z 0-9 - _ =``),
which every shell passes through untouched, and ``python -m launcher.remote_command
WORD`` decodes it on each rank and execs ``python -m distill_cli ARGV`` there. ``describe()`` shows what the word holds (the
dry run prints it next to the command).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import sys
from pathlib import Path

from distill_common.lifeline import DIE_WITH_PARENT_ENV
from launcher.errors import LaunchError

MODULE = "launcher.remote_command"
SHELL_SAFE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")
"""Characters DeepSpeed's runner leaves unquoted and every shell reads literally."""


def encode(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    """``python -m distill_cli ARGV`` in ``cwd`` with ``env`` added, as one shell-safe word."""
    payload = {"argv": list(argv), "cwd": str(cwd),
               "env": {**env, DIE_WITH_PARENT_ENV: "1"}}
    word = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()
    assert SHELL_SAFE.match(word) and word[0].isalnum()  # JSON starts with "{": "e..."
    return word


def decode(word: str) -> dict:
    try:
        payload = json.loads(base64.urlsafe_b64decode(word.encode()))
    except ValueError as err:
        raise LaunchError(f"{MODULE}: the argument is not an encoded command ({err})") \
            from None
    if not (isinstance(payload, dict) and isinstance(payload.get("argv"), list)):
        raise LaunchError(f"{MODULE}: the argument is not an encoded command")
    return payload


def describe(word: str, python: str) -> str:
    """What each rank runs, readable (for --dry-run)."""
    p = decode(word)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in p["env"].items())
    return (f"cd {shlex.quote(p['cwd'])} && env {env} "
            f"{shlex.join([python, '-u', '-m', 'distill_cli', *p['argv']])}")


def require_shell_safe(value: str, what: str, fix: str) -> None:
    """DeepSpeed puts some values (the working folder, the interpreter, host names) into
    the remote command unquoted: refuse any that a shell would not read literally."""
    if not SHELL_SAFE.match(value):
        raise LaunchError(f"{what} {value!r} has characters a remote shell would "
                          f"interpret (DeepSpeed's runner does not quote it); {fix}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -m {MODULE} ENCODED_COMMAND", file=sys.stderr)
        return 2
    payload = decode(args[0])
    os.chdir(payload["cwd"])
    # Become the distill process (same PID, so DeepSpeed's launcher still tracks it); the
    # launcher layer does not import the CLI above it.
    os.execve(sys.executable, [sys.executable, "-u", "-m", "distill_cli", *payload["argv"]],
              {**os.environ, **payload["env"]})


if __name__ == "__main__":
    sys.exit(main())
