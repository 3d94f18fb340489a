"""`python -m launcher.ray_train [--num-workers N ...] -- RECIPE [k=v...]`: distillation
on a Ray cluster through Ray Train.

A ``TorchTrainer`` places N workers (each reserving its CPUs/GPUs), sets up the torch
process group between them (gloo on CPU, NCCL on GPUs) and the usual RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR variables; each worker then runs one rank of
``distill pretrain``, whose DeepSpeed engine uses that process group. `distill launch`
submits this module as the entrypoint of a Ray job.
"""

from __future__ import annotations

import argparse
import sys


def _pretrain_rank(config: dict) -> None:
    """Ray Train worker body: one rank of `distill pretrain`, called directly."""
    from distill_common.logs import setup_logging
    from distill_pretrain.train import run_pretrain
    from launcher.recipe import load_recipe

    setup_logging()
    run_pretrain(load_recipe(config["recipe"], config["overrides"]).pretrain_job())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launcher.ray_train",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--storage-path", default=None,
                   help="Ray Train run folder (default: Ray's, ~/ray_results)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": args.cpus_per_worker}
    if args.gpus_per_worker:
        resources["GPU"] = args.gpus_per_worker
    trainer = TorchTrainer(
        _pretrain_rank,
        train_loop_config={"recipe": args.recipe, "overrides": list(args.overrides)},
        scaling_config=ScalingConfig(num_workers=args.num_workers,
                                     use_gpu=args.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name="distill-pretrain", storage_path=args.storage_path),
    )
    trainer.fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
