"""`python -m launcher.ray_train [--num-workers N ...] -- RECIPE [k=v...]`: distillation
on a Ray cluster through Ray Train.

A ``TorchTrainer`` places N workers, each reserving its CPUs/GPUs. Each worker runs its
rank of ``distill pretrain`` as a child process, exactly as torchrun would start it
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: rank 0's node and a free port,
agreed through Ray Train's process group store), for two reasons:

* a SIGTERM must save a checkpoint. Ray runs the training function in a thread of the
  worker, where no signal handler can be installed, and Ray's own handler ends the
  worker at once, and Ray then SIGKILLs the worker's child processes. The child's main
  thread has the handler. In the worker, this module replaces Ray's handler when it is
  imported (Ray imports it on the worker's main thread to unpickle the training
  function): a SIGTERM is passed on to the rank, which saves and exits, and only then
  does the training function end (with an error, so that Ray Train retries).
* a failed or stopped rank is retried: ``--max-failures`` (Ray Train's FailureConfig)
  restarts the workers, and the new children resume from the newest checkpoint
  (``train.resume=auto``), so a retry costs the steps since the last save at most.

`distill launch` submits this module as the entrypoint of a Ray job.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading

log = logging.getLogger(__name__)
_RENDEZVOUS_KEY = "distill/rank0_address"
_RANKS: set[subprocess.Popen] = set()
"""Rank processes this worker runs (one at a time)."""


def _pass_sigterm_to_the_rank(previous):
    def handler(signum, frame):
        running = [p for p in _RANKS if p.poll() is None]
        if not running:  # nothing to save: Ray's own handling (the worker exits)
            if callable(previous):
                previous(signum, frame)
            return
        for rank in running:
            rank.send_signal(signal.SIGTERM)  # it saves a checkpoint, then exits
    return handler


if threading.current_thread() is threading.main_thread() and "ray" in sys.modules:
    signal.signal(signal.SIGTERM, _pass_sigterm_to_the_rank(signal.getsignal(signal.SIGTERM)))


def _rendezvous() -> str:
    """``host:port`` for the child ranks' process group: rank 0 picks a free port on its
    node and publishes it in the store of the group Ray Train made; the others read it."""
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank() == 0:
        import ray.util

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        store.set(_RENDEZVOUS_KEY, f"{ray.util.get_node_ip_address()}:{port}")
    return store.get(_RENDEZVOUS_KEY).decode()


def _rank_env(address: str) -> dict[str, str]:
    import torch
    import torch.distributed as dist
    from ray import train

    from distill_common.lifeline import child_env

    context = train.get_context()
    local_rank = context.get_local_rank()
    if torch.cuda.is_available() and torch.cuda.device_count() <= local_rank:
        local_rank = 0  # this worker sees only its own GPU
    host, port = address.rsplit(":", 1)
    return {**os.environ, **child_env(), "RANK": str(dist.get_rank()),
            "WORLD_SIZE": str(dist.get_world_size()), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(context.get_local_world_size()), "MASTER_ADDR": host,
            "MASTER_PORT": port}


def _pretrain_rank(config: dict) -> None:
    """Ray Train worker body: one rank of `distill pretrain`, in a child process."""
    from distill_common.lifeline import die_with_parent

    env = _rank_env(_rendezvous())
    rank = env["RANK"]
    proc = subprocess.Popen([sys.executable, "-m", "distill_cli", "pretrain", config["recipe"],
                             *config["overrides"]], env=env, preexec_fn=die_with_parent)
    _RANKS.add(proc)
    try:
        code = proc.wait()
    except BaseException:  # the worker is being torn down: give the rank time to save
        proc.terminate()
        proc.wait(timeout=120)
        raise
    finally:
        _RANKS.discard(proc)
    if code == 143:
        raise RuntimeError(f"rank {rank} was stopped by SIGTERM after saving a checkpoint; "
                           f"a retry resumes from it")
    if code != 0:
        raise RuntimeError(f"distill pretrain exited with {code} on rank {rank}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launcher.ray_train",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--max-failures", type=int, default=3,
                   help="times Ray Train restarts the workers after a failure or a stop "
                        "(each restart resumes from the newest checkpoint)")
    p.add_argument("--storage-path", default=None,
                   help="Ray Train run folder (default: Ray's, ~/ray_results)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": args.cpus_per_worker}
    if args.gpus_per_worker:
        resources["GPU"] = args.gpus_per_worker
    # The function by reference (this module, imported, not `__main__`): each worker then
    # imports the module, on its main thread, which installs the SIGTERM pass-through.
    from launcher.ray_train import _pretrain_rank as worker_body

    trainer = TorchTrainer(
        worker_body,
        train_loop_config={"recipe": args.recipe, "overrides": list(args.overrides)},
        scaling_config=ScalingConfig(num_workers=args.num_workers,
                                     use_gpu=args.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name="distill-pretrain", storage_path=args.storage_path,
                             failure_config=FailureConfig(max_failures=args.max_failures)),
    )
    trainer.fit()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
