"""What a stage runs, as argument lists: the recipe path and the overrides go through
untouched; the launcher adds only how to start processes (torchrun, DeepSpeed, srun).

Every command is ``PYTHON -m distill_cli ...`` (or ``PYTHON -m torch.distributed.run ...
-m distill_cli ...``) so nodes need no console script on their PATH, only the interpreter
that has the project installed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from launcher.errors import LaunchError

STAGES = ("prep", "pretrain", "finetune", "all")
# What `distill run` does after pretraining (the pipeline skips finished stages).
AFTER_PRETRAIN = "export,finetune,report"


@dataclass(frozen=True)
class Step:
    name: str
    """prep | pretrain | finetune | all."""
    args: tuple[str, ...]
    """Arguments after ``python -m distill_cli``."""
    distributed: bool
    """Runs as the ranks of a torchrun / Ray Train job (only `pretrain`)."""


def stage_steps(stage: str, recipe: str, overrides: Sequence[str],
                single_process: bool) -> list[Step]:
    """The distill commands of one launch stage.

    `all` on one process is the pipeline itself (`distill run`); with several processes
    it is prep, then pretraining on all ranks, then the rest of the pipeline, because
    `distill run` trains in one process.
    """
    ov = tuple(overrides)
    prep = Step("prep", ("prep", recipe, *ov), False)
    pretrain = Step("pretrain", ("pretrain", recipe, *ov), True)
    if stage == "prep":
        return [prep]
    if stage == "pretrain":
        return [pretrain]
    if stage == "finetune":
        return [Step("finetune", ("run", recipe, *ov, "--stages", "finetune,report"), False)]
    if stage == "all":
        if single_process:
            return [Step("all", ("run", recipe, *ov), False)]
        return [prep, pretrain,
                Step("finetune", ("run", recipe, *ov, "--stages", AFTER_PRETRAIN), False)]
    raise LaunchError(f"--stage must be one of {list(STAGES)}, got {stage!r}")


def python_for(profile) -> str:
    return profile.python or sys.executable


def distill_argv(python: str, step: Step) -> list[str]:
    return [python, "-m", "distill_cli", *step.args]


def standalone_torchrun_argv(python: str, nproc: int, step: Step) -> list[str]:
    return [python, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "distill_cli", *step.args]


def multinode_torchrun_argv(python: str, profile, step: Step) -> list[str]:
    """Identical on every node: c10d finds the peers, no node rank needed."""
    return [python, "-m", "torch.distributed.run", f"--nnodes={profile.nnodes}",
            f"--nproc_per_node={profile.nproc_per_node}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={profile.rdzv_endpoint}", f"--rdzv_id={profile.rdzv_id}",
            f"--max_restarts={profile.max_restarts}", "-m", "distill_cli", *step.args]


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def parse_hostfile(path: Path) -> list[Host]:
    """DeepSpeed's hostfile: ``hostname slots=N`` per line, ``#`` comments."""
    if not path.is_file():
        raise LaunchError(f"{path}: DeepSpeed hostfile not found (profile key `hostfile`)")
    hosts: list[Host] = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") \
                or not parts[1][6:].isdigit() or int(parts[1][6:]) < 1:
            raise LaunchError(f"{path}:{lineno}: expected `hostname slots=N`, got {raw!r}")
        if any(h.name == parts[0] for h in hosts):
            raise LaunchError(f"{path}:{lineno}: host {parts[0]!r} listed twice")
        hosts.append(Host(parts[0], int(parts[1][6:])))
    if not hosts:
        raise LaunchError(f"{path}: no hosts; add lines like `node1 slots=8`")
    return hosts


def deepspeed_argv(python: str, profile, hostfile: Path, hosts: list[Host],
                   encoded_command: str) -> list[str]:
    """The DeepSpeed runner reads the hostfile and starts one process per slot on every
    host (pdsh/ssh); rank 0's host is the first line. Each rank runs
    ``python -m launcher.remote_command WORD``: the distill command encoded as one word
    the remote shell cannot misread (launcher/remote_command.py)."""
    return [python, "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}",
            f"--master_addr={hosts[0].name}", f"--master_port={profile.master_port}",
            f"--launcher={profile.launcher}", "--no_local_rank", "--module",
            "launcher.remote_command", encoded_command]
