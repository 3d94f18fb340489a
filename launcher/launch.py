"""`distill launch`: one recipe + one cluster profile -> a plan -> printed or run.

Everything that can be wrong is checked before anything starts: the recipe loads and
validates against its teacher, the profile parses (GPU counts, ports, names), the
scheduler is there (sbatch on the PATH, the Ray dashboard answers). ``plan()`` builds the
exact commands / script / Ray entrypoint; ``Plan.describe()`` is what --dry-run prints and
``execute()`` runs or submits the same thing.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from distill_common import lifeline
from launcher import commands, jobs, ray_jobs, remote_command, slurm
from launcher.commands import Step, stage_steps
from launcher.errors import LaunchError
from launcher.machine import resolve_local
from launcher.profiles import (DeepSpeedProfile, LocalProfile, Profile, RayProfile,
                               SlurmProfile, TorchrunProfile, load_profile)
from launcher.recipe import load_recipe, resolve_recipe_path, validate_recipe

log = logging.getLogger(__name__)


@dataclass
class Plan:
    kind: str
    stage: str
    recipe: str
    """Absolute path of the recipe file."""
    overrides: list[str]
    profile: Profile
    profile_path: Path
    job_name: str
    workdir: Path
    """Folder the commands run in (and the job starts in)."""
    notes: list[str] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    """local / torchrun / deepspeed: run here, in order, in the foreground."""
    env: dict[str, str] = field(default_factory=dict)
    """Variables added to the environment of those commands (no secrets)."""
    secret_names: list[str] = field(default_factory=list)
    """The profile's secrets: handed to the job from the environment, never printed."""
    script: str | None = None
    """slurm: the rendered sbatch script."""
    script_path: Path | None = None
    log_dir: Path | None = None
    submit_argv: list[str] = field(default_factory=list)
    ray_address: str | None = None
    ray_entrypoint: str | None = None
    ray_runtime_env: dict = field(default_factory=dict)
    ray_submission_id: str | None = None
    rayjob_manifest: str | None = None

    def describe(self) -> str:
        """Exactly what would run: commands, rendered script, entrypoint."""
        out = [f"# distill launch: recipe {self.recipe}, stage {self.stage}, profile "
               f"{self.profile_path} (kind {self.kind})"]
        out += [f"# {n}" for n in self.notes]
        env_prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        for argv in self.commands:
            out.append((f"env {env_prefix} " if env_prefix else "") + shlex.join(argv))
        if self.script is not None:
            out.append(f"# sbatch script, written to {self.script_path}:")
            out.append(self.script.rstrip("\n"))
            out.append("# submitted with:")
            out.append(shlex.join(self.submit_argv))
        if self.ray_entrypoint is not None:
            out.append(f"# Ray job {self.ray_submission_id} submitted to "
                       f"{self.ray_address} (JobSubmissionClient.submit_job):")
            shown = ray_jobs.fill_secrets(self.ray_runtime_env, self.profile, mask=True)
            out.append(f"# runtime_env: {shown}")
            out.append(self.ray_entrypoint)
            if self.rayjob_manifest is not None:
                out.append("# the same job as a KubeRay RayJob (kubectl apply -f -):")
                out.append(self.rayjob_manifest.rstrip("\n"))
        return "\n".join(out) + "\n"


def check_recipe(recipe_arg: str, overrides: Sequence[str]):
    """Load and validate the recipe the way the stages will; errors stop the launch."""
    recipe = load_recipe(recipe_arg, overrides)
    validate_recipe(recipe)
    return recipe, resolve_recipe_path(recipe_arg).resolve()


def plan(recipe_arg: str, overrides: Sequence[str], profile_arg: str,
         profile_overrides: Sequence[str] = (), stage: str = "pretrain",
         job_name: str | None = None, workdir: Path | None = None) -> Plan:
    if stage not in commands.STAGES:
        raise LaunchError(f"--stage must be one of {list(commands.STAGES)}, got {stage!r}")
    profile, profile_path = load_profile(profile_arg, profile_overrides)
    recipe, recipe_path = check_recipe(recipe_arg, overrides)
    workdir = (workdir or Path.cwd()).resolve()
    p = Plan(kind=profile.kind, stage=stage, recipe=str(recipe_path),
             overrides=list(overrides), profile=profile, profile_path=profile_path,
             job_name=job_name or f"distill-{recipe.name}-{stage}", workdir=workdir,
             env=profile.plain_env(), secret_names=profile.secret_names())
    if isinstance(profile, LocalProfile):
        p.profile, extra_env, notes = resolve_local(profile, profile_path)
        p.env.update(extra_env)
        p.notes += notes
    single = isinstance(p.profile, LocalProfile) and p.profile.nproc_per_node == 1
    steps = stage_steps(stage, p.recipe, p.overrides, single_process=single)
    python = commands.python_for(profile)
    builders: dict[type, Callable] = {LocalProfile: _plan_local, TorchrunProfile: _plan_torchrun,
                                      DeepSpeedProfile: _plan_deepspeed,
                                      SlurmProfile: _plan_slurm, RayProfile: _plan_ray}
    builders[type(profile)](p, steps, python, workdir, recipe)
    return p


def _note_secrets(p: Plan, how: str) -> None:
    if p.secret_names:
        p.notes.append(f"secrets (values never printed or written): "
                       f"{', '.join(p.secret_names)}; {how}")


def _plan_local(p: Plan, steps: list[Step], python: str, workdir: Path, recipe) -> None:
    prof: LocalProfile = p.profile
    _note_secrets(p, "passed to the commands from this environment")
    for step in steps:
        if step.distributed and prof.nproc_per_node > 1:
            p.commands.append(commands.standalone_torchrun_argv(python, prof.nproc_per_node,
                                                                step))
        else:
            p.commands.append(commands.distill_argv(python, step))


def _plan_torchrun(p: Plan, steps: list[Step], python: str, workdir: Path, recipe) -> None:
    prof: TorchrunProfile = p.profile
    _note_secrets(p, "passed to the commands from this environment")
    if prof.nnodes > 1 and len(steps) > 1:
        raise LaunchError(f"{p.profile_path}: --stage {p.stage} mixes one-node and all-node "
                          f"steps; with nnodes: {prof.nnodes} launch `--stage prep` on one "
                          f"node, then `--stage pretrain` on every node, then "
                          f"`--stage finetune` on one node")
    for step in steps:
        if step.distributed:
            p.notes.append(f"run this same command on each of the {prof.nnodes} nodes; the "
                           f"agents meet at {prof.rdzv_endpoint} (c10d)")
            p.commands.append(commands.multinode_torchrun_argv(python, prof, step))
        else:
            p.notes.append(f"{step.name} runs on this node only")
            p.commands.append(commands.distill_argv(python, step))


def _plan_deepspeed(p: Plan, steps: list[Step], python: str, workdir: Path, recipe) -> None:
    prof: DeepSpeedProfile = p.profile
    hostfile = Path(prof.hostfile)
    if not hostfile.is_absolute():
        hostfile = (p.profile_path.parent / hostfile).resolve()
    hosts = commands.parse_hostfile(hostfile)
    for h in hosts:
        if prof.gpus_per_node and h.slots > prof.gpus_per_node:
            raise LaunchError(f"{hostfile}: host {h.name} asks for slots={h.slots} GPU "
                              f"processes but the profile {p.profile_path} declares "
                              f"gpus_per_node: {prof.gpus_per_node}; lower the slots or "
                              f"raise gpus_per_node")
    _check_remote_shell_values(p, python, hostfile, hosts)
    # DeepSpeed's launcher needs this or each rank runs single-threaded-per-core badly.
    p.env = {"OMP_NUM_THREADS": "1", **p.env}
    p.notes.append(f"hosts: {', '.join(f'{h.name}({h.slots})' for h in hosts)}; rank 0 and "
                   f"the rendezvous on {hosts[0].name}:{prof.master_port}")
    _note_secrets(p, "NOT forwarded to the hosts (DeepSpeed prints what it exports): set "
                     "them in each host's own environment")
    for step in steps:
        if step.distributed:
            word = remote_command.encode(list(step.args), workdir, p.env)
            p.notes.append(f"each rank runs (the last argument, decoded): "
                           f"{remote_command.describe(word, python)}")
            p.commands.append(commands.deepspeed_argv(python, prof, hostfile, hosts, word))
        else:
            p.commands.append(commands.distill_argv(python, step))


def _check_remote_shell_values(p: Plan, python: str, hostfile: Path, hosts) -> None:
    """What DeepSpeed writes unquoted into the command each host's shell runs."""
    remote_command.require_shell_safe(
        str(p.workdir), "working folder", "run `distill launch` from a folder whose path "
        "has only letters, digits and ._-/ (recipe and output paths may have anything)")
    remote_command.require_shell_safe(python, "interpreter", f"set `python` in "
                                      f"{p.profile_path} to a plain path")
    for h in hosts:
        remote_command.require_shell_safe(h.name, f"{hostfile}: host", "use the host's "
                                          "plain name or address")


def _plan_slurm(p: Plan, steps: list[Step], python: str, workdir: Path, recipe) -> None:
    prof: SlurmProfile = p.profile
    log_dir = Path(prof.log_dir)
    p.log_dir = log_dir if log_dir.is_absolute() else workdir / log_dir
    p.script = slurm.render_script(prof, p.profile_path, steps, python=python,
                                   job_name=p.job_name, recipe=p.recipe, stage=p.stage,
                                   workdir=workdir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    p.script_path = p.log_dir / f"{slurm.safe_file_stem(p.job_name)}-{stamp}.sbatch"
    p.submit_argv = slurm.sbatch_argv(p.script_path, p.job_name, p.log_dir, workdir,
                                      p.secret_names)
    _note_secrets(p, "the job takes them from the environment sbatch runs in (--export)")
    p.notes.append(f"log file: {slurm.log_pattern(p.log_dir, p.job_name)} (%j = job id)")


def _plan_ray(p: Plan, steps: list[Step], python: str, workdir: Path, recipe) -> None:
    prof: RayProfile = p.profile
    p.ray_address = ray_jobs.address(prof)
    p.ray_entrypoint = ray_jobs.entrypoint(prof, python, steps, workdir)
    p.ray_runtime_env = ray_jobs.runtime_env(prof, p.profile_path)
    _note_secrets(p, "sent in the job's runtime_env from this environment (${NAME}, the "
                     "cluster's own value, when unset here); the RayJob manifest reads "
                     "them from a Kubernetes Secret")
    p.ray_submission_id = ray_jobs.new_submission_id(recipe.name, p.stage)
    in_image = ray_jobs.entrypoint(prof, prof.python or "python", steps, workdir=None)
    p.rayjob_manifest = ray_jobs.render_rayjob(prof, p.profile_path,
                                               name=p.ray_submission_id, entry=in_image,
                                               renv=p.ray_runtime_env)


def execute(p: Plan, out=print) -> int:
    """Run (local kinds) or submit (slurm, ray) what ``p.describe()`` shows."""
    if p.kind == "slurm":
        return _submit_slurm(p, out)
    if p.kind == "ray":
        renv = ray_jobs.fill_secrets(p.ray_runtime_env, p.profile, mask=False)
        sid = ray_jobs.submit(p.ray_address, p.ray_entrypoint, renv, p.ray_submission_id,
                              metadata={"recipe": p.recipe, "stage": p.stage})
        jobs.save(jobs.JobRecord(scheduler="ray", job_id=sid, recipe=p.recipe,
                                 stage=p.stage, profile=str(p.profile_path),
                                 address=p.ray_address))
        out(f"submitted Ray job {sid} to {p.ray_address}")
        out(sid)
        return 0
    # DeepSpeed's runner would print the secrets it exports: they stay out of its reach.
    secrets = {} if p.kind == "deepspeed" else p.profile.secret_values(p.profile_path)
    # Ranks die with this process (distill_common/lifeline.py).
    env = {**os.environ, **p.env, **secrets, **lifeline.child_env()}
    for n in p.notes:
        log.info("%s", n)
    for argv in p.commands:
        log.info("running: %s", shlex.join(argv))
        sys.stdout.flush()
        rc = subprocess.run(argv, env=env, cwd=p.workdir,
                            preexec_fn=lifeline.die_with_parent).returncode
        if rc != 0:
            raise LaunchError(f"`{shlex.join(argv[:6])} ...` exited with {rc}")
    return 0


def _submit_slurm(p: Plan, out) -> int:
    slurm.require_tool("sbatch")
    secrets = p.profile.secret_values(p.profile_path)
    p.log_dir.mkdir(parents=True, exist_ok=True)
    p.script_path.write_text(p.script)
    job_id = slurm.submit(p.submit_argv, secrets)
    jobs.save(jobs.JobRecord(
        scheduler="slurm", job_id=job_id, recipe=p.recipe, stage=p.stage,
        profile=str(p.profile_path), script=str(p.script_path),
        log_file=str(p.log_dir / f"{slurm.safe_file_stem(p.job_name)}-{job_id}.log")))
    out(f"submitted Slurm job {job_id}")
    out(job_id)
    return 0
