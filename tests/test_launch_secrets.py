"""Exposure and GPU-profile rules of the launcher: secrets never in a script or printed
(yet delivered to the job), Ray dashboards on loopback, the sbatch early signal, current
NCCL variable names, whole GPUs, local GPU counting and the Makefile's choice of CPU or
GPU. Real `distill launch` processes; Slurm's `sbatch` and `srun` are stand-ins here
(tests/test_launch_slurm.py submits to a real Slurm)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill_common.config import ConfigError
from launch_fixtures import run_distill, write_executable, write_tiny_recipe
from launcher.errors import LaunchError
from launcher.job_env import is_secret_name
from launcher.launch import execute, plan
from launcher.profiles import cluster_dir, is_profile_file, load_profile
from launcher.ray_jobs import fill_secrets
from launcher.remote_command import decode

REPO = Path(__file__).resolve().parent.parent
TOKEN, PASSWORD = "hf_TOPSECRET123", "pw-TOPSECRET456"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_teacher_dir, tiny_corpus_dir) -> Path:
    return write_tiny_recipe(tmp_path_factory.mktemp("recipe"), tiny_teacher_dir,
                             tiny_corpus_dir)



def test_secret_names():
    for name in ("HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD",
                 "GITHUB_TOKEN", "MY_APIKEY", "GOOGLE_APPLICATION_CREDENTIALS"):
        assert is_secret_name(name), name
    for name in ("TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "DS_ACCELERATOR",
                 "OMP_NUM_THREADS", "NCCL_SOCKET_IFNAME", "KEYBOARD"):
        assert not is_secret_name(name), name


SBATCH_RECORDER = """#!/bin/sh
printf '%s\\n' "$@" > {argv}
printf '%s\\n' "HF_TOKEN=$HF_TOKEN" "DB_PASS=$DB_PASS" > {env}
echo 77
"""


def test_slurm_secrets_reach_sbatch_not_the_script(recipe, tmp_path):
    """HF_TOKEN in the profile's env, DB_PASS named in secret_env and exported here."""
    bin_dir = tmp_path / "bin"
    write_executable(bin_dir / "sbatch", SBATCH_RECORDER.format(
        argv=shlex.quote(str(tmp_path / "argv")), env=shlex.quote(str(tmp_path / "env"))))
    args = ["launch", str(recipe), "--cluster", "slurm/cpu", "--stage", "prep",
            "--set", f"env.HF_TOKEN={TOKEN}", "--set", "secret_env=[DB_PASS]"]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DB_PASS": PASSWORD,
           "DISTILL_CACHE": str(tmp_path / "cache")}
    dry = run_distill([*args, "--dry-run"], env=env, cwd=tmp_path)
    real = run_distill(args, env=env, cwd=tmp_path)
    assert dry.returncode == 0 and real.returncode == 0, dry.stderr + real.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    script = Path(argv[-1]).read_text()
    for text in (dry.stdout + dry.stderr, real.stdout + real.stderr, script):
        assert TOKEN not in text and PASSWORD not in text
    assert "--export=ALL,DB_PASS,HF_TOKEN" in argv
    # sbatch (and through --export, the job) has the values.
    assert (tmp_path / "env").read_text().splitlines() == [f"HF_TOKEN={TOKEN}",
                                                           f"DB_PASS={PASSWORD}"]
    # The script refuses to start without them, naming the missing one.
    job_env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": "77", "HF_TOKEN": TOKEN}
    r = subprocess.run(["bash", argv[-1]], env=job_env, cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode != 0 and "DB_PASS: is not set" in r.stderr
    # Submitting without the value here stops before anything is written.
    missing = run_distill(args, env={k: v for k, v in env.items() if k != "DB_PASS"},
                          cwd=tmp_path)
    assert missing.returncode == 2 and "secret_env names DB_PASS but it is not set" \
        in missing.stderr


def test_local_secret_is_in_the_command_environment_only(recipe, tmp_path, monkeypatch,
                                                         caplog):
    monkeypatch.setenv("DB_PASS", PASSWORD)
    p = plan(str(recipe), [], "local", [f"env.WANDB_API_KEY={TOKEN}",
                                        "secret_env=[DB_PASS]"], stage="prep",
             workdir=tmp_path)
    text = p.describe()
    assert TOKEN not in text and PASSWORD not in text
    assert "secrets (values never printed or written): DB_PASS, WANDB_API_KEY" in text
    # What the commands see: run the plan with a command that shows its environment.
    shown = tmp_path / "seen"
    p.commands = [[sys.executable, "-c", f"import os; open({str(shown)!r}, 'w').write("
                                         f"os.environ['WANDB_API_KEY'] + ' ' + "
                                         f"os.environ['DB_PASS'])"]]
    with caplog.at_level("INFO"):
        assert execute(p) == 0
    assert shown.read_text() == f"{TOKEN} {PASSWORD}"
    assert "running:" in caplog.text and TOKEN not in caplog.text


def test_deepspeed_secrets_do_not_travel_in_the_remote_command(recipe, tmp_path):
    p = plan(str(recipe), [], "deepspeed/2node", [f"env.HF_TOKEN={TOKEN}",
                                                  "env.NCCL_SOCKET_IFNAME=eth0"],
             workdir=tmp_path)
    payload = decode(p.commands[0][-1])
    assert payload["env"]["NCCL_SOCKET_IFNAME"] == "eth0" and "HF_TOKEN" not in payload["env"]
    assert TOKEN not in p.describe() and "NOT forwarded to the hosts" in p.describe()


def test_ray_secrets_masked_when_printed_and_from_a_k8s_secret(recipe, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("DB_PASS", PASSWORD)
    monkeypatch.delenv("OTHER_TOKEN", raising=False)
    p = plan(str(recipe), [], "ray/local", [f"env.HF_TOKEN={TOKEN}",
                                            "secret_env=[DB_PASS,OTHER_TOKEN]"],
             workdir=tmp_path)
    text = p.describe()
    assert TOKEN not in text and PASSWORD not in text
    shown = fill_secrets(p.ray_runtime_env, p.profile, mask=True)["env_vars"]
    assert shown["HF_TOKEN"] == shown["DB_PASS"] == "***"
    assert shown["OTHER_TOKEN"] == "${OTHER_TOKEN}"  # the cluster's own value
    sent = fill_secrets(p.ray_runtime_env, p.profile, mask=False)["env_vars"]
    assert sent["HF_TOKEN"] == TOKEN and sent["DB_PASS"] == PASSWORD
    assert sent["DS_ACCELERATOR"] == "cpu"
    manifest = yaml.safe_load(p.rayjob_manifest)
    env = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["HF_TOKEN"] == "${HF_TOKEN}" and TOKEN not in p.rayjob_manifest
    head = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in head["containers"][0]["env"]}
    assert refs["HF_TOKEN"] == {"name": "distill-secrets", "key": "HF_TOKEN"}


def test_ray_dashboards_listen_on_loopback():
    ray_dir = cluster_dir() / "ray"
    head = yaml.safe_load((ray_dir / "cluster.yaml").read_text())["head_start_ray_commands"]
    assert any("--dashboard-host=127.0.0.1" in c for c in head)
    for path in ray_dir.glob("*.yaml"):
        assert "0.0.0.0" not in path.read_text(), path
        if is_profile_file(path):
            assert load_profile(str(path))[0].address.startswith("http://127.0.0.1:")
    # KubeRay's operator reaches the head through its Service: the template says why it
    # binds the pod address and how to keep it private.
    tmpl = (ray_dir / "rayjob.yaml.tmpl").read_text()
    assert "NetworkPolicy" in tmpl and "port-forward" in tmpl


def test_sbatch_asks_for_an_early_term(recipe, tmp_path):
    p = plan(str(recipe), [], "slurm/cpu", workdir=tmp_path)
    assert "#SBATCH --signal=TERM@180" in p.script.splitlines()
    p = plan(str(recipe), [], "slurm/gpu-4node", workdir=tmp_path)
    assert "#SBATCH --signal=TERM@300" in p.script.splitlines()
    p = plan(str(recipe), [], "slurm/cpu", ["signal_lead_s=0"], workdir=tmp_path)
    assert "--signal" not in p.script
    with pytest.raises(ConfigError, match="signal_lead_s: must be >= 0 and below the time "
                                          r"limit \(00:02:00 = 120 s\)"):
        load_profile("slurm/cpu", ["time=00:02:00", "signal_lead_s=120"])


def test_profile_rules_for_gpus(tmp_path):
    with pytest.raises(ConfigError, match="NCCL_ASYNC_ERROR_HANDLING: is deprecated in torch; "
                                          "use TORCH_NCCL_ASYNC_ERROR_HANDLING"):
        load_profile("torchrun/gpu-8x2", ["env.NCCL_ASYNC_ERROR_HANDLING=1"])
    for path in cluster_dir().rglob("*.yaml"):
        assert not re.search(r"^\s+NCCL_ASYNC_ERROR_HANDLING", path.read_text(), re.M), path
    with pytest.raises(ConfigError, match="gpus_per_worker: must be a whole number"):
        load_profile("ray/gpu", ["gpus_per_worker=0.5"])
    assert load_profile("ray/gpu", ["gpus_per_worker=2"])[0].gpus_per_worker == 2
    with pytest.raises(ConfigError, match="nproc_per_node: must be a number or `auto`"):
        load_profile("local/gpu", ["nproc_per_node=many"])


def test_local_profiles_count_gpus(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # this machine shows no GPU either way
    with pytest.raises(LaunchError, match="shows none .DS_ACCELERATOR=cpu is set.; use "
                                          "--cluster local/2proc"):
        plan(str(recipe), [], "local/gpu", workdir=tmp_path)
    p = plan(str(recipe), [], "local/2proc", workdir=tmp_path)
    assert p.env == {"DS_ACCELERATOR": "cpu"} and "--nproc_per_node=2" in p.commands[0]
    p = plan(str(recipe), [], "local/2proc", ["env.DS_ACCELERATOR=cuda"], workdir=tmp_path)
    assert p.env == {"DS_ACCELERATOR": "cuda"}  # the profile's own choice wins


FAKE_NVIDIA_SMI = """#!/bin/sh
echo "GPU 0: NVIDIA H200 (UUID: GPU-0)"
echo "GPU 1: NVIDIA H200 (UUID: GPU-1)"
"""


@pytest.mark.parametrize("gpus", [0, 2])
def test_make_demo_uses_the_gpus_it_sees(tmp_path, gpus):
    path = os.environ["PATH"]
    if gpus:
        path = f"{write_executable(tmp_path / 'bin' / 'nvidia-smi', FAKE_NVIDIA_SMI).parent}:{path}"
    else:  # a PATH without any nvidia-smi
        path = ":".join(p for p in path.split(":") if not (Path(p) / "nvidia-smi").exists())
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {"PATH": path}
    show = subprocess.run(["make", "-s", "--eval", "show: ; @echo DS=$$DS_ACCELERATOR",
                           "show"], cwd=REPO, env=env, capture_output=True, text=True)
    demo = subprocess.run(["make", "-n", "demo"], cwd=REPO, env=env, capture_output=True,
                          text=True)
    assert show.stdout.strip() == ("DS=" if gpus else "DS=cpu"), show.stderr
    cluster = "local/gpu" if gpus else "local/2proc"
    assert f"distill run configs/demo.yaml --cluster {cluster}" in demo.stdout, demo.stderr
