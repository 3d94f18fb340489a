"""`distill launch` against a real Slurm (slurmctld + slurmd + munged on 127.0.0.1,
started here as root, stopped by PID). Skipped with the reason when Slurm cannot run
here; under CI=true that is a failure instead (.ci/run installs Slurm first)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from clusters import slurm_cluster, slurm_unavailable_reason
from launch_fixtures import prepared_shards, run_distill, write_tiny_recipe

pytestmark = pytest.mark.slow

PWNED = Path("/tmp/pwned-distill-slurm-test")


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"Slurm tests must run under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm():
    reason = slurm_unavailable_reason()
    if reason:
        _unavailable(reason)
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(slurm_cluster())
        except RuntimeError as err:
            _unavailable(f"could not start a single-node Slurm: {err}")
        yield cluster


@pytest.fixture
def env(slurm, tmp_path):
    return {**slurm.env, "DISTILL_CACHE": str(tmp_path / "cache")}


@pytest.fixture(scope="module")
def recipe_and_shards(tmp_path_factory, tiny_teacher_dir, tiny_corpus_dir):
    # A folder and a job name full of shell syntax: the job must still run, and the
    # payload must never execute.
    folder = tmp_path_factory.mktemp("slurm") / "recipes with space $(touch x) 'q'"
    recipe = write_tiny_recipe(folder, tiny_teacher_dir, tiny_corpus_dir, max_steps=3)
    return recipe, prepared_shards(tmp_path_factory.getbasetemp(), recipe)


def _submit(args: list[str], env: dict, cwd: Path) -> str:
    # The rendezvous port base (the job adds its id % 1000): a random one below the
    # kernel's ephemeral range (32768+), where no other test's connection or server
    # (given port 0) can land, and not the profile's 29500, which a test running beside
    # this one may hold. The script itself moves past a port something listens on.
    base = random.randrange(20000, 29000)
    r = run_distill(["launch", *args, "--set", f"rdzv_port={base}"], env=env, cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = r.stdout.strip().splitlines()[-1]
    assert job_id.isdigit(), r.stdout
    return job_id


def _scontrol(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scontrol", *args], env=env, capture_output=True, text=True)


def _wait_for(check, what: str, timeout: float, on_timeout=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{on_timeout()}")
        time.sleep(0.3)


def _release_requeued(env: dict, job: str, timeout: float = 60) -> None:
    """A requeued job waits ~2 minutes (BeginTime) before it may start again; once Slurm
    has set that hold (after the first run finished COMPLETING), start it now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], env=env,
                            capture_output=True, text=True).stdout.strip()
        if st.startswith("PENDING") and "BeginTime" in st:
            assert _scontrol(env, "update", f"jobid={job}", "starttime=now").returncode == 0
        elif st.startswith(("RUNNING", "COMPLETED")) or not st:
            return
        time.sleep(0.3)
    raise AssertionError(f"requeued job {job} did not start again within {timeout:.0f}s")


def test_tiny_distillation_job_completes_and_resumes_after_requeue(slurm, env,
                                                                   recipe_and_shards,
                                                                   tmp_path):
    recipe, shards = recipe_and_shards
    PWNED.unlink(missing_ok=True)
    out = tmp_path / "pretrain out"
    job_name = f"tiny $(touch {PWNED}) `touch {PWNED}`; touch {PWNED} 'x"
    # resume=never on the command line: only the script's requeue logic
    # (train.resume=auto on a restart) can make the second run resume.
    job = _submit([str(recipe), f"train.data_dir={shards}", f"train.output_dir={out}",
                   "train.max_steps=12", "train.save_every=2", "train.resume=never",
                   "--cluster", "slurm/cpu", "--stage", "pretrain", "--job-name", job_name],
                  env, tmp_path)
    log = lambda: run_distill(["launch", "logs", job], env=env).stdout  # noqa: E731

    # Preempt it once it has a checkpoint, the way Slurm does: requeue (the job may even
    # have finished by then; Slurm requeues finished batch jobs too).
    _wait_for(lambda: any((out / "checkpoints").glob("step-*/complete.json")),
              "a first checkpoint", 180, log)
    r = _scontrol(env, "requeue", job)
    assert r.returncode == 0, r.stderr
    _release_requeued(env, job)

    r = run_distill(["launch", "status", job, "--wait", "--timeout", "240"], env=env)
    text = log()
    assert r.returncode == 0, f"{r.stdout}{r.stderr}\n--- job log ---\n{text}"
    assert r.stdout.split() == [job, "COMPLETED"]
    # Both runs are in the one per-job log; the job name arrived as plain text.
    assert f"distill: job {job} ({job_name}) stage pretrain" in text
    assert "restart 0" in text and "restart 1" in text
    assert "resumed from" in text.split("restart 1", 1)[1]
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    complete = json.loads((last / "complete.json").read_text())
    assert complete["step"] == 12 and complete["world_size"] == 2
    assert not PWNED.exists()
    # The rendered script and the per-job log sit in the profile's log_dir.
    assert len(list((tmp_path / "slurm-logs").glob(f"*-{job}.log"))) == 1
    assert len(list((tmp_path / "slurm-logs").glob("*.sbatch"))) == 1


def test_status_and_cancel_of_a_held_job(slurm, recipe_and_shards, tmp_path, monkeypatch,
                                         capsys):
    # In-process `distill` calls (the CLI subprocess path is covered above): cheaper.
    from distill_cli.main import main

    recipe, shards = recipe_and_shards
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["launch", str(recipe), f"train.data_dir={shards}", "--cluster", "slurm/cpu",
                 "--stage", "pretrain", "--set", "sbatch_options=[--hold]"]) == 0
    job = capsys.readouterr().out.split()[-1]
    assert main(["launch", "status", job]) == 0
    assert capsys.readouterr().out.split() == [job, "PENDING"]
    assert main(["launch", "cancel", job]) == 0
    assert f"cancelled Slurm job {job}" in capsys.readouterr().out
    assert main(["launch", "status", job, "--wait", "--timeout", "60"]) == 1
    assert capsys.readouterr().out.split()[:2] == [job, "CANCELLED"]
    # logs of a job that never ran: a clear error, not a traceback.
    assert main(["launch", "logs", job]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_term_before_the_time_limit_makes_the_run_checkpoint(slurm, env, recipe_and_shards,
                                                             tmp_path):
    """`#SBATCH --signal=TERM@60` on a 3-minute job that would train for hours: Slurm
    sends SIGTERM to the job's steps about a minute before the limit (up to a minute
    earlier: its resolution), every rank saves a checkpoint and stops, and the job ends
    before Slurm would kill it."""
    recipe, shards = recipe_and_shards
    out = tmp_path / "limited"
    job = _submit([str(recipe), f"train.data_dir={shards}", f"train.output_dir={out}",
                   "train.max_steps=10000000", "--cluster", "slurm/cpu", "--stage",
                   "pretrain", "--set", "time=00:03:00", "--set", "signal_lead_s=60"],
                  env, tmp_path)
    r = run_distill(["launch", "status", job, "--wait", "--timeout", "270"], env=env)
    text = run_distill(["launch", "logs", job], env=env).stdout
    assert r.returncode in (0, 1), r.stdout + r.stderr  # the job ended, either way
    assert r.stdout.split()[1] != "TIMEOUT", text[-4000:]
    assert text.count("stopped by SIGTERM at step") == 2, text[-4000:]  # both ranks
    (ckpt,) = sorted((out / "checkpoints").glob("step-*"))
    assert json.loads((ckpt / "complete.json").read_text())["world_size"] == 2
