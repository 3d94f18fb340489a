"""Distributed setup in one function: NCCL on GPUs, gloo on CPU.

Works for every way a run is started: a plain ``distill pretrain`` (no RANK in the
environment: a world of one is set up here, on a free loopback port, so DeepSpeed does not
go looking for MPI), torchrun / the ``deepspeed`` launcher (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), and Slurm ``srun`` (SLURM_PROCID etc., translated here).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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
    if "MASTER_ADDR" not in env:
        raise RuntimeError("Slurm run without MASTER_ADDR: export MASTER_ADDR (the first "
                           "host of $SLURM_JOB_NODELIST) and MASTER_PORT in the sbatch "
                           "script (the launcher's Slurm template does)")
    env.setdefault("MASTER_PORT", "29500")


def pick_device(requested: str = "auto") -> torch.device:
    use_cuda = torch.cuda.is_available() and requested in ("auto", "cuda") and \
        os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    if requested == "cuda" and not use_cuda:
        raise RuntimeError("train.device=cuda but no CUDA GPU is visible (or "
                           "DS_ACCELERATOR=cpu is set); use train.device=auto or cpu")
    if use_cuda:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(requested_device: str = "auto", timeout_min: float = 30.0) -> World:
    """Initialise torch.distributed (through DeepSpeed, which needs its own bookkeeping)
    once per process and describe this rank. Idempotent."""
    import deepspeed

    _environment_from_slurm()
    if "RANK" not in os.environ:  # a single process: a world of one on loopback
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    device = pick_device(requested_device)
    if device.type == "cpu":
        # DeepSpeed picks its accelerator from this variable at import time elsewhere.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(minutes=timeout_min))
    world = World(rank=torch.distributed.get_rank(),
                  world_size=torch.distributed.get_world_size(),
                  local_rank=int(os.environ.get("LOCAL_RANK", "0")), device=device,
                  backend=backend)
    log.debug("rank %d of %d on %s (%s)", world.rank, world.world_size, device, backend)
    return world


def all_reduce(values: list[float] | torch.Tensor, op: str = "sum",
               device: torch.device | None = None) -> torch.Tensor:
    """All-reduce a small vector of numbers (float64) across ranks; a no-op copy for a world
    of one."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if device is not None:
        t = t.to(device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
               "min": torch.distributed.ReduceOp.MIN}
        torch.distributed.all_reduce(t, op=ops[op])
    return t.cpu()


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True when ``flag`` is true on at least one rank; every rank gets the same answer."""
    return bool(all_reduce([1.0 if flag else 0.0], "max", device)[0] > 0)


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def all_gather_object(obj):
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
