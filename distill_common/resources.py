"""Where the shipped recipes (``configs/``, with ``configs/tasks/``) and cluster profiles and
templates (``cluster/``) are: inside the installed package (``distill_resources``, which a
wheel fills from the repository's top-level folders), or in a source checkout (and an
editable install) the repository's own folders. ``DISTILL_CONFIGS_DIR`` and
``DISTILL_CLUSTER_DIR`` point elsewhere."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

OVERRIDES = {"configs": "DISTILL_CONFIGS_DIR", "cluster": "DISTILL_CLUSTER_DIR"}


def shipped_folder(name: str) -> Path:
    """``configs`` or ``cluster``: the environment's override, else the installed copy,
    else the repository's top-level folder."""
    override = os.environ.get(OVERRIDES[name])
    if override:
        return Path(override)
    package = Path(os.fspath(importlib.resources.files("distill_resources")))
    installed = package / name
    return installed if installed.is_dir() else package.parent / name
