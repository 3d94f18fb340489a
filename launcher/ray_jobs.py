"""Ray: stages submitted as Ray jobs to a running cluster (job-submission API).

`prep` runs its Ray tasks on the cluster (``--ray-address auto`` inside the job);
`pretrain` runs as a Ray Train ``TorchTrainer`` (``python -m launcher.ray_train``) whose
workers each run one rank of ``distill pretrain`` (DeepSpeed over the process group Ray
Train set up). The same entrypoint can go into a KubeRay ``RayJob`` manifest
(cluster/ray/rayjob.yaml.tmpl), which --dry-run prints.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Sequence

from launcher.commands import Step
from launcher.errors import LaunchError
from launcher.job_env import MASK
from launcher.profiles import RayProfile
from launcher.templates import render, template_path, yaml_value

log = logging.getLogger(__name__)

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
K8S_SECRET = "distill-secrets"
"""The Kubernetes Secret the RayJob manifest reads secrets from (one key per variable):
`kubectl create secret generic distill-secrets --from-literal=HF_TOKEN=...`."""


def step_argv(profile: RayProfile, python: str, step: Step) -> list[str]:
    if step.name == "prep":
        argv = [python, "-m", "distill_cli", *step.args, "--ray-address", "auto"]
        if profile.prep_workers is not None:
            argv += ["--workers", str(profile.prep_workers)]
        return argv
    if step.distributed:
        return [python, "-m", "launcher.ray_train", f"--num-workers={profile.num_workers}",
                f"--cpus-per-worker={profile.cpus_per_worker}",
                f"--gpus-per-worker={profile.gpus_per_worker}",
                f"--max-failures={profile.max_failures}", "--", *step.args[1:]]
    return [python, "-m", "distill_cli", *step.args]


def entrypoint(profile: RayProfile, python: str, steps: Sequence[Step],
               workdir: Path | None) -> str:
    """One shell command line (Ray runs the entrypoint through a shell); every word is
    quoted. Without a working_dir the nodes share a filesystem: start where we are
    (``workdir``; None in a container, where the image decides)."""
    cmds = [shlex.join(step_argv(profile, python, s)) for s in steps]
    if profile.working_dir is None and workdir is not None:
        cmds.insert(0, f"cd {shlex.quote(str(workdir))}")
    return " && ".join(cmds)


def runtime_env(profile: RayProfile, profile_path: Path) -> dict:
    """The job's runtime_env. A secret appears as ``${NAME}`` (Ray expands that from the
    cluster's own environment); ``fill_secrets`` puts in the values we have."""
    env: dict = {}
    env_vars = {**profile.plain_env(), **{n: f"${{{n}}}" for n in profile.secret_names()}}
    if env_vars:
        env["env_vars"] = env_vars
    if profile.working_dir is not None:
        wd = Path(profile.working_dir)
        env["working_dir"] = str(wd if wd.is_absolute() else profile_path.parent / wd)
    return env


def fill_secrets(renv: dict, profile: RayProfile, mask: bool) -> dict:
    """``renv`` with each secret's value (from the profile's `env` or from the environment
    we submit from), or ``MASK`` for printing; a secret with no value here stays
    ``${NAME}`` for the cluster to fill."""
    env_vars = dict(renv.get("env_vars", {}))
    for name in profile.secret_names():
        value = profile.env.get(name, os.environ.get(name))
        if value is not None:
            env_vars[name] = MASK if mask else value
    return {**renv, "env_vars": env_vars} if env_vars else dict(renv)


def address(profile: RayProfile) -> str:
    """``RAY_ADDRESS`` (when it is a dashboard URL) wins over the profile."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    return env if env.startswith(("http://", "https://")) else profile.address


def new_submission_id(recipe_name: str, stage: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", recipe_name).strip("-")[:40] or "run"
    return f"distill-{stem}-{stage}-{uuid.uuid4().hex[:8]}"


def check_reachable(addr: str, timeout: float = 5.0) -> None:
    """Fail fast, before anything is submitted, when no Ray dashboard answers."""
    try:
        with urllib.request.urlopen(f"{addr.rstrip('/')}/api/version", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # something answers; let the client report auth or version problems
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise LaunchError(f"cannot reach the Ray cluster at {addr} ({reason}); start one "
                          f"(`ray start --head`, or `ray up cluster/ray/cluster.yaml`) or "
                          f"set the profile's `address` / RAY_ADDRESS to its dashboard "
                          f"URL; nothing was submitted") from None


def _client(addr: str):
    from ray.job_submission import JobSubmissionClient

    check_reachable(addr)
    try:
        return JobSubmissionClient(addr)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise LaunchError(f"Ray job API at {addr}: {err}") from None


AGENT_WAIT_S = 180.0
"""How long a submission waits for the head's job agent: a head that has just started,
or one busy on every core, answers "No available agent to submit job, please try again
later" until its dashboard agent is up."""


def submit(addr: str, entry: str, renv: dict, submission_id: str, metadata: dict,
           agent_wait_s: float = AGENT_WAIT_S) -> str:
    client = _client(addr)
    deadline = time.monotonic() + agent_wait_s
    delay = 1.0
    while True:
        try:
            return client.submit_job(entrypoint=entry, submission_id=submission_id,
                                     runtime_env=renv or None, metadata=metadata)
        except RuntimeError as err:
            if "try again later" not in str(err) or time.monotonic() + delay > deadline:
                raise
            log.info("Ray at %s has no job agent ready yet (%s); retrying in %.0f s",
                     addr, str(err).strip(), delay)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def status(addr: str, submission_id: str) -> str:
    client = _client(addr)
    try:
        return str(client.get_job_status(submission_id).value)
    except RuntimeError as err:
        raise LaunchError(f"Ray job {submission_id} at {addr}: {err}") from None


def logs(addr: str, submission_id: str) -> str:
    client = _client(addr)
    try:
        return client.get_job_logs(submission_id)
    except RuntimeError as err:
        raise LaunchError(f"Ray job {submission_id} at {addr}: {err}") from None


def cancel(addr: str, submission_id: str) -> bool:
    client = _client(addr)
    try:
        return bool(client.stop_job(submission_id))
    except RuntimeError as err:
        raise LaunchError(f"Ray job {submission_id} at {addr}: {err}") from None


def render_rayjob(profile: RayProfile, profile_path: Path, *, name: str, entry: str,
                  renv: dict) -> str:
    """A KubeRay RayJob manifest running the same stages (values YAML-quoted). ``entry``
    is the entrypoint as it runs inside the image: `python` on its PATH, its own folder."""
    tpl = template_path(profile.rayjob_template, profile_path, "ray")
    if not tpl.is_file():
        raise LaunchError(f"{profile_path}: rayjob_template: {tpl} not found")
    k8s_name = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63] or "distill"
    # In a pod the code is in the image: only the environment variables travel; secrets
    # stay ${NAME}, filled from a Kubernetes Secret in the containers' environment.
    pod_env = {"env_vars": renv["env_vars"]} if renv.get("env_vars") else {}
    secret_refs = [{"name": n, "valueFrom": {"secretKeyRef": {
        "name": K8S_SECRET, "key": n}}} for n in profile.secret_names()]
    return render(tpl.read_text(), {
        "name": k8s_name, "entrypoint": entry, "runtime_env_yaml": json.dumps(pod_env),
        "secret_env": secret_refs,
        "num_workers": profile.num_workers,
        # Fractional CPUs are fine as a quantity string; GPUs are whole (profiles.py).
        "cpus_per_worker": f"{profile.cpus_per_worker:g}",
        "gpus_per_worker": int(profile.gpus_per_worker),
    }, source=tpl, quote=yaml_value)
