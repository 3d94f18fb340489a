"""The environment of a job's commands: plain variables, and secrets that are never
written into a script or printed.

Every cluster profile has these fields (``JobEnvironment`` is their base). A secret is a
name in ``secret_env`` or an ``env`` name that says it holds one (``is_secret_name``);
its value comes from ``env`` or, when the profile only names it, from the environment
``distill launch`` runs in. How each kind hands it to the job without a copy on disk
or on screen is in launch.py / slurm.py / ray_jobs.py.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional

from distill_common.config import check
from launcher.errors import LaunchError

MASK = "***"
"""What printed output shows instead of a secret's value."""
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Names torch still reads but has renamed (torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp
# in torch 2.13 lists each new name with its deprecated alias).
DEPRECATED_ENV = {
    "NCCL_ASYNC_ERROR_HANDLING": "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "NCCL_BLOCKING_WAIT": "TORCH_NCCL_BLOCKING_WAIT",
    "NCCL_DESYNC_DEBUG": "TORCH_NCCL_DESYNC_DEBUG",
    "NCCL_ENABLE_TIMING": "TORCH_NCCL_ENABLE_TIMING",
    "NCCL_USE_TENSOR_REGISTER_ALLOCATOR_HOOK": "TORCH_NCCL_USE_TENSOR_REGISTER_ALLOCATOR_HOOK",
}
# A variable is a secret when one of its `_`-separated words is, or ends in, one of these
# (HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, DB_PASSWORD; not TOKENIZERS_PARALLELISM).
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIALS")


def is_secret_name(name: str) -> bool:
    """Whether an environment variable's name says it holds a secret."""
    return any(word.endswith(_SECRET_WORDS) for word in name.upper().split("_"))


def _check_env(env: Dict[str, str], secret_env: List[str]) -> None:
    for where, names in (("env", list(env)), ("secret_env", secret_env)):
        for name in names:
            check(bool(_ENV_NAME.match(name)), f"{where}.{name}",
                  "is not a valid environment variable name (letters, digits, _)")
            check(name not in DEPRECATED_ENV, f"{where}.{name}",
                  f"is deprecated in torch; use {DEPRECATED_ENV.get(name)}")


@dataclass
class JobEnvironment:
    """Fields every profile has: the interpreter and the environment of the commands."""

    python: Optional[str] = None
    """Interpreter that has this project installed (on the nodes); default: the one
    running `distill` (a shared filesystem, or the same path on every node)."""
    env: Dict[str, str] = field(default_factory=dict)
    """Environment variables set for every command of the job. Names that look like
    secrets (a word such as TOKEN, KEY, SECRET, PASSWORD) are treated as `secret_env`."""
    secret_env: List[str] = field(default_factory=list)
    """Secret variables (tokens, keys, passwords), by name: their values come from the
    environment you launch from (or from `env`), and are never written into a script or
    printed; Slurm jobs get them through `sbatch --export`, Ray jobs as `${NAME}` from
    the cluster's own environment."""

    def secret_names(self) -> List[str]:
        """Every secret of this profile: `secret_env` plus secret-looking `env` names."""
        names = list(self.secret_env)
        names += [n for n in self.env if is_secret_name(n) and n not in names]
        return names

    def plain_env(self) -> Dict[str, str]:
        """`env` without its secrets: what may be written and printed."""
        secret = set(self.secret_names())
        return {k: v for k, v in self.env.items() if k not in secret}

    def secret_values(self, profile_path) -> Dict[str, str]:
        """Each secret's value: from `env`, else from the environment we run in. Called
        only when a job is really started or submitted (a dry run needs no secret)."""
        values = {}
        for name in self.secret_names():
            value = self.env.get(name, os.environ.get(name))
            if value is None:
                raise LaunchError(f"{profile_path}: secret_env names {name} but it is not "
                                  f"set here; `export {name}=...` before `distill "
                                  f"launch` (nothing was started)")
            values[name] = value
        return values

    def _check_env_fields(self) -> None:
        _check_env(self.env, self.secret_env)


def masked(env: Mapping[str, str], secret_names: Iterable[str]) -> Dict[str, str]:
    """``env`` with the values of secrets replaced by ``MASK`` (for printing)."""
    secret = set(secret_names)
    return {k: (MASK if k in secret else v) for k, v in env.items()}
