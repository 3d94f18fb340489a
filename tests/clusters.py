"""Real schedulers for the launcher tests, started here and stopped by PID.

- ``slurm_cluster()``: munged + slurmctld + slurmd, one node (this host, 127.0.0.1, 2 CPUs),
  with every socket, port, state, spool, log and pid file in a private folder, so nothing
  touches /etc/slurm or the system munge. Needs root and Debian's ``slurm-wlm`` and
  ``munge`` (``.ci/install-system-deps``).
- ``ray_head()``: ``ray start --head --block`` on 127.0.0.1 with a private temp dir and a
  capped object store.

Both are context managers; the daemons are stopped (TERM, then KILL) by the PIDs we
started, also when the body raises. Nothing here ever runs ``ray stop`` or ``pkill``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str | None:
    # slurmctld / munged live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def slurm_unavailable_reason() -> str | None:
    """Why a private Slurm cannot be started here, or None when it can."""
    missing = [b for b in SLURM_BINARIES if _which(b) is None]
    if missing:
        return (f"Slurm/munge not installed (missing {', '.join(missing)}); run "
                f".ci/install-system-deps as root")
    if os.geteuid() != 0:
        return "the single-node Slurm test cluster needs root (slurmd runs jobs as root)"
    return None


def _stop(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """TERM every process we started (and its process group), then KILL stragglers."""
    for p in reversed(procs):
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in reversed(procs):
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def _wait_until(check, what: str, log: Path | None, timeout: float,
                procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            break
        if check():
            return
        time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f}s; log tail:\n{tail}")


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    env: dict
    """Environment for clients (sbatch, squeue, ...): SLURM_CONF points at our config."""


def _slurm_conf(root: Path, node: str, munge_socket: Path) -> str:
    return "\n".join([
        "ClusterName=distilltest",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/builtin",
        # Tests wait on the scheduler: run its loop every 2 s, not every 60 s.
        "SchedulerParameters=sched_interval=2",
        "MpiDefault=none",
        "ReturnToService=2",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MinJobAge=600",
        "KillWait=5",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 2} State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


@contextlib.contextmanager
def slurm_cluster() -> Iterator[SlurmCluster]:
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    os.chmod(root, 0o700)
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir()
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    os.chmod(key, 0o400)
    munge_socket = root / "munge" / "munge.sock"
    node = socket.gethostname().split(".")[0]
    # Jobs use the node name as the torchrun rendezvous host: it must resolve.
    try:
        socket.gethostbyname(node)
    except OSError:
        node = "localhost"
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, node, munge_socket))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs: list[subprocess.Popen] = []

    def start(argv: list[str], log_name: str) -> subprocess.Popen:
        log = open(root / log_name, "ab")
        p = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        procs.append(p)
        return p

    try:
        start([_which("munged"), "--foreground", "--force", f"--socket={munge_socket}",
               f"--key-file={key}", f"--pid-file={root}/munge/munged.pid",
               f"--log-file={root}/munge/munged.log",
               f"--seed-file={root}/munge/munged.seed"], "munged.out")
        _wait_until(munge_socket.exists, "munged", root / "munge" / "munged.log", 15, procs)
        start([_which("slurmctld"), "-D", "-i", "-f", str(conf)], "slurmctld.out")

        def controller_up() -> bool:
            r = subprocess.run([_which("scontrol"), "ping"], env=env, capture_output=True,
                               text=True)
            return "UP" in r.stdout

        _wait_until(controller_up, "slurmctld", root / "slurmctld.log", 30, procs)
        start([_which("slurmd"), "-D", "-N", node, "-f", str(conf)], "slurmd.out")

        def node_idle() -> bool:
            r = subprocess.run([_which("sinfo") or "sinfo", "-h", "-N", "-o", "%T"], env=env,
                               capture_output=True, text=True)
            return r.stdout.strip().startswith("idle")

        _wait_until(node_idle, "slurmd", root / "slurmd.log", 30, procs)
        yield SlurmCluster(root=root, conf=conf, node=node, env=env)
    finally:
        _stop(procs)
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class RayHead:
    address: str
    """Dashboard / job-submission address, ``http://127.0.0.1:PORT``."""
    gcs_address: str
    env: dict
    temp_dir: Path


def ray_env() -> dict:
    """Loopback-only, no token auth, no usage stats (see STACK_NOTES)."""
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _stop_tree(proc: subprocess.Popen, known: dict, timeout: float = 4.0) -> None:
    """TERM `ray start` and every process it spawned (psutil handles, so a recycled PID
    is never hit), give them `timeout` seconds, then KILL what is left."""
    import psutil

    for p in _descendants(proc.pid):
        known.setdefault(p.pid, p)
    victims = list(known.values())
    with contextlib.suppress(psutil.NoSuchProcess):
        victims.append(psutil.Process(proc.pid))
    for p in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(victims, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@contextlib.contextmanager
def ray_head(ray_bin: str, num_cpus: int = 2) -> Iterator[RayHead]:
    # Unix socket paths must stay short (< 108 bytes): a short folder under /tmp.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    gcs_port, dash_port = free_port(), free_port()
    env = ray_env()
    log = open(temp_dir / "ray-start.out", "ab")
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash_port}", "--include-dashboard=true",
         # Ray's fixed defaults (agent 52365, client server 10001) would collide with
         # another Ray on this machine (a test's local prep Ray running beside this one):
         # the second job agent would never come up.
         f"--dashboard-agent-listen-port={free_port()}",
         f"--ray-client-server-port={free_port()}",
         f"--num-cpus={num_cpus}", "--object-store-memory=200000000",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    address = f"http://127.0.0.1:{dash_port}"
    known: dict = {}

    def jobs_api_up() -> bool:
        import urllib.request

        for p in _descendants(proc.pid):
            known.setdefault(p.pid, p)
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        _wait_until(jobs_api_up, "ray head", temp_dir / "ray-start.out", 90, [proc])
        yield RayHead(address=address, gcs_address=f"127.0.0.1:{gcs_port}", env=env,
                      temp_dir=temp_dir)
    finally:
        _stop_tree(proc, known)
        shutil.rmtree(temp_dir, ignore_errors=True)
