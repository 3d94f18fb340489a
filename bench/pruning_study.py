"""Students worth serving: is a student pruned out of the teacher and then distilled
better, at a given wall-clock budget, than one distilled from SVD embeddings? Score
after 0, 15, 30 and 60 minutes of distillation on this machine, size and CPU latency.

  (p0) the student pruned out of the teacher, not distilled (`distill init RECIPE`);
  (p)  pruned, then distilled with the recipe (default configs/mpnet-6x384-pruned.yaml),
       one run of --steps steps, its checkpoints nearest each budget exported;
  (s)  SVD embeddings + random layers of (p)'s shape, heads included (an unset num_heads
       keeps the teacher's head size for any init; the teacher's layers cannot be copied
       into a narrower student: student.py supports them only at the teacher's shape),
       distilled in a run of the same steps, batch, teacher layer and relation heads
       with the overrides of S_OVERRIDES: no hidden_cosine (it compares the channels a
       pruned student kept, which a random student does not have) and the learning rate
       of a from-scratch start; (s0) is that student before distillation;
  the teacher.

Every model is fine-tuned with bench/quality.py's protocol and helpers (kept results,
paired-bootstrap intervals) on every task; the teacher may get fewer seeds
(--teacher-seeds: fine-tuning the 12 x 768 teacher is the slow part on a CPU). Writes
OUT/pruning_study.md (the table), OUT/budget_curve.png, OUT/report/ (finetune's report:
size, parameters, latency at batch 1 and 32, gaps to the teacher) and prints one JSON
line with the issue's targets checked. Margins with paired intervals: (p) - (s) at each
budget, and what distillation added to each start, (p@B) - (p0) and (s@B) - (s0). Rerun
it and it continues: the runs resume from their checkpoints, exports and fine-tunings
already done are kept.

    python bench/pruning_study.py --steps 1400 --save-every 100 [--minutes 15,30,60]
        [--recipe mpnet-6x384-pruned] [--seeds 0,1] [--teacher-seeds 0]
        [--tasks bbc_news,wiki_topic,movie_sentiment,oanc_pos] [--holdout-tasks ...]
        [--task-set T:K=V]
        [--min-steps 150] [--max-train 0] [--s-set KEY=VALUE] [--out runs/pruning]
        [--speedup-target 5] [--skip s0] [--student-lr 3e-4,1e-3] [--runs p,s] [--distil-only]

--student-lr 3e-4,1e-3 also fine-tunes each student at those learning rates and scores it,
per task, at the rate whose seeds' mean validation score is best (a small student learns
slower than its teacher at the teacher's rate: 4 x 256 students were still learning after
150 steps at 1e-4); the table gives the rate chosen, and the task-rate results are kept.

--steps sizes the runs to the largest budget: measure a few steps' pace first (the run
ends, and its learning rate reaches zero, at --steps; a budget point is the checkpoint
written nearest that many minutes, bench/budget_curve.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import quality
from budget_curve import (checkpoint_steps, elapsed_by_step, nearest_checkpoints,
                          plot_budget_curve)
from pruning_table import markdown_table, targets

ROOT = quality.ROOT
S_OVERRIDES = ["student.init=random", "student.embedding_init=svd",
               "student.layer_selection=null", "student.prune_depth=null",
               "objective.hidden_cosine=null", "train.lr=5.0e-4"]
"""(s): SVD embeddings + random layers; the objective without the term only a pruned
student can take; the project's from-scratch learning rate (the pruned recipe's lower
rate is for a student that starts near a solution)."""
TASKS = "bbc_news,wiki_topic,movie_sentiment,oanc_pos"


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="mpnet-6x384-pruned")
    ap.add_argument("--steps", type=int, required=True,
                    help="train.max_steps of both runs, sized to the largest budget")
    ap.add_argument("--save-every", type=int, required=True,
                    help="checkpoint every N steps (budget points are checkpoints)")
    ap.add_argument("--minutes", default="15,30,60", help="budgets after 0 minutes")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--teacher-seeds", default="", help="default: --seeds")
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--holdout-tasks", default="",
                    help="tasks whose validation and test texts the shards hold out "
                         "(default: --tasks); give the full list when --tasks is a subset, "
                         "so that the run can be continued with more tasks on its shards")
    ap.add_argument("--task-set", dest="task_set", action="append", default=[],
                    help="TASK:KEY=VALUE, as in bench/quality.py")
    ap.add_argument("--min-steps", type=int, default=150)
    ap.add_argument("--max-train", type=int, default=0)
    ap.add_argument("--s-set", dest="s_set", action="append", default=[],
                    help="more recipe overrides for (s), after S_OVERRIDES")
    ap.add_argument("--set", dest="extra", action="append", default=[],
                    help="recipe overrides for both runs")
    ap.add_argument("--cluster", default="local/2proc")
    ap.add_argument("--out", default="runs/pruning")
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--speedup-target", type=float, default=5.0,
                    help="CPU speed-up (p) must reach at batch 1 and 32 (the issue: 5x for "
                         "MPNet-base -> 6 x 384, 4x for MiniLM-L6 -> 4 x 256)")
    ap.add_argument("--skip", default="",
                    help="models not fine-tuned nor reported, e.g. s0 (the random-layer "
                         "student before distillation) when time is short")
    ap.add_argument("--student-lr", default=[],
                    type=lambda text: [float(x) for x in text.split(",") if x],
                    help="more fine-tuning learning rates for the students, e.g. 3e-4,1e-3: "
                         "each student is fine-tuned at its task's rate and at these, and "
                         "scored at the one with the best mean validation score, per task "
                         "(the teacher keeps its task's rate); the report, table and plot "
                         "are written apart (OUT/report-lr-grid/, OUT/summary-lr-grid.json, "
                         "...) beside those of the task's rate")
    ap.add_argument("--runs", default=["p", "s"],
                    type=lambda text: [x for x in text.split(",") if x],
                    help="the runs to distil and score: p,s (default), or p alone for one "
                         "more budget point of (p) when there is not time for both (the "
                         "(p) - (s) margins are then left out)")
    ap.add_argument("--distil-only", action="store_true",
                    help="stop after the runs, the initial students and the exports")
    return ap.parse_args()


def main() -> int:
    args = _args()
    from distill_common.logs import setup_logging
    setup_logging()
    log = logging.getLogger("bench.pruning_study")

    if not args.runs or set(args.runs) - {"p", "s"}:
        raise SystemExit(f"--runs {','.join(args.runs)!r}: give p,s (both runs), p or s")
    out = (ROOT / args.out).resolve()
    tasks = [t for t in args.tasks.split(",") if t]
    seeds = [int(s) for s in args.seeds.split(",")]
    teacher_seeds = [int(s) for s in (args.teacher_seeds or args.seeds).split(",")]
    budgets = [float(m) for m in args.minutes.split(",")]
    held = [t for t in args.holdout_tasks.split(",") if t] or tasks
    files, shared = quality.task_inputs(tasks, held, args.task_set, seeds, out)
    shared += [f"prep.output_dir={out / 'shards'}", *args.extra]
    overrides_of = {"p": [], "s": [*S_OVERRIDES, *args.s_set]}
    runs = {name: overrides_of[name] for name in ("p", "s") if name in args.runs}
    timings, models, points = {}, {}, {}
    for name, overrides in runs.items():
        t0 = time.perf_counter()
        quality.distill_cli("run", args.recipe, f"output_dir={out / name}", *shared,
                            *overrides, f"train.max_steps={args.steps}",
                            f"train.save_every={args.save_every}", "train.keep_last=100000",
                            "--stages", "prep,pretrain,export", "--cluster", args.cluster)
        timings[f"{name}_run_s"] = round(time.perf_counter() - t0, 1)
        start = out / f"{name}0" / "student"
        if not (start / "config.json").is_file():
            quality.distill_cli("init", args.recipe, str(start), f"output_dir={out / name}0",
                                *shared, *overrides)
        models[f"{name}0"] = str(start)
        points[f"{name}0"] = {"budget": 0.0, "minutes": 0.0, "step": 0}
        for budget, chosen in _budget_points(out / name, budgets).items():
            key = f"{name}@{budget:g}"
            models[key], points[key] = chosen.pop("folder"), {"budget": budget, **chosen}
    log.info("models: %s", json.dumps(points))
    if args.distil_only:
        return 0

    from finetune import build_report
    from finetune.config import FinetuneConfig, ReportConfig
    from finetune.train import choose_on_validation
    from launcher.recipe import load_recipe
    from distill_common.assets import resolve_model_dir

    recipe = load_recipe(args.recipe, [f"output_dir={out / 'p'}", *shared])
    skipped = {name for name in args.skip.split(",") if name}
    models = {name: folder for name, folder in models.items() if name not in skipped}
    models = {"teacher": str(resolve_model_dir(recipe.teacher.path)), **models}
    tag = "-lr-grid" if args.student_lr else ""
    results: dict = {}
    t0 = time.perf_counter()
    for task in tasks:  # task-major: a task's comparison is complete before the next
        for name, folder in models.items():
            student = name != "teacher"
            runs = {}
            for lr in [None, *args.student_lr] if student else [None]:  # None: the task's rate
                cfg = FinetuneConfig(tasks=[files[task]], save_model="none",
                                     seeds=seeds if student else teacher_seeds,
                                     learning_rate=lr,
                                     max_train_examples=args.max_train or None,
                                     min_steps=args.min_steps or None)
                where = out / "finetune" / (f"lr-{lr:g}" if lr else "") / name / task
                runs[lr] = quality.finetuned(folder, files[task], where, cfg, log)
            res = choose_on_validation(runs)
            results.setdefault(name, {})[task] = res
            log.info("%s on %s: %.4f +- %.4f (lr %s)", name, task, res["score"],
                     res["score_std"], res["learning_rate"])
    timings["finetune_s"] = round(time.perf_counter() - t0, 1)
    report = build_report(models, results, out / f"report{tag}", "teacher",
                          ReportConfig(latency_repeats=10, bootstrap_draws=args.draws))
    summary = _summary(args, tasks, budgets, models, points, results, report, timings)
    (out / f"pruning_study{tag}.md").write_text(markdown_table(summary))
    summary["plot"] = str(_plot(summary, tasks, out / f"budget_curve{tag}.png"))
    (out / f"summary{tag}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


def _budget_points(run_dir: Path, budgets: list[float]) -> dict[float, dict]:
    """Export the run's checkpoint nearest each budget (once: run_dir/export/step-N);
    {budget: {"folder", "step", "minutes"}}."""
    train_dir = run_dir / "pretrain"
    elapsed = elapsed_by_step(train_dir / "metrics.jsonl")
    chosen = nearest_checkpoints(checkpoint_steps(train_dir / "checkpoints"), elapsed, budgets)
    for point in chosen.values():
        folder = run_dir / "export" / Path(point.pop("path")).name
        if not (folder / "config.json").is_file():
            quality.distill_cli("export", str(train_dir / "checkpoints" / folder.name),
                                str(folder))
        point["folder"] = str(folder)
    return chosen


def _summary(args, tasks, budgets, models, points, results, report, timings) -> dict:
    from finetune.compare import compare_results

    rows = {}
    for name in models:
        measured = report["models"][name]
        rows[name] = {**points.get(name, {}), "path": models[name],
                      "parameters_M": round(measured["parameters"] / 1e6, 2),
                      "size_mib": measured["size_mib"], "speedup": measured["speedup"],
                      "cpu_ms": {f"b{r['batch']}": r["median_ms"]
                                 for r in measured["cpu"]},
                      "tasks": {}}
        for task in tasks:
            entry = measured["tasks"][task]
            rows[name]["tasks"][task] = {
                **quality.model_scores(results[name][task]), "ci95": entry["ci95"],
                "retention_pct": entry["retention_pct"], "seeds": entry["seeds"],
                "vs_teacher": entry.get("vs_teacher"),
                "learning_rate": results[name][task].get("learning_rate"),
                "lr_validation": results[name][task].get("lr_validation")}
    pairs = {"0": ("p0", "s0"), **{f"{b:g}": (f"p@{b:g}", f"s@{b:g}") for b in budgets}}
    p_vs_s = {label: {task: compare_results(results[p][task], results[s][task],
                                            draws=args.draws) for task in tasks}
              for label, (p, s) in pairs.items() if p in results and s in results}
    # What distillation added to each start: (p@B) - (p0), (s@B) - (s0), seeds paired.
    gains = {f"{x}@{b:g}": {task: compare_results(results[f"{x}@{b:g}"][task],
                                                  results[f"{x}0"][task], draws=args.draws)
                            for task in tasks}
             for x in ("p", "s") for b in budgets
             if f"{x}@{b:g}" in results and f"{x}0" in results}
    summary = {"bench": "pruning_study", "recipe": args.recipe, "steps": args.steps,
               "runs": args.runs,
               "save_every": args.save_every, "s_overrides": S_OVERRIDES + args.s_set,
               "seeds": args.seeds, "teacher_seeds": args.teacher_seeds or args.seeds,
               "finetune": {"min_steps": args.min_steps, "max_train": args.max_train,
                            "task_set": args.task_set,
                            "student_lr": args.student_lr},
               "tasks": tasks, "budgets": budgets, "models": rows, "p_minus_s": p_vs_s,
               "distillation_gain": gains,
               "speedup_target": args.speedup_target, "skipped": args.skip,
               "timings": timings}
    summary["targets"] = targets(summary)
    return summary


def _plot(summary: dict, tasks: list[str], path: Path) -> Path:
    curves = {}
    for name, row in summary["models"].items():
        if name == "teacher":
            continue
        series = "(p) pruned + distilled" if name.startswith("p") else \
            "(s) SVD embeddings + distilled"
        for task in tasks:
            t = row["tasks"][task]
            curves.setdefault(series, {}).setdefault(task, []).append(
                {"minutes": row["minutes"], "score": t["mean"], "ci95": t["ci95"]})
    teacher = {task: summary["models"]["teacher"]["tasks"][task]["mean"] for task in tasks}
    return plot_budget_curve(curves, teacher, path)


if __name__ == "__main__":
    sys.exit(main())
