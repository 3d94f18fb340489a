"""Cluster profiles: *where* and *how* a recipe runs, never *what* it computes.

A profile is a small YAML file under ``cluster/`` (or any path) whose ``kind`` picks one of
the typed dataclasses below; it is parsed with the same loader as recipes
(``distill_common.config.load_config``), so unknown keys, wrong types and bad values are
errors that name the file and the key. Training settings (steps, batch size, precision,
ZeRO stage) live in the recipe; a profile only says how many nodes, processes, GPUs,
which partition or Ray address, and how to set up the environment on the nodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

import yaml

from distill_common.config import ConfigError, check, check_choice, load_config
from distill_common.resources import shipped_folder
from launcher.job_env import JobEnvironment

KINDS = ("local", "torchrun", "deepspeed", "slurm", "ray")

# Slurm option values that go on `#SBATCH` lines, which sbatch parses itself (not a shell):
# we only let through characters that need no quoting there.
_SBATCH_SAFE = re.compile(r"^[A-Za-z0-9_.,:+@%=/-]+$")
_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
AUTO = "auto"
"""`nproc_per_node` / `gpus_per_node` of a local profile: what this machine shows."""


def slurm_time_seconds(time: str) -> int:
    """A Slurm time limit in seconds: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`."""
    days, _, rest = time.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-H[:M[:S]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:  # M, M:S or H:M:S
        hours, minutes, seconds = {1: [0, *parts, 0], 2: [0, *parts]}.get(len(parts), parts)
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def _check_gpus(nproc_per_node: int, gpus_per_node: int) -> None:
    check(gpus_per_node >= 0, "gpus_per_node", f"must be >= 0, got {gpus_per_node}")
    check(nproc_per_node >= 1, "nproc_per_node", f"must be >= 1, got {nproc_per_node}")
    # One training process per GPU: asking for more processes than the node's declared
    # GPUs would put two ranks on one device (or fail to start).
    check(gpus_per_node == 0 or nproc_per_node <= gpus_per_node, "nproc_per_node",
          f"asks for {nproc_per_node} GPU processes per node but the profile declares "
          f"gpus_per_node: {gpus_per_node}; lower nproc_per_node or raise gpus_per_node")


@dataclass
class LocalProfile(JobEnvironment):
    """This machine: one process, or `torchrun --standalone` with several."""

    kind: str = "local"
    """Always `local`."""
    nproc_per_node: Union[int, str] = 1
    """Training processes for `pretrain` (torchrun --standalone when > 1); `auto`: one
    per GPU this machine shows when the launch is planned."""
    gpus_per_node: Union[int, str] = 0
    """GPUs on this machine (0: CPU, gloo); `auto`: the GPUs it shows at planning time.
    With no GPU visible the commands get DS_ACCELERATOR=cpu (unless `env` sets it)."""

    def __post_init__(self):
        check_choice(self.kind, "kind", ["local"])
        for name in ("nproc_per_node", "gpus_per_node"):
            value = getattr(self, name)
            check(isinstance(value, int) or value == AUTO, name,
                  f"must be a number or `{AUTO}`, got {value!r}")
        if isinstance(self.nproc_per_node, int) and isinstance(self.gpus_per_node, int):
            _check_gpus(self.nproc_per_node, self.gpus_per_node)
        self._check_env_fields()


@dataclass
class TorchrunProfile(JobEnvironment):
    """Multi-node torchrun: the same command on every node, c10d rendezvous."""

    kind: str = "torchrun"
    """Always `torchrun`."""
    nnodes: int = 2
    """Nodes (torchrun agents) that join the rendezvous."""
    nproc_per_node: int = 1
    """Training processes per node."""
    gpus_per_node: int = 0
    """GPUs per node (0: CPU, gloo)."""
    rdzv_endpoint: str = "127.0.0.1:29400"
    """host:port of the c10d rendezvous; the host is one of the nodes (usually the first)."""
    rdzv_id: str = "distill"
    """Rendezvous id shared by the agents of one job; change it between concurrent jobs."""
    max_restarts: int = 0
    """Times torchrun restarts the worker group after a failure (each restart resumes
    from the latest checkpoint when the recipe says `train.resume: auto`)."""

    def __post_init__(self):
        check_choice(self.kind, "kind", ["torchrun"])
        check(self.nnodes >= 1, "nnodes", f"must be >= 1, got {self.nnodes}")
        _check_gpus(self.nproc_per_node, self.gpus_per_node)
        host, _, port = self.rdzv_endpoint.rpartition(":")
        check(bool(host) and port.isdigit(), "rdzv_endpoint",
              f"must be host:port, got {self.rdzv_endpoint!r}")
        check(self.max_restarts >= 0, "max_restarts", "must be >= 0")
        self._check_env_fields()


@dataclass
class DeepSpeedProfile(JobEnvironment):
    """The DeepSpeed launcher with a hostfile (`host slots=N` per line); DeepSpeed reaches
    the other hosts over pdsh/ssh itself. The distill command travels to the hosts as one
    base64 word (launcher/remote_command.py) that no remote shell can misread; `env`
    travels inside it, secrets do not (set them in the hosts' own environment)."""

    kind: str = "deepspeed"
    """Always `deepspeed`."""
    hostfile: str = "hostfile"
    """DeepSpeed hostfile; a relative path is relative to the profile's folder."""
    master_port: int = 29500
    """Rendezvous port on the first host of the hostfile."""
    launcher: str = "pdsh"
    """How DeepSpeed starts the remote ranks: pdsh | openmpi | mvapich | slurm."""
    gpus_per_node: int = 0
    """GPUs per host (0: CPU); no host may have more slots than this when > 0."""

    def __post_init__(self):
        check_choice(self.kind, "kind", ["deepspeed"])
        check_choice(self.launcher, "launcher", ["pdsh", "openmpi", "mvapich", "slurm"])
        check(0 < self.master_port < 65536, "master_port", "must be a TCP port")
        check(self.gpus_per_node >= 0, "gpus_per_node", "must be >= 0")
        self._check_env_fields()


@dataclass
class SlurmProfile(JobEnvironment):
    """An sbatch job: one srun task per node, each starting torchrun (c10d rendezvous on
    the first node of the allocation)."""

    kind: str = "slurm"
    """Always `slurm`."""
    nodes: int = 1
    """Nodes to allocate."""
    nproc_per_node: int = 1
    """Training processes torchrun starts on each node."""
    gpus_per_node: int = 0
    """GPUs to allocate per node (`--gpus-per-node`); 0 for CPU jobs."""
    cpus_per_task: Optional[int] = None
    """CPUs for each node's task (all of torchrun's processes); default: Slurm's."""
    mem: Optional[str] = None
    """Memory per node, e.g. `64G`; default: Slurm's."""
    time: str = "01:00:00"
    """Time limit ([days-]hours:minutes:seconds)."""
    signal_lead_s: int = 180
    """Seconds before the time limit at which Slurm sends SIGTERM to the job's steps
    (`#SBATCH --signal=TERM@N`): pretraining saves a checkpoint and stops, and the next
    job resumes from it. 0: no early signal (only SIGTERM ~30 s before the kill)."""
    partition: Optional[str] = None
    """Partition; default: the cluster's default partition."""
    account: Optional[str] = None
    """Account to charge; default: yours."""
    qos: Optional[str] = None
    """Quality of service; default: the account's."""
    job_name: Optional[str] = None
    """Job name; default `distill-<recipe name>-<stage>`."""
    log_dir: str = "slurm-logs"
    """Folder for the rendered script and the per-job log `<job name>-<job id>.log`;
    relative to the folder you submit from."""
    requeue: bool = True
    """Let Slurm requeue the job on preemption or node failure; a restarted job resumes
    pretraining with `train.resume=auto`."""
    rdzv_port: int = 29500
    """Base rendezvous port on the first node; the job uses rdzv_port + job id % 1000 so
    jobs sharing a node do not collide."""
    template: str = "sbatch.sh.tmpl"
    """sbatch script template; a bare name is looked up in cluster/slurm/."""
    sbatch_options: List[str] = field(default_factory=list)
    """Further `#SBATCH` options, e.g. `--constraint=a100`, `--exclusive`."""
    setup: List[str] = field(default_factory=list)
    """Shell lines run before the job starts, e.g. `module load cuda/12.4`,
    `source ~/venvs/distill/bin/activate`. Written to the script as they are."""

    def __post_init__(self):
        check_choice(self.kind, "kind", ["slurm"])
        check(self.nodes >= 1, "nodes", f"must be >= 1, got {self.nodes}")
        _check_gpus(self.nproc_per_node, self.gpus_per_node)
        check(self.cpus_per_task is None or self.cpus_per_task >= 1, "cpus_per_task",
              "must be >= 1")
        check(bool(_SLURM_TIME.match(self.time)), "time",
              f"must look like 01:00:00 or 2-00:00:00, got {self.time!r}")
        limit = slurm_time_seconds(self.time)
        check(0 <= self.signal_lead_s < min(limit, 65536), "signal_lead_s",
              f"must be >= 0 and below the time limit ({self.time} = {limit} s), got "
              f"{self.signal_lead_s}")
        for name in ("mem", "partition", "account", "qos"):
            value = getattr(self, name)
            check(value is None or bool(_SBATCH_SAFE.match(value)), name,
                  f"{value!r} has characters Slurm does not accept here")
        for i, opt in enumerate(self.sbatch_options):
            check(opt.startswith("-") and "\n" not in opt and "\r" not in opt,
                  f"sbatch_options[{i}]", f"must be one option like --exclusive, got "
                                          f"{opt!r}")
        for i, line in enumerate(self.setup):
            check("\n" not in line, f"setup[{i}]", "one shell line per list item")
        check(0 < self.rdzv_port < 64536, "rdzv_port", "must be a TCP port below 64536")
        check(bool(self.log_dir.strip()), "log_dir", "must not be empty")
        self._check_env_fields()


@dataclass
class RayProfile(JobEnvironment):
    """A running Ray cluster: jobs go through its job-submission API; pretraining runs as
    a Ray Train `TorchTrainer` whose workers run the DeepSpeed trainer."""

    kind: str = "ray"
    """Always `ray`."""
    address: str = "http://127.0.0.1:8265"
    """The cluster's dashboard (job submission) address; `RAY_ADDRESS` overrides it. The
    job API has no authentication: keep the dashboard on 127.0.0.1 and reach it through
    an SSH tunnel or `kubectl port-forward` (cluster/README.md)."""
    num_workers: int = 1
    """Ray Train workers (training processes) for `pretrain`."""
    cpus_per_worker: float = 1.0
    """CPUs each training worker reserves."""
    gpus_per_worker: float = 0.0
    """Whole GPUs each training worker reserves (0: CPU, gloo). Fractions are refused:
    NCCL cannot put two ranks on one GPU."""
    max_failures: int = 3
    """Times Ray Train restarts the training workers after a failure or a stop; each
    restart resumes from the newest checkpoint (a SIGTERM saves one first)."""
    prep_workers: Optional[int] = None
    """Ray tasks in flight for `prep` (its `--workers`); default: the cluster's CPUs."""
    working_dir: Optional[str] = None
    """Folder uploaded with the job (Ray runtime_env). Default: none, the nodes share a
    filesystem and the job starts in the folder you submit from."""
    rayjob_template: str = "rayjob.yaml.tmpl"
    """KubeRay RayJob manifest template shown by --dry-run; a bare name is looked up in
    cluster/ray/."""

    def __post_init__(self):
        check_choice(self.kind, "kind", ["ray"])
        check(self.address.startswith(("http://", "https://")), "address",
              f"must be the dashboard URL, e.g. http://head:8265, got {self.address!r}")
        check(self.num_workers >= 1, "num_workers", "must be >= 1")
        check(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
        check(self.gpus_per_worker >= 0 and float(self.gpus_per_worker).is_integer(),
              "gpus_per_worker", f"must be a whole number of GPUs (0, 1, 2, ...), got "
                                 f"{self.gpus_per_worker}: NCCL refuses two ranks on one "
                                 f"GPU")
        check(self.prep_workers is None or self.prep_workers >= 0, "prep_workers",
              "must be >= 0")
        check(self.max_failures >= 0, "max_failures", "must be >= 0")
        self._check_env_fields()


Profile = Union[LocalProfile, TorchrunProfile, DeepSpeedProfile, SlurmProfile, RayProfile]
SCHEMAS = {"local": LocalProfile, "torchrun": TorchrunProfile,
           "deepspeed": DeepSpeedProfile, "slurm": SlurmProfile, "ray": RayProfile}


def cluster_dir() -> Path:
    """The shipped profiles and templates (distill_common.resources: installed with the
    package, or the repository's ``cluster/``; ``DISTILL_CLUSTER_DIR`` overrides)."""
    return shipped_folder("cluster")


def resolve_profile_path(name_or_path: str) -> Path:
    """``local`` -> cluster/local.yaml, ``slurm/cpu`` -> cluster/slurm/cpu.yaml; a path
    that exists (or ends in .yaml) is taken as it is."""
    p = Path(name_or_path)
    if p.is_file() or p.suffix in (".yaml", ".yml"):
        return p
    return cluster_dir() / f"{name_or_path}.yaml"


def profile_kind(path: Path) -> str:
    if not path.is_file():
        shipped = sorted(str(q.relative_to(cluster_dir()).with_suffix(""))
                         for q in cluster_dir().rglob("*.yaml") if _is_profile(q))
        raise ConfigError(f"{path}: cluster profile not found; pass a path or one of "
                          f"{shipped}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in SCHEMAS:
        raise ConfigError(f"{path}: kind: must be one of {list(KINDS)}, got {kind!r}")
    return kind


def _is_profile(path: Path) -> bool:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("kind") in SCHEMAS


def load_profile(name_or_path: str, overrides: Sequence[str] = ()) -> tuple[Profile, Path]:
    """Profile file (+ ``key=value`` overrides) -> (typed profile, its path)."""
    path = resolve_profile_path(name_or_path)
    kind = profile_kind(path)
    return load_config(SCHEMAS[kind], path, overrides), path


def is_profile_file(path: Path) -> bool:
    """True for YAML files under cluster/ that are launcher profiles (others are Ray
    cluster configs, KubeRay manifests, ...)."""
    return path.suffix in (".yaml", ".yml") and _is_profile(path)
