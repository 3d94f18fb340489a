"""`distill run RECIPE`: prep -> pretrain -> export -> finetune -> report.

Each stage is skipped when its output exists and was made from the same config (the
fingerprint recorded in ``<output_dir>/.pipeline/<stage>.json``), so a rerun after a
failure resumes where it stopped: a half-finished pretraining resumes from its newest
complete checkpoint (``train.resume=auto``). Pretraining runs as its own processes (one,
or torchrun ranks when the local profile asks for several); prep uses Ray as configured;
fine-tuning and the report run here. Clusters: ``distill launch --stage all``.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from distill_common import lifeline
from launcher import commands
from launcher.errors import LaunchError
from launcher.fingerprint import (STAGES, changed_keys, fingerprint, read_record,
                                  stage_inputs, write_record)
from launcher.recipe import load_recipe, resolve_recipe_path, validate_recipe

log = logging.getLogger(__name__)


class PipelineUserError(LaunchError):
    """A pipeline that cannot go on as asked; the message says what to do."""


def register(sub, add_recipe_args) -> None:
    p = sub.add_parser(
        "run", help="the whole chain: prep -> pretrain -> export -> finetune -> report "
                    "(finished stages are skipped)",
        description="Run the pipeline locally. Stages whose output exists and was made "
                    "from the same config are skipped; an interrupted run resumes.")
    add_recipe_args(p)
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    p.add_argument("--cluster", default="local",
                   help="local profile for pretraining (e.g. `local`, `local/2proc`); "
                        "for Slurm/Ray/multi-node use `distill launch --stage all`")
    p.add_argument("--force", default="",
                   help="comma-separated stages to redo even if their output is current")
    p.add_argument("--dry-run", action="store_true",
                   help="print which stages would run or be skipped, and the pretrain "
                        "command, then stop")
    p.set_defaults(func=_cli)


def _split(value: str, what: str) -> list[str]:
    names = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in names if s not in STAGES]
    if bad:
        raise PipelineUserError(f"{what}: unknown stage(s) {bad}; stages are "
                                f"{', '.join(STAGES)}")
    return names


def _cli(args: argparse.Namespace) -> int:
    summary = run_pipeline(args.recipe, args.overrides, stages=_split(args.stages, "--stages"),
                           cluster=args.cluster, force=_split(args.force, "--force"),
                           dry_run=args.dry_run)
    report_md = summary.get("report_md")
    if report_md and Path(report_md).is_file():
        print(Path(report_md).read_text())
    return 0


# ------------------------------------------------------------------ stage outputs

def _outputs_exist(recipe, stage: str) -> bool:
    if stage == "prep":
        return (Path(recipe.prep.output_dir) / "manifest.json").is_file()
    if stage in ("pretrain", "export"):
        return (Path(recipe.train.export_dir) / "config.json").is_file()
    if stage == "finetune":
        return (Path(recipe.finetune.output_dir) / "results.json").is_file()
    if stage == "report":
        return (Path(recipe.report.output_dir) / "report.json").is_file()
    return False


def _teacher_dir(recipe) -> Path:
    from distill_common.assets import resolve_model_dir

    return resolve_model_dir(recipe.teacher.path)


# ------------------------------------------------------------------ the stages

def _stage_prep(ctx: "_Context") -> dict:
    from data_prep import run_prep

    manifest = run_prep(ctx.recipe.prep, str(_teacher_dir(ctx.recipe)))
    splits = manifest.get("splits", {})
    return {"dir": ctx.recipe.prep.output_dir,
            "train_tokens": splits.get("train", {}).get("tokens"),
            "validation_tokens": splits.get("validation", {}).get("tokens")}


def _pretrain_argv(ctx: "_Context") -> tuple[list[str], dict]:
    from launcher.machine import resolve_local
    from launcher.profiles import LocalProfile, load_profile

    profile, path = load_profile(ctx.cluster)
    if not isinstance(profile, LocalProfile):
        raise PipelineUserError(
            f"--cluster {ctx.cluster}: `distill run` runs on this machine and takes a local "
            f"profile; {path} is a {profile.kind} profile. Use `distill launch "
            f"{ctx.recipe_arg} --cluster {ctx.cluster} --stage all` instead.")
    profile, machine_env, _ = resolve_local(profile, path)  # `auto` counts, CPU or GPU
    step = commands.Step("pretrain", ("pretrain", ctx.recipe_path, *ctx.overrides), True)
    python = commands.python_for(profile)
    if profile.nproc_per_node > 1:
        argv = commands.standalone_torchrun_argv(python, profile.nproc_per_node, step)
    else:
        argv = commands.distill_argv(python, step)
    return argv, {**profile.env, **machine_env}


def _stage_pretrain(ctx: "_Context") -> dict:
    argv, env = _pretrain_argv(ctx)
    full_env = {**os.environ, **env, **lifeline.child_env()}  # ranks die with us
    full_env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    log.info("pretrain: %s", " ".join(argv))
    proc = subprocess.run(argv, env=full_env, preexec_fn=lifeline.die_with_parent)
    if proc.returncode != 0:
        raise PipelineUserError(
            f"pretrain failed (exit {proc.returncode}); its log is above. Fix the cause "
            f"and rerun the same command: finished stages are skipped and pretraining "
            f"resumes from its newest complete checkpoint in {ctx.recipe.train.output_dir}")
    return {"checkpoints": ctx.recipe.train.output_dir, "student": ctx.recipe.train.export_dir}


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def _stage_export(ctx: "_Context") -> dict:
    # Pretraining exports at its end too; doing it again from the newest complete
    # checkpoint is cheap and makes `--force export` (or an exporter fix) take effect.
    from distill_pretrain.export import export_checkpoint

    train = ctx.recipe.train
    out = export_checkpoint(train.output_dir, train.export_dir, onnx=train.export_onnx,
                            onnx_int8=train.export_onnx_int8)
    return {"student": str(out)}


def _models(recipe) -> dict[str, str]:
    return {"teacher": str(_teacher_dir(recipe)), "student": recipe.train.export_dir}


def _stage_finetune(ctx: "_Context") -> dict:
    import json

    from distill_common.fsio import atomic_write_json
    from finetune import run_models

    log.info("finetune: teacher and student on %s", ", ".join(ctx.recipe.finetune.tasks))
    results = run_models(_models(ctx.recipe), ctx.recipe.finetune.output_dir,
                         ctx.recipe.finetune)
    path = Path(ctx.recipe.finetune.output_dir) / "results.json"
    atomic_write_json(path, json.loads(json.dumps(results, default=str)))
    return {"results": str(path)}


def _stage_report(ctx: "_Context") -> dict:
    import json

    from finetune import build_report, load_task

    results = json.loads((Path(ctx.recipe.finetune.output_dir) / "results.json").read_text())
    tasks = [load_task(spec) for spec in ctx.recipe.finetune.tasks]
    curves = Path(ctx.recipe.train.output_dir) / "metrics.jsonl"
    build_report(_models(ctx.recipe), results, ctx.recipe.report.output_dir, "teacher",
                 ctx.recipe.report, task_configs={t.name: t for t in tasks},
                 pretrain_metrics={"student": curves})
    return {"report_md": str(Path(ctx.recipe.report.output_dir) / "report.md"),
            "report_json": str(Path(ctx.recipe.report.output_dir) / "report.json")}


_RUNNERS: dict[str, Callable[["_Context"], dict]] = {
    "prep": _stage_prep, "pretrain": _stage_pretrain, "export": _stage_export,
    "finetune": _stage_finetune, "report": _stage_report}


class _Context:
    def __init__(self, recipe_arg: str, overrides: list[str], cluster: str):
        self.recipe_arg = recipe_arg
        self.recipe_path = str(resolve_recipe_path(recipe_arg).resolve())
        self.overrides = list(overrides)
        self.cluster = cluster
        self.recipe = load_recipe(self.recipe_path, self.overrides)

    def add_override(self, key: str, value: str) -> None:
        self.overrides = [o for o in self.overrides if not o.startswith(f"{key}=")]
        self.overrides.append(f"{key}={value}")
        self.recipe = load_recipe(self.recipe_path, self.overrides)


def _hold_out_eval_text(ctx: _Context) -> None:
    """Keep the fine-tuning tasks' validation/test documents out of the shards."""
    if ctx.recipe.prep.holdout is not None or not ctx.recipe.finetune.tasks:
        return
    from finetune.holdout import write_holdout_file

    path = Path(ctx.recipe.output_dir).resolve() / "holdout.txt"
    n = write_holdout_file(list(ctx.recipe.finetune.tasks), path)
    log.info("holding out %d evaluation documents of %s from the shards (%s)", n,
             ", ".join(ctx.recipe.finetune.tasks), path)
    ctx.add_override("prep.holdout", str(path))


def run_pipeline(recipe_arg: str, overrides: Sequence[str] = (),
                 stages: Sequence[str] = STAGES, cluster: str = "local",
                 force: Sequence[str] = (), dry_run: bool = False) -> dict:
    """Run the chosen stages in order; returns the outputs of the last run or skipped
    stage of each (``report_md`` among them once the report exists)."""
    ctx = _Context(recipe_arg, list(overrides), cluster)
    validate_recipe(ctx.recipe)  # before anything expensive starts
    _hold_out_eval_text(ctx)
    summary: dict = {}
    started = time.perf_counter()
    for stage in STAGES:
        if stage not in stages:
            continue
        fp = fingerprint(ctx.recipe, stage)
        record = read_record(ctx.recipe, stage)
        current = record is not None and record.get("fingerprint") == fp
        if current and _outputs_exist(ctx.recipe, stage) and stage not in force:
            log.info("%s: up to date (fingerprint %s), skipped", stage, fp)
            summary.update(record.get("outputs", {}))
            continue
        if record is not None and not current and stage not in force \
                and _outputs_exist(ctx.recipe, stage):
            changed = changed_keys(record.get("inputs", {}), stage_inputs(ctx.recipe, stage))
            raise PipelineUserError(
                f"{stage}: the output in {ctx.recipe.output_dir} was made from a different "
                f"config (changed: {', '.join(changed[:8]) or 'upstream outputs'}). Use "
                f"another output_dir, or pass --force {stage} to redo it (and what follows).")
        if dry_run:
            what = "would run"
            if stage == "pretrain":
                what += ": " + " ".join(_pretrain_argv(ctx)[0])
            print(f"{stage}: {what}")
            continue
        log.info("%s: running (fingerprint %s)", stage, fp)
        t0 = time.perf_counter()
        outputs = _RUNNERS[stage](ctx)
        seconds = time.perf_counter() - t0
        write_record(ctx.recipe, stage, seconds, outputs)
        log.info("%s: done in %.0f s", stage, seconds)
        summary.update(outputs)
        # Anything downstream of a redone stage must be redone too.
        force = list(force) + STAGES[STAGES.index(stage) + 1:]
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary
