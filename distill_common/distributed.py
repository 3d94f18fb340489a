"""The distributed world of one process: device, backend, rank, and the collectives.

One module for pretraining and fine-tuning (it never imports DeepSpeed; pretraining's
engine adopts the process group made here). It owns every decision that differs between
a GPU cluster and this CPU machine, so no caller makes them again:

* the device: CUDA GPU ``LOCAL_RANK`` when CUDA is visible, ``device`` allows it and
  ``DS_ACCELERATOR`` is not ``cpu``; else the CPU. A rank whose LOCAL_RANK has no GPU is
  an error, not a second rank on GPU 0 (NCCL refuses two ranks on one device);
* the backend: NCCL on CUDA, gloo on CPU (``DISTILL_DIST_BACKEND`` overrides);
* the timeout of every collective;
* the launch variables of torchrun / the ``deepspeed`` launcher / Ray Train (RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and Slurm ``srun`` (SLURM_PROCID...,
  translated here);
* the device of collective tensors: NCCL has no CPU backend ("No backend type associated
  with device type cpu") while gloo takes CPU tensors, so ``World`` builds every
  collective tensor on ``collective_device``; a caller cannot pick a wrong one.

A world of one skips collectives, which would hide a wrong device from one-GPU checks:
``DISTILL_FORCE_COLLECTIVES=1`` (or ``force_collectives=True``) issues them anyway.
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from distill_common.errors import DistillUserError

log = logging.getLogger(__name__)

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
BACKENDS = ("auto", "nccl", "gloo")


class DistributedUserError(DistillUserError, RuntimeError):
    """A launch environment or device request that cannot work; names the fix."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "gloo"
    force_collectives: bool = False
    """Issue collectives even in a world of one (to check device rules on one GPU)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def collective_device(self) -> torch.device:
        """Where collective tensors live: the GPU for NCCL, the CPU for gloo."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    @property
    def communicates(self) -> bool:
        """Whether collectives are issued (a process group exists and they are needed)."""
        return dist.is_initialized() and (self.world_size > 1 or self.force_collectives)

    def all_reduce(self, values: Sequence[float] | torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce a small vector of numbers over ranks; returns it (float64) on the CPU.
        A device tensor is reduced where it is (no host round trip before the call)."""
        t = torch.as_tensor(values, dtype=torch.float64)
        if self.communicates:
            t = t.to(self.collective_device)
            dist.all_reduce(t, op=_OPS[op])
        return t.cpu()

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on at least one rank; every rank gets the same."""
        return bool(self.all_reduce([1.0 if flag else 0.0], "max")[0] > 0)

    def barrier(self) -> None:
        if self.communicates:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.communicates:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.communicates:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.collective_device)
        return box[0]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX, torch's own probes).
    Without it oneDNN emulates bf16 matmuls: 70x slower than fp32 on an AVX2-only AMD
    EPYC (1,024 x 384 by 384 x 1,536, one thread)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


# --- launch environment ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment_from_slurm() -> None:
    """srun sets SLURM_* only; torch.distributed reads RANK/WORLD_SIZE/MASTER_*."""
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    if "SLURM_NTASKS_PER_NODE" in env:
        env.setdefault("LOCAL_WORLD_SIZE", env["SLURM_NTASKS_PER_NODE"].split("(")[0])
    if "MASTER_ADDR" not in env:
        raise DistributedUserError(
            "Slurm run without MASTER_ADDR: export MASTER_ADDR (the first host of "
            "$SLURM_JOB_NODELIST) and MASTER_PORT in the sbatch script (the launcher's "
            "Slurm template does)")
    env.setdefault("MASTER_PORT", "29500")


def launched_world_size() -> int:
    """WORLD_SIZE as the launcher set it (torchrun, Slurm, Ray Train), 1 without one."""
    _environment_from_slurm()
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """RANK as the launcher set it, 0 without one (the process that writes shared files)."""
    _environment_from_slurm()
    return int(os.environ.get("RANK", "0"))


def cuda_wanted(requested: str = "auto") -> bool:
    """Whether this process should use a GPU: visible, allowed by ``requested`` and not
    turned off with DS_ACCELERATOR=cpu (which the CPU profiles set)."""
    if requested not in ("auto", "cuda", "cpu"):
        raise DistributedUserError(f"device must be auto, cuda or cpu, got {requested!r}")
    forced_cpu = os.environ.get("DS_ACCELERATOR", "").lower() == "cpu"
    available = torch.cuda.is_available()
    if requested == "cuda" and (forced_cpu or not available):
        why = "DS_ACCELERATOR=cpu is set" if forced_cpu else "no CUDA GPU is visible"
        raise DistributedUserError(f"device=cuda but {why}; use device=auto or cpu, or "
                                   f"unset DS_ACCELERATOR")
    return requested != "cpu" and available and not forced_cpu


def pick_device(requested: str = "auto") -> torch.device:
    """The device of this rank: GPU LOCAL_RANK (checked against the GPUs this process
    sees) or the CPU."""
    if not cuda_wanted(requested):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DistributedUserError(
            f"LOCAL_RANK={local_rank} but this process sees {count} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            f"start at most {count} process(es) per node (nproc_per_node / "
            f"--ntasks-per-node) or make every GPU visible to every rank")
    return torch.device("cuda", local_rank)


def pick_backend(device: torch.device, requested: str | None = None) -> str:
    backend = (requested or os.environ.get("DISTILL_DIST_BACKEND") or "auto").lower()
    if backend not in BACKENDS:
        raise DistributedUserError(f"DISTILL_DIST_BACKEND={backend!r}: use one of {BACKENDS}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise DistributedUserError("the NCCL backend needs CUDA devices; this rank runs on "
                                   "the CPU: use gloo (or auto)")
    return backend


def _force_collectives(requested: bool | None) -> bool:
    if requested is not None:
        return requested
    return os.environ.get("DISTILL_FORCE_COLLECTIVES", "0").lower() in ("1", "true", "yes")


def init_world(device: str = "auto", *, timeout_min: float = 30.0,
               always_group: bool = False, backend: str | None = None,
               force_collectives: bool | None = None) -> World:
    """Join the job this process was launched into (or make a world of one) and describe
    this rank. A process group is created when there are several ranks, when
    ``always_group`` (DeepSpeed needs one even alone) or when collectives are forced.
    Idempotent: a second call describes the existing group."""
    _environment_from_slurm()
    force = _force_collectives(force_collectives)
    dev = pick_device(device)
    chosen_backend = pick_backend(dev, backend)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_initialized() and (size > 1 or always_group or force):
        if "RANK" not in os.environ:  # a single process: a world of one on loopback
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(
            backend=chosen_backend, timeout=datetime.timedelta(minutes=timeout_min),
            device_id=dev if dev.type == "cuda" else None)
    if dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        rank = int(os.environ.get("RANK", "0"))
    world = World(rank=rank, world_size=size,
                  local_rank=int(os.environ.get("LOCAL_RANK", "0")), device=dev,
                  backend=chosen_backend, force_collectives=force)
    log.debug("rank %d of %d on %s (%s)", world.rank, world.world_size, dev, chosen_backend)
    return world


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --- checks that need every rank ------------------------------------------------------------


def check_shared_folder(world: World, folder: str | Path, what: str) -> None:
    """Every rank must see the files rank 0 writes into ``folder`` (checkpoints are
    written by all ranks into one folder and read back by rank 0 and on resume). Rank 0
    writes a token file; every rank reads it; a rank that cannot is named in the error,
    which every rank raises."""
    if not world.communicates:
        return
    folder = Path(folder)
    token = secrets.token_hex(8) if world.is_main else None
    if world.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f".shared-{token}").write_text(token)
    token = world.broadcast_object(token)
    path = folder / f".shared-{token}"
    try:
        seen = path.read_text() == token
    except OSError:
        seen = False
    views = world.gather_objects((seen, socket.gethostname()))
    world.barrier()
    if world.is_main:
        path.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise DistributedUserError(
            f"{what} {folder} is not shared: {', '.join(blind)} cannot see the file rank 0 "
            f"wrote there. Every rank writes its part of each checkpoint into this folder "
            f"and resume reads them all: put it on a filesystem every node mounts at the "
            f"same path (NFS, Lustre, GPFS...)")
