"""Slurm: render an sbatch script, submit it, and ask about the job afterwards.

The rendered script runs one ``srun`` task per node; on each node that task starts
torchrun, and the agents meet at a c10d rendezvous on the first node of the allocation.
Steps that are not distributed (prep, the rest of the pipeline) run as one task on the
first node. Job name, log file and working folder are passed to ``sbatch`` as separate
arguments (no shell in between); every value inside the script is ``shlex``-quoted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from distill_common import lifeline
from launcher.commands import Step
from launcher.errors import LaunchError
from launcher.profiles import SlurmProfile
from launcher.templates import render, shell_value, template_path

TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def safe_file_stem(job_name: str) -> str:
    """The job name as a file name: Slurm expands `%` in --output, shells hate the rest."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", job_name).strip("._")
    return stem[:80] or "job"


def check_job_name(job_name: str) -> None:
    if not job_name or any(ord(c) < 32 or ord(c) == 127 for c in job_name):
        raise LaunchError(f"job name {job_name!r} must be non-empty and have no control "
                          f"characters (newlines, tabs)")


def sbatch_lines(profile: SlurmProfile) -> list[str]:
    """`#SBATCH` lines from the profile. Values were checked to need no quoting
    (profiles.py), because sbatch reads these lines itself, not through a shell."""
    lines = []
    if profile.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={profile.gpus_per_node}")
    if profile.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={profile.cpus_per_task}")
    for key in ("mem", "partition", "account", "qos"):
        value = getattr(profile, key)
        if value:
            lines.append(f"#SBATCH --{key}={value}")
    if profile.signal_lead_s:
        # SIGTERM to every job step that long before the time limit: pretraining saves a
        # checkpoint and stops, instead of being killed ~30 s after Slurm's own TERM.
        lines.append(f"#SBATCH --signal=TERM@{profile.signal_lead_s}")
    if profile.requeue:
        # A requeued job appends to its log instead of truncating the first run's lines.
        lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]
    else:
        lines.append("#SBATCH --no-requeue")
    lines += [f"#SBATCH {opt}" for opt in profile.sbatch_options]
    return lines


def step_lines(profile: SlurmProfile, python: str, steps: Sequence[Step]) -> list[str]:
    """The srun commands. Only `$SLURM_*`, `$head_node`, `$rdzv_port` and
    `${resume_args[@]}` stay unquoted (we set them); everything else is quoted."""
    out = []
    for step in steps:
        if step.distributed:
            resume = ' "${resume_args[@]}"' if step.name == "pretrain" else ""
            out.append(
                'srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 '
                '--kill-on-bad-exit=1 \\\n'
                f'    {shell_value(python)} -m torch.distributed.run '
                '--nnodes="$SLURM_JOB_NUM_NODES" '
                f'--nproc_per_node={profile.nproc_per_node} \\\n'
                '    --rdzv_backend=c10d --rdzv_endpoint="${head_node}:${rdzv_port}" '
                '--rdzv_id="$SLURM_JOB_ID" \\\n'
                f'    -m distill_cli {shell_value(list(step.args))}{resume}')
        else:
            out.append(f'srun --nodes=1 --ntasks=1 {shell_value(python)} -m distill_cli '
                       f'{shell_value(list(step.args))}')
    return out


def render_script(profile: SlurmProfile, profile_path: Path, steps: Sequence[Step], *,
                  python: str, job_name: str, recipe: str, stage: str,
                  workdir: Path) -> str:
    check_job_name(job_name)
    tpl = template_path(profile.template, profile_path, "slurm")
    if not tpl.is_file():
        raise LaunchError(f"{profile_path}: template: {tpl} not found")
    env_lines = [f"export {name}={shell_value(value)}"
                 for name, value in profile.plain_env().items()]
    # Secrets: never in this file; sbatch --export hands them over from the environment
    # `distill launch` ran in. A missing one stops the job here with its name.
    env_lines += [f': "${{{name}:?is not set: export it where you run distill launch}}"'
                  for name in profile.secret_names()]
    return render(tpl.read_text(), {
        "nodes": profile.nodes, "time": profile.time,
        "sbatch_lines": sbatch_lines(profile), "job_name": job_name, "recipe": recipe,
        "stage": stage, "workdir": str(workdir), "setup": list(profile.setup),
        "env_lines": env_lines, "rdzv_port": profile.rdzv_port,
        "steps": "\n\n".join(step_lines(profile, python, steps)),
    }, source=tpl)


def log_pattern(log_dir: Path, job_name: str) -> str:
    """sbatch --output pattern; a `%` in the folder is doubled so Slurm keeps it."""
    return str(log_dir).replace("%", "%%") + f"/{safe_file_stem(job_name)}-%j.log"


def sbatch_argv(script: Path, job_name: str, log_dir: Path, workdir: Path,
                secret_names: Sequence[str] = ()) -> list[str]:
    """sbatch's command line. Secrets are exported by name (their values come from
    sbatch's environment, see ``submit``), on top of the environment sbatch exports."""
    export = [f"--export=ALL,{','.join(secret_names)}"] if secret_names else []
    return ["sbatch", "--parsable", f"--job-name={job_name}",
            f"--output={log_pattern(log_dir, job_name)}", f"--chdir={workdir}", *export,
            str(script)]


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise LaunchError(f"`{name}` is not on the PATH: run `distill launch` on a Slurm "
                          f"login node (or load the Slurm module); nothing was submitted. "
                          f"Use --dry-run to see the script without Slurm.")
    return path


def submit(argv: list[str], secrets: dict[str, str] | None = None) -> str:
    """Run sbatch (with ``secrets`` in its environment, for ``--export``); return the job
    id (``--parsable`` prints ``id[;cluster]``)."""
    require_tool("sbatch")
    # The job outlives this process: it must not inherit a tie to an enclosing launcher.
    env = {**lifeline.untied(os.environ), **(secrets or {})}
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise LaunchError(f"sbatch refused the job (exit {r.returncode}): "
                          f"{r.stderr.strip() or r.stdout.strip()}")
    job_id = r.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise LaunchError(f"sbatch printed no job id: {r.stdout!r} {r.stderr!r}")
    return job_id


def _scontrol_fields(job_id: str) -> dict[str, str]:
    r = subprocess.run([require_tool("scontrol"), "show", "job", "-o", job_id],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return {}
    fields = {}
    # `-o` prints one line of Key=Value pairs; values of StdOut etc. have no spaces
    # unless the path does, so split on ` Key=` boundaries.
    for m in re.finditer(r"(?:^|\s)([A-Za-z:/]+)=(.*?)(?=\s[A-Za-z:/]+=|$)", r.stdout.strip()):
        fields[m.group(1)] = m.group(2)
    return fields


def job_state(job_id: str) -> str:
    """squeue (pending/running), then sacct (accounting), then scontrol (recent jobs)."""
    r = subprocess.run([require_tool("squeue"), "-h", "-j", job_id, "-o", "%T"],
                       capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout.split()[0]
    if shutil.which("sacct"):
        r = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.split()[0].split()[0]
    state = _scontrol_fields(job_id).get("JobState")
    if state:
        return state
    raise LaunchError(f"Slurm knows no job {job_id} (not in squeue, sacct or scontrol)")


def log_file(job_id: str, recorded: str | None) -> Path:
    if recorded:
        return Path(recorded)
    stdout = _scontrol_fields(job_id).get("StdOut")
    if stdout:
        return Path(stdout)
    raise LaunchError(f"no log file known for Slurm job {job_id}; look in the profile's "
                      f"log_dir")


def cancel(job_id: str) -> None:
    r = subprocess.run([require_tool("scancel"), job_id], capture_output=True, text=True)
    if r.returncode != 0:
        raise LaunchError(f"scancel {job_id} failed: {r.stderr.strip()}")
