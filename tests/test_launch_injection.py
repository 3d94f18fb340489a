"""A `$(...)` payload in a recipe path and in an override is never executed, whatever the
profile, and what runs is what --dry-run printed.

Each profile's plan is really executed where that can happen here: `local` (prep) and
`torchrun` (one agent, pretraining) for real; `deepspeed` through DeepSpeed's own runner
with a stand-in `pdsh` that runs each host's command with `bash -c`, as ssh's remote
shell would (two real ranks train); `slurm` through the real `distill launch` with a
stand-in `sbatch`, then the submitted script under bash with `srun` / `scontrol` stand-ins
(the prep step really runs); `ray` and the KubeRay manifest through `sh -c`, as Ray's job
supervisor runs an entrypoint (shell=True), with a recording interpreter. The payload
touches the file named by $DISTILL_TEST_MARKER, set in every process of the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from launch_fixtures import prepared_shards, write_executable, write_tiny_recipe
from launcher.errors import LaunchError
from launcher.launch import plan
from launcher.remote_command import SHELL_SAFE, decode, encode

MARKER_ENV = "DISTILL_TEST_MARKER"
PAYLOAD = (f"$(touch ${MARKER_ENV}) `touch ${MARKER_ENV}`; touch ${MARKER_ENV} "
           f"\"$(touch ${MARKER_ENV})\" 'q\"x")


@dataclass
class Evil:
    recipe: Path
    """A recipe in a folder whose name is the payload."""
    override: str
    marker: Path
    env: dict


@pytest.fixture
def evil(tmp_path, tiny_teacher_dir, tiny_corpus_dir, monkeypatch) -> Evil:
    marker = tmp_path / "pwned"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    folder = tmp_path / f"recipes {PAYLOAD}"
    recipe = write_tiny_recipe(folder, tiny_teacher_dir, tiny_corpus_dir, max_steps=1)
    env = {**os.environ, "DISTILL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return Evil(recipe, f"train.output_dir={tmp_path / 'out'} {PAYLOAD}", marker, env)


@pytest.fixture
def shards(tmp_path, tmp_path_factory, tiny_teacher_dir, tiny_corpus_dir) -> Path:
    """Shards of the tiny corpus, made once per session (a plain folder name)."""
    return prepared_shards(tmp_path_factory.getbasetemp(), write_tiny_recipe(
        tmp_path / "plain", tiny_teacher_dir, tiny_corpus_dir))


def _launch(args: list[str], env: dict, cwd: Path, timeout: float = 300,
            path_prefix: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m distill_cli launch ARGS` in a session of its own, killed whole at the
    end whatever happens (no rank is left behind)."""
    if path_prefix is not None:
        env = {**env, "PATH": f"{path_prefix}:{env['PATH']}"}
    proc = subprocess.Popen([sys.executable, "-m", "distill_cli", "launch", *args], env=env,
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def _dry_run_commands(args: list[str], env: dict, cwd: Path) -> list[list[str]]:
    r = _launch([*args, "--dry-run"], env, cwd, timeout=120)
    assert r.returncode == 0, r.stdout
    return [shlex.split(line) for line in r.stdout.splitlines()
            if line.strip() and not line.startswith("#")]


def _ran(output: str) -> list[list[str]]:
    """The commands the launcher logged as it started them."""
    return [shlex.split(line.split("running: ", 1)[1]) for line in output.splitlines()
            if "running: " in line]



@pytest.mark.slow
def test_local_profile_runs_the_payload_as_text(evil, tmp_path):
    shards = tmp_path / f"shards {PAYLOAD}"
    args = [str(evil.recipe), f"prep.output_dir={shards}", "--cluster", "local",
            "--stage", "prep"]
    printed = _dry_run_commands(args, evil.env, tmp_path)
    r = _launch(args, evil.env, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:]
    assert (shards / "manifest.json").is_file()
    # The printed line is `env K=V ... ARGV`; what ran is ARGV, word for word.
    assert [cmd[cmd.index("-m") - 1:] for cmd in printed] == _ran(r.stdout)
    assert not evil.marker.exists()


@pytest.mark.slow
def test_torchrun_profile_passes_the_payload_to_the_rank(evil, tmp_path, shards, free_port):
    args = [str(evil.recipe), f"train.data_dir={shards}", evil.override,
            "--cluster", "torchrun/2node", "--stage", "pretrain", "--set", "nnodes=1",
            "--set", f"rdzv_endpoint=127.0.0.1:{free_port}"]
    printed = _dry_run_commands(args, evil.env, tmp_path)
    r = _launch(args, evil.env, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:]
    assert [cmd[cmd.index("-m") - 1:] for cmd in printed] == _ran(r.stdout)
    out = Path(evil.override.split("=", 1)[1])
    assert (out / "checkpoints").is_dir()  # the rank got the override as one word
    assert not evil.marker.exists()


FAKE_PDSH = """#!{python}
# pdsh -S -f N -w host1,host2 WORDS...: pdsh joins WORDS with spaces into the command
# ssh runs on each host (its shell); %n becomes the host's index. Here `bash -c` plays
# each host's shell.
import json, subprocess, sys
args = sys.argv[1:]
at = args.index("-w")
hosts, remote = args[at + 1].split(","), " ".join(args[at + 2:])
with open({log!r}, "a") as f:
    f.write(json.dumps(remote) + "\\n")
procs = [subprocess.Popen(["bash", "-c", remote.replace("%n", str(i))])
         for i in range(len(hosts))]
sys.exit(max(p.wait() for p in procs))
"""


@pytest.mark.slow
def test_deepspeed_remote_shell_sees_one_inert_word(evil, tmp_path, shards, free_port):
    work = tmp_path / "work"
    work.mkdir()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two "hosts", one rank each
    profile = tmp_path / "ds.yaml"
    profile.write_text(f"kind: deepspeed\nhostfile: {hostfile}\nmaster_port: {free_port}\n")
    bin_dir, remote_log = tmp_path / "bin", tmp_path / "remote-commands.jsonl"
    write_executable(bin_dir / "pdsh", FAKE_PDSH.format(python=sys.executable, log=str(remote_log)))
    write_executable(bin_dir / "ssh", "#!/bin/sh\nexec hostname\n")  # DeepSpeed's ssh check
    args = [str(evil.recipe), f"train.data_dir={shards}", evil.override,
            "--cluster", str(profile), "--stage", "pretrain"]
    (printed,) = _dry_run_commands(args, evil.env, work)
    shm_before = set(Path("/dev/shm").glob("deepspeed_*"))
    try:
        r = _launch(args, evil.env, work, path_prefix=bin_dir)
    finally:  # DeepSpeed's launcher leaves its shared-memory buffers behind
        for leftover in set(Path("/dev/shm").glob("deepspeed_*")) - shm_before:
            leftover.unlink(missing_ok=True)
    assert r.returncode == 0, r.stdout[-4000:]
    assert not evil.marker.exists()
    (ran,) = _ran(r.stdout)
    assert printed[printed.index("-m") - 1:] == ran
    # The command every host's shell ran carries the payload only inside the base64 word,
    # which decodes to exactly the recipe and overrides given.
    (remote,) = [json.loads(line) for line in remote_log.read_text().splitlines()]
    assert ran[-1] in remote.split() and "$(" not in remote and "`" not in remote
    assert decode(ran[-1])["argv"] == ["pretrain", str(evil.recipe),
                                       f"train.data_dir={shards}", evil.override]
    out = Path(evil.override.split("=", 1)[1])
    (ckpt,) = sorted((out / "checkpoints").glob("step-*"))
    assert json.loads((ckpt / "complete.json").read_text())["world_size"] == 2


def test_deepspeed_refuses_what_it_would_write_unquoted(evil, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    profile = tmp_path / "ds.yaml"
    profile.write_text(f"kind: deepspeed\nhostfile: {hostfile}\n")
    with pytest.raises(LaunchError, match="working folder .* remote shell"):
        plan(str(evil.recipe), [], str(profile), workdir=evil.recipe.parent)
    with pytest.raises(LaunchError, match="interpreter"):
        plan(str(evil.recipe), [], str(profile), [f"python=/opt/x {PAYLOAD}/python"],
             workdir=tmp_path)
    hostfile.write_text("node1;touch slots=1\n")
    with pytest.raises(LaunchError, match="host"):
        plan(str(evil.recipe), [], str(profile), workdir=tmp_path)


FAKE_SBATCH = """#!/bin/sh
# Records what `distill launch` submits (argv, one per line) and says job 4242.
printf '%s\\n' "$@" > {log}
echo 4242
"""
FAKE_SRUN = """#!/bin/sh
# srun [--options] COMMAND ARGS: run COMMAND with its arguments, no shell in between.
while [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done
exec "$@"
"""


@pytest.mark.slow
def test_slurm_script_runs_the_payload_as_text(evil, tmp_path):
    shards = tmp_path / f"shards {PAYLOAD}"
    bin_dir, submitted = tmp_path / "bin", tmp_path / "sbatch-argv"
    write_executable(bin_dir / "sbatch", FAKE_SBATCH.format(log=shlex.quote(str(submitted))))
    write_executable(bin_dir / "srun", FAKE_SRUN)
    write_executable(bin_dir / "scontrol", "#!/bin/sh\necho localhost\n")
    args = [str(evil.recipe), f"prep.output_dir={shards}", "--cluster", "slurm/cpu",
            "--stage", "prep", "--job-name", f"job {PAYLOAD}"]
    dry = _launch([*args, "--dry-run"], evil.env, tmp_path, path_prefix=bin_dir)
    r = _launch(args, evil.env, tmp_path, path_prefix=bin_dir)
    assert r.returncode == 0 and r.stdout.split()[-1] == "4242", r.stdout
    argv = submitted.read_text().splitlines()
    script = Path(argv[-1]).read_text()
    assert script.rstrip("\n") in dry.stdout  # the file is the script --dry-run printed
    assert argv[:2] == ["--parsable", f"--job-name=job {PAYLOAD}"]
    assert argv[-1].endswith(".sbatch") and "$" not in Path(argv[-1]).name
    # Run it as a Slurm node would: bash, the job's variables, srun starting the step.
    job_env = {**evil.env, "PATH": f"{bin_dir}:{evil.env['PATH']}", "SLURM_JOB_ID": "4242",
               "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1"}
    done = subprocess.run(["bash", argv[-1]], env=job_env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"(job {PAYLOAD})" in done.stdout  # the job name arrived as plain text
    assert (shards / "manifest.json").is_file()
    assert not evil.marker.exists()


RECORDING_PYTHON = """#!{python}
import json, sys
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def test_ray_entrypoint_and_rayjob_manifest_through_a_shell(evil, tmp_path):
    log = tmp_path / "argv.jsonl"
    python = write_executable(tmp_path / "bin" / "python", RECORDING_PYTHON.format(
        python=sys.executable, log=str(log)))
    p = plan(str(evil.recipe), [evil.override], "ray/local", [f"python={python}"],
             stage="all", workdir=tmp_path)
    manifest = yaml.safe_load(p.rayjob_manifest)["spec"]["entrypoint"]
    for entry in (p.ray_entrypoint, manifest):
        log.unlink(missing_ok=True)
        for shell in ("sh", "bash"):  # Ray's job supervisor: Popen(entry, shell=True)
            r = subprocess.run([shell, "-c", entry], cwd=tmp_path, capture_output=True,
                               text=True, env=evil.env)
            assert r.returncode == 0, r.stderr
        runs = [json.loads(line) for line in log.read_text().splitlines()]
        assert len(runs) == 2 * 3  # prep, Ray Train, the rest; once per shell
        for argv in runs:
            assert str(evil.recipe) in argv and evil.override in argv
    assert not evil.marker.exists()


def test_encoded_command_survives_any_shell(tmp_path):
    argv = ["pretrain", f"/x/{PAYLOAD}/r.yaml", f"a.b={PAYLOAD}", "", "-", "\n\t\\", "é ü 日本"]
    word = encode(argv, tmp_path / PAYLOAD, {"K": PAYLOAD})
    assert SHELL_SAFE.match(word) and word[0].isalnum()
    for shell in ("sh", "bash"):
        echoed = subprocess.run([shell, "-c", f"printf %s {word}"], capture_output=True,
                                text=True).stdout
        assert echoed == word
    payload = decode(word)
    assert payload["argv"] == argv and payload["cwd"] == str(tmp_path / PAYLOAD)
    assert payload["env"]["K"] == PAYLOAD and payload["env"]["DISTILL_DIE_WITH_PARENT"] == "1"
    with pytest.raises(LaunchError, match="not an encoded command"):
        decode("bm90IGpzb24")
