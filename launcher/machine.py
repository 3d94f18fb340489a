"""What this machine offers a local launch: its GPUs, counted when the launch is planned.

A local profile may say `nproc_per_node: auto` / `gpus_per_node: auto` (cluster/local/gpu:
one rank per visible GPU). CPU runs are chosen here, not written into the profiles: when
the ranks will not each have a GPU, the commands get DS_ACCELERATOR=cpu (DeepSpeed would
otherwise pick CUDA and NCCL on a GPU machine), unless the profile's `env` sets it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from distill_common.config import FieldError
from launcher.errors import LaunchError
from launcher.profiles import AUTO, LocalProfile


def visible_gpus() -> int:
    """GPUs a process started here would use: none under DS_ACCELERATOR=cpu, else torch's
    count (which honours CUDA_VISIBLE_DEVICES)."""
    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return 0
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def resolve_local(profile: LocalProfile, path: Path) -> tuple[LocalProfile, dict, list]:
    """-> (the profile with numbers for `auto`, variables to add, notes for the plan)."""
    gpus = visible_gpus()
    wants_auto = AUTO in (profile.nproc_per_node, profile.gpus_per_node)
    if wants_auto and gpus == 0:
        why = " (DS_ACCELERATOR=cpu is set)" if os.environ.get("DS_ACCELERATOR") == "cpu" \
            else ""
        raise LaunchError(f"{path}: `auto` counts this machine's GPUs, and it shows none"
                          f"{why}; use --cluster local/2proc (CPU) or a profile with "
                          f"nproc_per_node set")
    counts = {name: gpus if getattr(profile, name) == AUTO else getattr(profile, name)
              for name in ("nproc_per_node", "gpus_per_node")}
    try:
        resolved = dataclasses.replace(profile, **counts)
    except FieldError as err:
        raise LaunchError(f"{path}: with {gpus} GPU(s) here, {err}") from None
    nproc, declared = resolved.nproc_per_node, resolved.gpus_per_node
    if declared > gpus:
        raise LaunchError(f"{path}: gpus_per_node: {declared} but this machine shows "
                          f"{gpus} GPU(s); lower it (or use `auto`)")
    notes = [f"{nproc} rank(s), {gpus} GPU(s) visible"] if wants_auto else []
    if "DS_ACCELERATOR" in profile.env or (gpus >= nproc and gpus > 0):
        return resolved, {}, notes
    if gpus:
        notes.append(f"{gpus} GPU(s) visible, fewer than the {nproc} ranks: running on "
                     f"the CPU (DS_ACCELERATOR=cpu); --cluster local/gpu uses the GPUs")
    return resolved, {"DS_ACCELERATOR": "cpu"}, notes
