"""`distill launch RECIPE [k=v...] --cluster PROFILE [--stage S] [--dry-run]` and
`distill launch status|logs|cancel JOB`; also where `distill run` and `distill doctor`
are registered."""

from __future__ import annotations

import argparse
import importlib.util

JOB_ACTIONS = ("status", "logs", "cancel")


def register(sub, add_recipe_args) -> None:
    p = sub.add_parser(
        "launch", help="run a recipe locally, multi-node (torchrun, DeepSpeed hostfile), "
                       "on Slurm or on Ray; or ask about / cancel a submitted job",
        description="distill launch RECIPE [KEY=VALUE ...] --cluster PROFILE "
                    "[--stage prep|pretrain|finetune|all] [--dry-run]\n"
                    "distill launch status|logs|cancel JOB [--wait] [--ray-address URL]\n\n"
                    "PROFILE is a file under cluster/ (e.g. `local`, `torchrun/2node`, "
                    "`slurm/cpu`, `ray/local`) or a path. The recipe and its overrides "
                    "are passed to the job unchanged.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p)
    p.add_argument("--cluster", metavar="PROFILE", help="cluster profile (name or path)")
    p.add_argument("--stage", default="pretrain",
                   choices=["prep", "pretrain", "finetune", "all"],
                   help="what to run (default: pretrain)")
    p.add_argument("--set", dest="profile_overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a profile field, e.g. --set nodes=4")
    p.add_argument("--job-name", help="job name (default distill-<recipe name>-<stage>)")
    p.add_argument("--dry-run", action="store_true",
                   help="print exactly what would run (commands, rendered scripts) and "
                        "submit nothing")
    p.add_argument("--wait", action="store_true",
                   help="status: wait until the job ends; exit 0 only if it succeeded")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="status --wait: give up after this many seconds")
    p.add_argument("--ray-address", help="status/logs/cancel of a Ray job submitted "
                                         "elsewhere: the dashboard URL")
    p.set_defaults(func=_launch)

    from launcher import doctor

    doctor.register(sub)

    # ---- `distill run RECIPE [k=v...] [--stages ...]`: the pipeline --------------------
    # launcher/pipeline.py (the lead's) registers its subcommand here, through its own
    # `register(sub, add_recipe_args)`; nothing else in this file needs to change.
    if importlib.util.find_spec("launcher.pipeline") is not None:
        from launcher import pipeline

        if hasattr(pipeline, "register"):
            pipeline.register(sub, add_recipe_args)
    # ---- end of `distill run` ----------------------------------------------------------


def _launch(args: argparse.Namespace) -> int:
    from launcher.errors import LaunchError

    if args.recipe in JOB_ACTIONS:
        if len(args.overrides) != 1:
            raise LaunchError(f"usage: distill launch {args.recipe} JOB")
        return _job_action(args.recipe, args.overrides[0], args)
    if not args.cluster:
        raise LaunchError("--cluster PROFILE is required (e.g. --cluster local, "
                          "--cluster slurm/cpu, or a path to a profile YAML)")
    from launcher.launch import execute, plan

    p = plan(args.recipe, args.overrides, args.cluster, args.profile_overrides,
             stage=args.stage, job_name=args.job_name)
    if args.dry_run:
        print(p.describe(), end="")
        return 0
    return execute(p)


def _job_action(action: str, job: str, args: argparse.Namespace) -> int:
    from launcher import control

    record = control.resolve(job, args.ray_address)
    if action == "status":
        st = control.wait(record, args.timeout) if args.wait else control.state(record)
        print(f"{record.job_id} {st}")
        if args.wait:
            return 0 if st.split()[0] in control.SUCCESS else 1
        return 0
    if action == "logs":
        print(control.logs(record), end="")
        return 0
    print(control.cancel(record))
    return 0
