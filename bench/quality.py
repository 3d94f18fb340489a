"""Does distillation pay? The same student shape, three ways, fine-tuned on both real tasks.

  (a) distilled from the teacher with the recipe (default: configs/demo.yaml);
  (b) the same student initialised from teacher layers, not distilled;
  (c) the same student randomly initialised and trained with MLM only, same steps/data.

Each is fine-tuned on bbc_news and wiki_topic with several seeds (plus the teacher), and
the report gives mean +- std, retention of the teacher's score and the (a)-(b), (a)-(c)
margins. All share one set of shards with both tasks' evaluation documents held out.
Prints one JSON line. Not run in CI (tens of minutes on a 2-core CPU).

    python bench/quality.py [--recipe demo] [--steps 400] [--seeds 0,1,2]
        [--tasks bbc_news,wiki_topic] [--max-train 0] [--out runs/quality]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def distill_cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "distill_cli", *args]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps (a) and (c)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", default="bbc_news,wiki_topic")
    ap.add_argument("--max-train", type=int, default=0,
                    help="cap fine-tuning examples per task (0 = all)")
    ap.add_argument("--cluster", default="local/2proc")
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--set", dest="extra", action="append", default=[],
                    help="extra recipe overrides for the students, e.g. teacher.path=mpnet_base")
    args = ap.parse_args()

    from distill_common.logs import setup_logging
    setup_logging()
    log = logging.getLogger("bench.quality")

    out = (ROOT / args.out).resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = [t for t in args.tasks.split(",") if t]
    task_list = "[" + ",".join(tasks) + "]"
    seed_list = "[" + ",".join(map(str, seeds)) + "]"
    common = [f"finetune.tasks={task_list}", f"finetune.seeds={seed_list}", *args.extra]
    if args.steps:
        common.append(f"train.max_steps={args.steps}")
    shards = out / "shards"
    timings = {}

    # (a) distilled: prep (holding out both tasks' evaluation text) + pretrain + export.
    t0 = time.perf_counter()
    a_overrides = [f"output_dir={out}/a", f"prep.output_dir={shards}", *common]
    distill_cli("run", args.recipe, *a_overrides, "--stages", "prep,pretrain,export",
                "--cluster", args.cluster)
    timings["a_prep_pretrain_s"] = round(time.perf_counter() - t0, 1)

    from distill_cli.recipe import load_recipe
    from distill_common.assets import resolve_model_dir
    recipe_a = load_recipe(args.recipe, a_overrides)

    # (b) teacher-layer init, no distillation: the student as pretraining would start it.
    b_dir = out / "b" / "student"
    if not (b_dir / "config.json").is_file():
        from distill_pretrain.student import build_student
        from distill_pretrain.teacher import load_teacher
        teacher = load_teacher(recipe_a.teacher)
        student = build_student(recipe_a.student, teacher, seed=recipe_a.seed)
        student.save_pretrained(b_dir)
        teacher.tokenizer.save_pretrained(b_dir)

    # (c) random init, MLM only, same steps and data.
    t0 = time.perf_counter()
    c_overrides = [f"output_dir={out}/c", f"prep.output_dir={shards}", *common,
                   "student.init=random", "student.embedding_init=random",
                   "objective.qkv_relation_kl=null", "objective.hidden_cosine=null",
                   "objective.hidden_mse=null", "objective.attention_kl=null",
                   "objective.value_relation_kl=null", "objective.logit_kl=null",
                   "objective.attention_score_mse=null", "objective.embedding_mse=null",
                   "objective.mlm.weight=1.0"]
    distill_cli("run", args.recipe, *c_overrides, "--stages", "prep,pretrain,export",
                "--cluster", args.cluster)
    timings["c_pretrain_s"] = round(time.perf_counter() - t0, 1)

    # Fine-tune everything on every task with every seed.
    from finetune import build_report, run_task
    from finetune.config import FinetuneConfig, ReportConfig
    models = {"teacher": str(resolve_model_dir(recipe_a.teacher.path)),
              "a_distilled": recipe_a.train.export_dir, "b_teacher_layers": str(b_dir),
              "c_mlm_only": str(out / "c" / "student")}
    ft_cfg = FinetuneConfig(tasks=tasks, seeds=seeds, save_model="none",
                            max_train_examples=args.max_train or None)
    results: dict = {}
    t0 = time.perf_counter()
    for task in tasks:  # task-major: a task's comparison is complete before the next
        for name, folder in models.items():
            done = out / "finetune" / name / task / "results.json"
            if done.is_file():
                res = json.loads(done.read_text())
            else:
                res = run_task(folder, task, out / "finetune" / name / task, ft_cfg)
            results.setdefault(name, {})[task] = res
            log.info("%s on %s: %.4f +- %.4f", name, task, res["score"], res["score_std"] or 0)
    timings["finetune_s"] = round(time.perf_counter() - t0, 1)
    report = build_report(models, results, out / "report", "teacher",
                          ReportConfig(latency_repeats=10))

    summary = {"bench": "quality", "recipe": args.recipe, "teacher": recipe_a.teacher.path,
               "student": f"{recipe_a.student.num_layers} layers",
               "pretrain_steps": recipe_a.train.max_steps, "seeds": seeds, "tasks": {}}
    for task in tasks:
        row = {}
        for name in models:
            r = results[name][task]
            row[name] = {"mean": round(r["score"], 4),
                         "std": round(r["score_std"] or 0.0, 4),
                         "per_seed": [round(x, 4) for x in _per_seed(r)]}
        teacher_score = row["teacher"]["mean"]
        for name in models:
            row[name]["retention_pct"] = round(100 * row[name]["mean"] / teacher_score, 2)
        row["a_minus_b"] = round(row["a_distilled"]["mean"] - row["b_teacher_layers"]["mean"], 4)
        row["a_minus_c"] = round(row["a_distilled"]["mean"] - row["c_mlm_only"]["mean"], 4)
        summary["tasks"][task] = row
    summary["distilled_beats_both"] = all(
        r["a_minus_b"] > 0 and r["a_minus_c"] > 0 for r in summary["tasks"].values())
    from finetune.latency import latency_at
    summary["cpu_latency_ms_b1"] = {n: latency_at(row, "cpu", 1)
                                    for n, row in report["models"].items()}
    summary["parameters_M"] = {n: round(row["parameters"] / 1e6, 2)
                               for n, row in report["models"].items()}
    summary["timings"] = timings
    print(json.dumps(summary))
    return 0


def _per_seed(result: dict) -> list[float]:
    """The task metric of each seed's run, on the split the score is reported on."""
    split, metric = result["score_split"], result["metric"]
    return [float(rec[split][metric]) for rec in result["seeds"]]


if __name__ == "__main__":
    raise SystemExit(main())
