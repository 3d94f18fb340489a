"""`distill launch` against a real Ray head (`ray start --head` on 127.0.0.1, private temp
dir, stopped by PID): a prep job is submitted through the job API, completes, and its
shards verify; then a Ray Train job distils on them with 2 workers. Status, logs and
cancel go through JobSubmissionClient."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from clusters import ray_head
from launch_fixtures import run_distill, write_tiny_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    with ray_head(str(Path(sys.executable).parent / "ray")) as h:
        yield h


@pytest.fixture
def env(head, tmp_path):
    return {**head.env, "DISTILL_CACHE": str(tmp_path / "cache"), "RAY_ADDRESS": ""}


def test_prep_then_ray_train_distillation(head, env, tmp_path, tiny_teacher_dir,
                                                tiny_corpus_dir):
    recipe = write_tiny_recipe(tmp_path / "recipe", tiny_teacher_dir, tiny_corpus_dir)
    shards = tmp_path / "ray shards"
    secret = "s3cr3t-value-for-the-job"
    r = run_distill(["launch", str(recipe), f"prep.output_dir={shards}", "prep.workers=2",
                     "--cluster", "ray/local", "--stage", "prep",
                     "--set", f"address={head.address}", "--set", "secret_env=[DISTILL_KEY]"],
                    env={**env, "DISTILL_KEY": secret}, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.strip().splitlines()[-1]
    assert job.startswith("distill-launchtest-prep-")
    # The secret went to the job (runtime_env) and nowhere on screen.
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(head.address).get_job_info(job)
    assert info.runtime_env["env_vars"]["DISTILL_KEY"] == secret
    assert secret not in r.stdout + r.stderr

    status = run_distill(["launch", "status", job, "--wait", "--timeout", "180"], env=env)
    logs = run_distill(["launch", "logs", job], env=env)
    assert status.returncode == 0, f"{status.stdout}{status.stderr}\n{logs.stdout}"
    assert status.stdout.split() == [job, "SUCCEEDED"]
    # The job ran on the cluster's Ray (not an in-process fallback) and wrote shards.
    assert "connecting to the Ray cluster at auto" in logs.stdout
    assert "2 Ray workers" in logs.stdout
    verify = run_distill(["prep", "verify", str(shards)], env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "ok" in verify.stdout

    # Then distillation on the same cluster: Ray Train places 2 workers, each one rank of
    # `distill pretrain` (DeepSpeed over the gloo group Ray Train set up).
    out = tmp_path / "ray pretrain"
    r = run_distill(["launch", str(recipe), f"train.data_dir={shards}",
                     f"train.output_dir={out}", "train.max_steps=2", "--cluster", "ray/local",
                     "--stage", "pretrain", "--set", f"address={head.address}",
                     "--set", "num_workers=2"], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.strip().splitlines()[-1]
    status = run_distill(["launch", "status", job, "--wait", "--timeout", "240"], env=env)
    logs = run_distill(["launch", "logs", job], env=env).stdout
    assert status.stdout.split() == [job, "SUCCEEDED"], logs[-5000:]
    assert "world_rank=1" in logs
    (ckpt,) = sorted((out / "checkpoints").glob("step-*"))
    complete = json.loads((ckpt / "complete.json").read_text())
    assert complete["step"] == 2 and complete["world_size"] == 2


def test_cancel_a_ray_job(head, tmp_path, tiny_teacher_dir, tiny_corpus_dir, monkeypatch,
                          capsys):
    # In-process `distill` calls (the CLI subprocess path is covered above): cheaper.
    from distill_cli.main import main

    for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED",
                "RAY_AUTH_MODE"):
        monkeypatch.setenv(key, head.env[key])
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    recipe = write_tiny_recipe(tmp_path / "recipe", tiny_teacher_dir, tiny_corpus_dir,
                               max_steps=100000)
    assert main(["launch", str(recipe), "--cluster", "ray/local", "--stage", "pretrain",
                 "--set", f"address={head.address}"]) == 0
    job = capsys.readouterr().out.split()[-1]
    assert main(["launch", "cancel", job]) == 0
    assert job in capsys.readouterr().out
    assert main(["launch", "status", job, "--wait", "--timeout", "60"]) == 1
    assert capsys.readouterr().out.split() == [job, "STOPPED"]


def test_a_sigterm_under_ray_train_saves_and_the_retry_resumes(head, env, tmp_path,
                                                                tiny_teacher_dir,
                                                                tokenizer_dir):
    """SIGTERM to the Ray Train workers and their ranks (what a preempted node's processes
    get): each rank saves a checkpoint and exits, Ray Train restarts the workers
    (FailureConfig) and the new ranks resume from that checkpoint, to the end."""
    import os
    import signal
    import time

    import psutil

    from test_data_loader import write_shards

    shards = write_shards(tmp_path / "shards", tokenizer_dir, seq_len=32)
    out = tmp_path / "pretrain"
    # Long enough that the run cannot end between seeing step 5 and the signal landing.
    recipe = write_tiny_recipe(tmp_path / "recipe", tiny_teacher_dir, tmp_path,
                               max_steps=100)
    r = run_distill(["launch", str(recipe), f"train.data_dir={shards}",
                     f"train.output_dir={out}", "--cluster", "ray/local", "--stage",
                     "pretrain", "--set", f"address={head.address}", "--set", "num_workers=2",
                     "--set", "max_failures=1"], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.strip().splitlines()[-1]
    deadline = time.time() + 240
    steps = []
    while time.time() < deadline and (not steps or max(steps) < 5):
        if (out / "metrics.jsonl").is_file():
            steps = [json.loads(line)["step"] for line in
                     (out / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]
        time.sleep(0.2)
    ranks = [p for p in psutil.process_iter(["cmdline"])
             if p.info["cmdline"] and "distill_cli" in p.info["cmdline"]
             and str(recipe) in p.info["cmdline"] and "pretrain" in p.info["cmdline"]]
    assert len(ranks) == 2, [p.info["cmdline"] for p in ranks]
    # What a node shutdown does: SIGTERM to every process, the Ray Train workers and the
    # ranks they started. (A Ray worker sitting in its C++ task loop never runs Python's
    # handler for it; the rank's main thread does, and saves.)
    for pid in {p.pid for p in ranks} | {rank.parent().pid for rank in ranks}:
        os.kill(pid, signal.SIGTERM)
    status = run_distill(["launch", "status", job, "--wait", "--timeout", "400"], env=env,
                         timeout=450)
    logs = run_distill(["launch", "logs", job], env=env).stdout
    assert status.stdout.split() == [job, "SUCCEEDED"], logs[-5000:]
    # The stop saved a checkpoint between the periodic ones (save_every=0: there are none)
    # and the retry resumed from it to the end (keep_last=2 keeps both).
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert len(saved) == 2 and 0 < saved[0] < 100 and saved[1] == 100, (saved, logs[-3000:])
    final = json.loads((out / "checkpoints" / "step-00000100" / "complete.json").read_text())
    assert final["world_size"] == 2
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text()
             .splitlines() if "train/total" in line]
    assert steps == list(range(1, 101))  # one curve: the retry continued it
