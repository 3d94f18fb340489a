"""Launcher without schedulers: profiles, rendering, quoting, dry-run, errors before
submission. The real Slurm / Ray / torchrun runs are in tests/test_launch_*.py."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill_common.config import ConfigError
from launch_fixtures import write_tiny_recipe
from launcher import commands, control, jobs
from launcher.errors import LaunchError
from launcher.launch import plan
from launcher.machine import visible_gpus
from launcher.profiles import cluster_dir, is_profile_file, load_profile
from launcher.remote_command import decode
from launcher.templates import render

EVIL = "$(touch /tmp/pwned-launch-unit) `id` ; x='q\"uote'"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_teacher_dir, tiny_corpus_dir) -> Path:
    return write_tiny_recipe(tmp_path_factory.mktemp("recipe"), tiny_teacher_dir,
                             tiny_corpus_dir)


def shipped_profiles() -> list[Path]:
    return sorted(p for p in cluster_dir().rglob("*.yaml") if is_profile_file(p))


def test_every_shipped_profile_parses_and_renders_every_stage(recipe, tmp_path):
    profiles = shipped_profiles()
    kinds = {load_profile(str(p))[0].kind for p in profiles}
    assert kinds == {"local", "torchrun", "deepspeed", "slurm", "ray"}
    rendered = 0
    for path in profiles:
        profile, _ = load_profile(str(path))
        counts_gpus = "auto" in (getattr(profile, "nproc_per_node", 0),
                                 getattr(profile, "gpus_per_node", 0))
        if counts_gpus and visible_gpus() == 0:
            # local/gpu: `auto` needs a GPU; here it says so, and renders with numbers.
            with pytest.raises(LaunchError, match="shows none"):
                plan(str(recipe), [], str(path), workdir=tmp_path)
            path = tmp_path / "counted.yaml"
            path.write_text(yaml.safe_dump({"kind": "local", "nproc_per_node": 2}))
        for stage in commands.STAGES:
            multi_node_all = (profile.kind == "torchrun" and profile.nnodes > 1
                              and stage == "all")
            if multi_node_all:
                with pytest.raises(LaunchError, match="on every node"):
                    plan(str(recipe), ["train.max_steps=2"], str(path), stage=stage,
                         workdir=tmp_path)
                continue
            p = plan(str(recipe), ["train.max_steps=2"], str(path), stage=stage,
                     workdir=tmp_path)
            text = p.describe()
            # The recipe and the override reach the job untouched; nothing else from
            # the recipe is repeated (no training knobs in the launcher's output).
            assert str(recipe) in text and "train.max_steps=2" in text
            assert "micro_batch_size" not in text and "zero_stage" not in text
            if p.script is not None:
                r = subprocess.run(["bash", "-n"], input=p.script, text=True,
                                   capture_output=True)
                assert r.returncode == 0, r.stderr
            rendered += 1
    assert rendered >= 20


def test_local_commands(recipe, tmp_path):
    one = plan(str(recipe), ["train.max_steps=2"], "local", stage="all", workdir=tmp_path)
    assert [c[1:4] for c in one.commands] == [["-m", "distill_cli", "run"]]
    two = plan(str(recipe), [], "local/2proc", stage="all", workdir=tmp_path)
    assert [c[3] if c[2] == "distill_cli" else c[2] for c in two.commands] == \
        ["prep", "torch.distributed.run", "run"]
    assert "--standalone" in two.commands[1] and "--nproc_per_node=2" in two.commands[1]
    assert two.commands[2][-2:] == ["--stages", commands.AFTER_PRETRAIN]
    ft = plan(str(recipe), [], "local", stage="finetune", workdir=tmp_path)
    assert ft.commands[0][-2:] == ["--stages", "finetune,report"]


def test_torchrun_same_command_on_every_node(recipe, tmp_path):
    p = plan(str(recipe), ["train.max_steps=3"], "torchrun/2node", stage="pretrain",
             profile_overrides=["rdzv_endpoint=10.1.2.3:4567", "rdzv_id=abc"],
             workdir=tmp_path)
    (argv,) = p.commands
    assert "--nnodes=2" in argv and "--rdzv_backend=c10d" in argv
    assert "--rdzv_endpoint=10.1.2.3:4567" in argv and "--rdzv_id=abc" in argv
    assert not any("node_rank" in a for a in argv)
    assert argv[-5:] == ["-m", "distill_cli", "pretrain", str(recipe), "train.max_steps=3"]


def test_slurm_script_quotes_every_value(tmp_path, tiny_teacher_dir, tiny_corpus_dir):
    folder = tmp_path / f"dir with space {EVIL}"
    recipe = write_tiny_recipe(folder, tiny_teacher_dir, tiny_corpus_dir)
    override = f"name=evil {EVIL}"
    p = plan(str(recipe), [override], "slurm/cpu", stage="all", job_name=f"job {EVIL}",
             profile_overrides=[f"env.EVIL_VALUE={EVIL}"], workdir=folder)
    script = p.script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # Each srun line splits (as the shell will) into words that hold the values intact.
    srun_lines = [ln for ln in script.replace("\\\n", " ").splitlines()
                  if ln.startswith("srun")]
    assert len(srun_lines) == 3
    for line in srun_lines:
        words = shlex.split(line)
        assert str(recipe) in words and override in words
    assert f"export EVIL_VALUE={shlex.quote(EVIL)}" in script
    assert f"job_name={shlex.quote(f'job {EVIL}')}" in script
    assert "--requeue" in script and 'resume_args=(train.resume=auto)' in script
    assert '"${resume_args[@]}"' in srun_lines[1] and "resume_args" not in srun_lines[0]
    # Job name, log and chdir go to sbatch as separate argv words, no shell in between.
    assert p.submit_argv[2] == f"--job-name=job {EVIL}"
    log_name = Path(p.submit_argv[3]).name
    assert log_name.endswith("-%j.log") and "$" not in log_name and "`" not in log_name
    # Running the script's own set-up (everything before the srun lines) under bash
    # with the Slurm variables set must not execute the payload.
    preamble = _script_preamble(script)
    marker = Path("/tmp/pwned-launch-unit")
    marker.unlink(missing_ok=True)
    r = subprocess.run(["bash", "-c", preamble + '\nprintf "%s\\n%s" "$job_name" '
                                                 '"$EVIL_VALUE"'],
                       env={"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1",
                            "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, cwd=folder)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-2:] == [f"job {EVIL}", EVIL]
    assert not marker.exists()


def _script_preamble(script: str) -> str:
    """The script up to its first srun line, with a fixed head node (no scontrol here)."""
    return script.split("\nsrun ", 1)[0].replace(
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "head_node=n1")


def _rendezvous_port(recipe: Path, base: int, cwd: Path) -> subprocess.CompletedProcess:
    """The job script's set-up, run for job 7 on head node n1, printing the port it chose."""
    p = plan(str(recipe), [], "slurm/cpu", stage="pretrain", workdir=cwd,
             profile_overrides=[f"rdzv_port={base}"])
    return subprocess.run(["bash", "-c", _script_preamble(p.script) + '\necho "$rdzv_port"'],
                          env={"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1",
                               "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, cwd=cwd)


def test_slurm_rendezvous_port_moves_past_a_port_in_use(recipe, tmp_path):
    # Something (another job's store, a stray server) listens on the port the job id picks:
    # the script takes the next free one instead of joining it as a torchrun client.
    with socket.socket() as held, socket.socket() as held_next:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        try:
            held_next.bind(("127.0.0.1", port + 1))
            held_next.listen()
        except OSError:
            pytest.skip(f"port {port + 1} is taken here; the test needs it")
        r = _rendezvous_port(recipe, port - 7, tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"distill: port {port} is in use" in r.stdout
    assert f"distill: port {port + 1} is in use" in r.stdout
    assert int(r.stdout.splitlines()[-1]) >= port + 2
    # Free ports are taken as they are.
    r = _rendezvous_port(recipe, port - 7, tmp_path)
    assert r.returncode == 0 and "in use" not in r.stdout, r.stdout + r.stderr
    assert int(r.stdout.splitlines()[-1]) == port


def test_sbatch_options_and_gpu_lines(recipe, tmp_path):
    p = plan(str(recipe), [], "slurm/gpu-4node", stage="pretrain", workdir=tmp_path)
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --exclusive",
                 "#SBATCH --partition=gpu", "#SBATCH --account=my-project",
                 "#SBATCH --time=2-00:00:00", "module load cuda/12.4"):
        assert line in p.script
    assert "--nproc_per_node=8" in p.script


def test_ray_plan_and_rayjob_manifest(recipe, tmp_path):
    p = plan(str(recipe), ["train.max_steps=2"], "ray/local", stage="all",
             workdir=tmp_path)
    words = shlex.split(p.ray_entrypoint.replace("&&", ";"))
    assert "--ray-address" in words and "launcher.ray_train" in words
    assert "--num-workers=2" in words
    manifest = yaml.safe_load(p.rayjob_manifest)
    assert manifest["kind"] == "RayJob" and manifest["apiVersion"] == "ray.io/v1"
    entry = manifest["spec"]["entrypoint"]
    assert entry.startswith("python -m distill_cli prep") and "launcher.ray_train" in entry
    assert yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])["env_vars"]["DS_ACCELERATOR"] \
        == "cpu"
    workers = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == 2
    assert p.ray_runtime_env == {"env_vars": {"DS_ACCELERATOR": "cpu",
                                              "HF_HUB_OFFLINE": "1"}}


def test_ray_cluster_config_passes_rays_schema():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((cluster_dir() / "ray" / "cluster.yaml").read_text())
    # What `ray up` does first: fill defaults, then check against Ray's JSON schema.
    validate_config(prepare_config(config))
    assert config["provider"]["type"] == "local"
    config["max_workerz"] = 2
    with pytest.raises(jsonschema.ValidationError, match="max_workerz"):
        validate_config(prepare_config(config))


def test_deepspeed_hostfile_form(recipe, tmp_path):
    p = plan(str(recipe), [], "deepspeed/2node", stage="pretrain", workdir=tmp_path)
    (argv,) = p.commands
    assert argv[2] == "deepspeed.launcher.runner" and "--no_local_rank" in argv
    assert "--master_addr=node1.example.internal" in argv
    assert argv[-2] == "launcher.remote_command"
    assert decode(argv[-1])["argv"] == ["pretrain", str(recipe)]
    hosts = commands.parse_hostfile(cluster_dir() / "deepspeed" / "hostfile.example")
    assert [(h.name, h.slots) for h in hosts] == [("node1.example.internal", 8),
                                                  ("node2.example.internal", 8)]
    bad = tmp_path / "hostfile"
    bad.write_text("node1 slots=16\n")
    prof = tmp_path / "ds.yaml"
    prof.write_text(f"kind: deepspeed\nhostfile: {bad}\ngpus_per_node: 8\n")
    with pytest.raises(LaunchError, match="slots=16.*gpus_per_node: 8"):
        plan(str(recipe), [], str(prof), workdir=tmp_path)
    bad.write_text("node1 gpus=4\n")
    with pytest.raises(LaunchError, match="hostname slots=N"):
        commands.parse_hostfile(bad)


# --- errors before submission ---------------------------------------------------------

def test_more_gpu_processes_than_gpus_is_refused(recipe, tmp_path):
    with pytest.raises(ConfigError, match="nproc_per_node.*gpus_per_node: 4"):
        plan(str(recipe), [], "slurm/cpu", ["gpus_per_node=4", "nproc_per_node=8"],
             workdir=tmp_path)
    with pytest.raises(ConfigError, match="gpus_per_node"):
        load_profile("torchrun/2node", ["gpus_per_node=1", "nproc_per_node=2"])


def test_bad_profiles(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_profile("no/such/profile")
    p = tmp_path / "p.yaml"
    p.write_text("kind: pbs\n")
    with pytest.raises(ConfigError, match="kind: must be one of"):
        load_profile(str(p))
    p.write_text("kind: slurm\nnodez: 2\n")
    with pytest.raises(ConfigError, match="nodez"):
        load_profile(str(p))
    p.write_text("kind: slurm\npartition: 'a;b'\n")
    with pytest.raises(ConfigError, match="partition"):
        load_profile(str(p))
    p.write_text("kind: slurm\ntime: soon\n")
    with pytest.raises(ConfigError, match="time"):
        load_profile(str(p))


def test_invalid_recipe_submits_nothing(recipe, tmp_path, monkeypatch, capsys,
                                       tiny_teacher_nohead_dir, isolated_cache):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="max_steps"):
        plan(str(recipe), ["train.max_steps=0"], "slurm/cpu", workdir=tmp_path)
    from distill_cli.main import main

    # Model-aware validation (distill_pretrain.validate): the recipe distils logits
    # (logit_kl) from a teacher without an MLM head.
    rc = main(["launch", str(recipe), f"teacher.path={tiny_teacher_nohead_dir}",
               "--cluster", "slurm/cpu"])
    assert rc == 2
    assert "head" in capsys.readouterr().err
    assert not (tmp_path / "slurm-logs").exists() and not jobs.jobs_dir().exists()


def test_no_sbatch_on_path(recipe, tmp_path, monkeypatch, capsys, isolated_cache):
    from distill_cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    rc = main(["launch", str(recipe), "--cluster", "slurm/cpu"])
    assert rc == 2
    assert "`sbatch` is not on the PATH" in capsys.readouterr().err
    assert not (tmp_path / "slurm-logs").exists()
    assert not jobs.jobs_dir().exists()
    # A dry run needs no Slurm at all.
    assert main(["launch", str(recipe), "--cluster", "slurm/cpu", "--dry-run"]) == 0
    assert "#SBATCH --nodes=1" in capsys.readouterr().out


def test_unreachable_ray_address(recipe, tmp_path, free_port, capsys, isolated_cache):
    from distill_cli.main import main

    rc = main(["launch", str(recipe), "--cluster", "ray/local", "--stage", "prep",
               "--set", f"address=http://127.0.0.1:{free_port}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"cannot reach the Ray cluster at http://127.0.0.1:{free_port}" in err
    assert not jobs.jobs_dir().exists()


def test_job_control_without_a_record(isolated_cache, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(LaunchError, match="--ray-address"):
        control.resolve("raysubmit_abc")
    assert control.resolve("1234").scheduler == "slurm"
    rec = control.resolve("raysubmit_abc", "http://127.0.0.1:1")
    assert rec.scheduler == "ray" and rec.address == "http://127.0.0.1:1"
    jobs.save(jobs.JobRecord(scheduler="ray", job_id="distill-x", recipe="r", stage="prep",
                             profile="p", address="http://h:8265"))
    assert control.resolve("distill-x").address == "http://h:8265"


def test_template_errors_and_quoting():
    assert render("a={{ v }} b={{ w | raw }}", {"v": "x y", "w": "$HOME"}) == \
        "a='x y' b=$HOME"
    assert render("{{ v }}", {"v": ["a b", "c"]}) == "'a b' c"
    with pytest.raises(LaunchError, match="placeholder"):
        render("{{ missing }}", {})


def test_job_name_with_newline_is_refused(recipe, tmp_path):
    with pytest.raises(LaunchError, match="control"):
        plan(str(recipe), [], "slurm/cpu", job_name="a\nb", workdir=tmp_path)


def test_launch_help_lists_job_actions():
    r = subprocess.run([sys.executable, "-m", "distill_cli", "launch", "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0
    assert "status|logs|cancel JOB" in r.stdout and "--dry-run" in r.stdout


def test_local_profile_runs_the_stage_and_reports_failure(recipe, tmp_path, monkeypatch):
    """`--cluster local` runs the command in the foreground: prep really writes shards,
    and a failing stage comes back as a LaunchError naming the command."""
    monkeypatch.chdir(tmp_path)
    shards = tmp_path / "local shards"
    p = plan(str(recipe), [f"prep.output_dir={shards}"], "local", stage="prep",
             workdir=tmp_path)
    from launcher.launch import execute

    assert execute(p) == 0
    assert (shards / "manifest.json").is_file()
    bad = plan(str(recipe), [f"prep.output_dir={tmp_path / 'bad'}",
                             f"prep.sources=[{tmp_path / 'no-such-corpus'}]"], "local",
               stage="prep", workdir=tmp_path)
    with pytest.raises(LaunchError, match="distill_cli prep .* exited with"):
        execute(bad)
    assert not (tmp_path / "bad" / "manifest.json").exists()


def test_ray_submission_waits_for_a_job_agent_that_is_not_up_yet(monkeypatch):
    """A fresh or busy Ray head answers "No available agent ... try again later" until its
    dashboard agent is up: the submission retries; any other error is raised at once."""
    from launcher import ray_jobs

    class Client:
        def __init__(self, failures: int, message: str):
            self.failures, self.message, self.calls = failures, message, 0

        def submit_job(self, **kw):
            self.calls += 1
            if self.calls <= self.failures:
                raise RuntimeError(self.message)
            return kw["submission_id"]

    busy = ("Request failed with status code 500: No available agent to submit job, "
            "please try again later..")
    monkeypatch.setattr(ray_jobs.time, "sleep", lambda s: None)
    client = Client(2, busy)
    monkeypatch.setattr(ray_jobs, "_client", lambda addr: client)
    assert ray_jobs.submit("http://127.0.0.1:1", "true", {}, "job-a", {}) == "job-a"
    assert client.calls == 3
    client = Client(1, "Request failed with status code 400: bad runtime_env")
    with pytest.raises(RuntimeError, match="bad runtime_env"):
        ray_jobs.submit("http://127.0.0.1:1", "true", {}, "job-b", {})
    assert client.calls == 1
    client = Client(100, busy)  # never up: gives up after the wait
    with pytest.raises(RuntimeError, match="try again later"):
        ray_jobs.submit("http://127.0.0.1:1", "true", {}, "job-c", {}, agent_wait_s=0.0)
