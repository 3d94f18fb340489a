"""Does distillation pay? The same student shape, three ways, fine-tuned on both real tasks.

  (a) distilled from the teacher with the recipe (default: configs/demo.yaml);
  (b) the same student as pretraining starts it (`distill init`: teacher layers, or
      pruned out of the teacher for a pruned recipe), not distilled;
  (c) the same student randomly initialised and trained with MLM only, same steps/data.

Each is fine-tuned on every task (default: bbc_news, wiki_topic, movie_sentiment,
oanc_pos) with several seeds (plus the teacher), and the report gives mean +- std, retention of the teacher's score and the (a)-(b), (a)-(c)
margins, each with a 95% interval from a paired bootstrap over the test examples and the
seeds (finetune.compare): a margin whose interval holds zero is not shown by this test
set. A frozen-feature probe (bench/probe.py: logistic regression on the frozen last hidden
states, mean-pooled for a sentence task, per word for a token task, the same training
examples, its C picked on validation) measures what each encoder carries before
fine-tuning moves it. All share one set of shards with the evaluation documents of every
task of --holdout-tasks held out (default: those of --tasks), so that a run on a subset
of the tasks shares its shards, students and kept fine-tunings with the full run. Prints
one JSON line, with each model's validation scores beside the test scores (choose
between variants on validation). Not run in CI (tens of minutes on a 2-core CPU).

    python bench/quality.py [--recipe demo] [--steps 400] [--seeds 0,1,2] [--teacher-seeds 0]
        [--tasks bbc_news,wiki_topic,movie_sentiment,oanc_pos] [--holdout-tasks ...]
        [--max-train 0 | --max-train bbc_news=600,movie_sentiment=1000,...]
        [--min-steps 150] [--out runs/quality] [--task-set bbc_news:split.test=0.4]
        [--draws 2000] [--no-probe] [--no-scratch] [--extra-model NAME=DIR]
        [--variant NAME --set-a K=V]

--no-scratch leaves (c) out (its pretraining run and fine-tunings): enough to check that
the recipe's student beats its own undistilled cut, at about half the cost. --teacher-seeds
fine-tunes the teacher with fewer seeds (it gives retention only; the margins pair the
students' seeds).

Fine-tuning results are kept under OUT/finetune and reused while the model's weights, the
fine-tuning hyperparameters and the task recipe are unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
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


def variant_shards(shards: Path, suffix: str, extra_a: list[str]) -> Path:
    """Where (a) reads its shards: the shared ones, unless its overrides change prep (a
    variant distilled on another corpus), which then get their own folder beside them,
    so that the shared shards (and (b), calibrated on them for a pruned recipe) stay as
    they are."""
    if any(item.split("=", 1)[0].strip().startswith("prep.") for item in extra_a):
        if not suffix:
            raise SystemExit("--set-a prep.*: name the variant (--variant NAME); its shards "
                             "go to OUT/shards-NAME, the shared OUT/shards stay as they are")
        return shards.with_name(shards.name + suffix)
    return shards


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps (a) and (c)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--teacher-seeds", default="",
                    help="the teacher's fine-tuning seeds (default: --seeds); the margins "
                         "between students pair their seeds, the teacher gives retention")
    ap.add_argument("--tasks", default="bbc_news,wiki_topic,movie_sentiment,oanc_pos")
    ap.add_argument("--holdout-tasks", default="",
                    help="tasks whose validation and test texts the shards hold out "
                         "(default: --tasks); give the full list when --tasks is a subset, "
                         "so that the subset run shares the full run's shards")
    ap.add_argument("--max-train", type=int, default=0,
                    help="cap fine-tuning examples of every task (0 = all; per task: "
                         "--task-set TASK:train.max_train_examples=N)")
    ap.add_argument("--min-steps", type=int, default=150,
                    help="fine-tune for at least this many steps (more epochs on a capped "
                         "training split; 0 = each task's own epochs)")
    ap.add_argument("--cluster", default="local/2proc")
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--set", dest="extra", action="append", default=[],
                    help="extra recipe overrides for the students, e.g. teacher.path=mpnet_base")
    ap.add_argument("--set-a", dest="extra_a", action="append", default=[],
                    help="recipe overrides for (a) only, e.g. train.lr=1e-4 (with --variant)")
    ap.add_argument("--task-set", dest="task_set", action="append", default=[],
                    help="override a task's recipe for this benchmark, TASK:KEY=VALUE, e.g. "
                         "bbc_news:split.test=0.4 (a bigger test split: held out of the "
                         "shards too); written to OUT/tasks/TASK.yaml")
    ap.add_argument("--draws", type=int, default=2000,
                    help="bootstrap draws for the paired (a)-(b) and (a)-(c) intervals")
    ap.add_argument("--extra-model", dest="extra_models", action="append", default=[],
                    help="NAME=DIR: another encoder folder fine-tuned (and probed) beside "
                         "the teacher and (a)-(c), e.g. a control")
    ap.add_argument("--no-probe", dest="probe", action="store_false",
                    help="skip the frozen-feature probe")
    ap.add_argument("--no-scratch", dest="scratch", action="store_false",
                    help="leave out (c), the random-init MLM-only student")
    ap.add_argument("--variant", default="",
                    help="name of an (a) variant: it is trained into OUT/a-NAME and "
                         "fine-tuned into OUT/finetune/a_distilled-NAME, while the teacher, "
                         "(b) and (c) and their results are shared with the plain run")
    args = ap.parse_args()

    from distill_common.logs import setup_logging
    setup_logging()
    log = logging.getLogger("bench.quality")

    out = (ROOT / args.out).resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    teacher_seeds = [int(s) for s in (args.teacher_seeds or args.seeds).split(",")]
    tasks = [t for t in args.tasks.split(",") if t]
    held = [t for t in args.holdout_tasks.split(",") if t] or tasks
    shards = out / "shards"
    suffix = f"-{args.variant}" if args.variant else ""
    a_shards = variant_shards(shards, suffix, args.extra_a)  # refused before any file
    files, common = task_inputs(tasks, held, args.task_set, seeds, out)
    common += args.extra
    if args.steps:
        common.append(f"train.max_steps={args.steps}")
    timings = {}

    # (a) distilled: prep (holding out the tasks' evaluation text) + pretrain + export.
    t0 = time.perf_counter()
    a_overrides = [f"output_dir={out}/a{suffix}", f"prep.output_dir={a_shards}", *common,
                   *args.extra_a]
    distill_cli("run", args.recipe, *a_overrides, "--stages", "prep,pretrain,export",
                "--cluster", args.cluster)
    timings["a_prep_pretrain_s"] = round(time.perf_counter() - t0, 1)

    from launcher.recipe import load_recipe
    from distill_common.assets import resolve_model_dir
    recipe_a = load_recipe(args.recipe, a_overrides)

    # (b) no distillation: the student as pretraining would start it (`distill init`:
    # teacher layers, or pruned on the shared shards for a pruned recipe, with the
    # teacher's pooler as the export carries it), from the shared recipe (--set-a does not
    # reach it).
    b_dir = out / "b" / "student"
    if not (b_dir / "config.json").is_file():
        distill_cli("init", args.recipe, str(b_dir), f"output_dir={out}/b",
                    f"prep.output_dir={shards}", *common)

    # (c) random init, MLM only, same steps and data.
    if args.scratch:
        t0 = time.perf_counter()
        c_overrides = [f"output_dir={out}/c", f"prep.output_dir={shards}", *common,
                       "student.init=random", "student.embedding_init=random",
                       *[f"objective.{name}=null" for name in representation_objectives()],
                       "objective.mlm.weight=1.0"]
        distill_cli("run", args.recipe, *c_overrides, "--stages", "prep,pretrain,export",
                    "--cluster", args.cluster)
        timings["c_pretrain_s"] = round(time.perf_counter() - t0, 1)

    # Fine-tune everything on every task with every seed.
    from finetune import build_report
    from finetune.config import FinetuneConfig, ReportConfig
    models = {"teacher": str(resolve_model_dir(recipe_a.teacher.path)),
              "a_distilled": recipe_a.train.export_dir, "b_teacher_layers": str(b_dir),
              **({"c_mlm_only": str(out / "c" / "student")} if args.scratch else {}),
              **dict(item.split("=", 1) for item in args.extra_models)}
    ft_cfg = FinetuneConfig(tasks=[files[t] for t in tasks], seeds=seeds,
                            save_model="none",
                            max_train_examples=args.max_train or None,
                            min_steps=args.min_steps or None)
    results: dict = {}
    t0 = time.perf_counter()
    for task in tasks:  # task-major: a task's comparison is complete before the next
        for name, folder in models.items():
            where = out / "finetune" / (name + suffix if name == "a_distilled" else name)
            cfg = (dataclasses.replace(ft_cfg, seeds=teacher_seeds) if name == "teacher"
                   else ft_cfg)
            res = finetuned(folder, files[task], where / task, cfg, log)
            results.setdefault(name, {})[task] = res
            log.info("%s on %s: %.4f +- %.4f", name, task, res["score"], res["score_std"] or 0)
    timings["finetune_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    probes = {}
    if args.probe:
        from probe import probe, probe_data
        for task in tasks:
            task_data = probe_data(files[task], ft_cfg)  # read once, probed by every model
            probes[task] = {name: probe(folder, task_data) for name, folder in models.items()}
    timings["probe_s"] = round(time.perf_counter() - t0, 1)
    report = build_report(models, results, out / "report", "teacher",
                          ReportConfig(latency_repeats=10))

    summary = {"bench": "quality", "recipe": args.recipe, "variant": args.variant,
               "a_overrides": args.extra_a, "teacher": recipe_a.teacher.path,
               "student": f"{recipe_a.student.num_layers} layers",
               "pretrain_steps": recipe_a.train.max_steps, "seeds": seeds,
               "teacher_seeds": teacher_seeds,
               "finetune": {"max_train": args.max_train, "min_steps": args.min_steps},
               "tasks": {task: _task_row(task, results, probes.get(task), args.draws)
                         for task in tasks}}
    beaten = ["b", "c"] if args.scratch else ["b"]
    key = "distilled_beats_" + ("both" if args.scratch else "b")
    summary[key] = all(r[f"a_minus_{x}"] > 0 for r in summary["tasks"].values()
                       for x in beaten)
    summary[key + "_ci95"] = {  # the whole 95% interval above zero
        task: all(r[f"a_vs_{x}"]["ci95"][0] > 0 for x in beaten)
        for task, r in summary["tasks"].items()}
    summary["task_set"] = args.task_set
    from finetune.latency import latency_at
    summary["cpu_latency_ms_b1"] = {n: latency_at(row, "cpu", 1)
                                    for n, row in report["models"].items()}
    summary["parameters_M"] = {n: round(row["parameters"] / 1e6, 2)
                               for n, row in report["models"].items()}
    summary["timings"] = timings
    print(json.dumps(summary))
    return 0


def representation_objectives() -> list[str]:
    """Every objective but the student's own MLM: what (c), MLM only, switches off."""
    from dataclasses import fields

    from distill_pretrain.config import ObjectiveConfig
    return [f.name for f in fields(ObjectiveConfig) if f.name != "mlm"]


def _task_row(task: str, results: dict, probes: dict | None, draws: int) -> dict:
    """One task's line of the summary: every model's test mean, std, per-seed scores,
    validation mean (what to choose variants on) and retention; the (a)-(b) and (a)-(c)
    margins with their paired-bootstrap intervals; the probe."""
    from finetune.compare import compare_results

    row = {name: model_scores(per_task[task]) for name, per_task in results.items()}
    teacher_score = row["teacher"]["mean"]
    for name in results:
        row[name]["retention_pct"] = round(100 * row[name]["mean"] / teacher_score, 2)
    others = [(other, letter) for other, letter in (("b_teacher_layers", "b"),
                                                     ("c_mlm_only", "c")) if other in row]
    for other, letter in others:  # (c) only when it ran (--no-scratch leaves it out)
        row[f"a_minus_{letter}"] = round(row["a_distilled"]["mean"] - row[other]["mean"], 4)
        # Paired bootstrap over test examples and seeds: is the margin more than noise?
        row[f"a_vs_{letter}"] = compare_results(results["a_distilled"][task],
                                                results[other][task], draws=draws)
    row["test_examples"] = results["teacher"][task]["sizes"].get("test")
    if probes:
        row["probe"] = probes
        row["probe_a_minus_b"] = round(probes["a_distilled"]["test"]
                                       - probes["b_teacher_layers"]["test"], 4)
    return row


def model_scores(result: dict) -> dict:
    """A fine-tuning result in a summary: test mean, std and per-seed scores, and the mean
    of each seed's best validation score."""
    from finetune.train import validation_mean

    return {"mean": round(result["score"], 4), "std": round(result["score_std"] or 0.0, 4),
            "per_seed": [round(x, 4) for x in per_seed(result)],
            "validation_mean": round(validation_mean(result), 4)}


def finetune_overrides(task_paths: list[str], seeds: list[int]) -> list[str]:
    """The recipe overrides that name the fine-tuning tasks and seeds."""
    return ["finetune.tasks=[" + ",".join(task_paths) + "]",
            "finetune.seeds=[" + ",".join(map(str, seeds)) + "]"]


def task_inputs(tasks: list[str], held: list[str], task_set: list[str], seeds: list[int],
                out: Path) -> tuple[dict[str, str], list[str]]:
    """Each task's recipe file (of `tasks` and `held`) and the overrides that fine-tune on
    `tasks` with `seeds` and hold the evaluation text of `held` out of the shards
    (OUT/holdout.txt, written here): a run on a subset of the tasks that holds out all of
    them prepares the full run's shards."""
    files = task_files(sorted(set(tasks) | set(held)), task_set, out / "tasks")
    return files, [*finetune_overrides([files[t] for t in tasks], seeds),
                   holdout_override([files[t] for t in held], out)]


def holdout_override(task_paths: list[str], out: Path) -> str:
    """prep.holdout=OUT/holdout.txt: the validation and test texts of these tasks, kept
    out of the shards (written atomically; the same tasks give the same file, so the
    prep stage's fingerprint, which hashes it, holds across runs)."""
    from finetune.holdout import write_holdout_file

    path = out / "holdout.txt"
    write_holdout_file(task_paths, path)
    return f"prep.holdout={path}"


def task_files(tasks: list[str], task_set: list[str], folder: Path) -> dict[str, str]:
    """Each task's recipe: its name (a built-in) or path, or, when --task-set changes it,
    OUT/tasks/TASK.yaml with the changes applied (written atomically)."""
    from distill_common.config import to_yaml
    from distill_common.fsio import atomic_write_text
    from finetune.tasks import load_task, resolve_task_path

    changes: dict[str, list[str]] = {}
    for item in task_set:
        task, sep, kv = item.partition(":")
        if not sep or "=" not in kv or task not in tasks:
            raise SystemExit(f"--task-set {item!r}: give TASK:KEY=VALUE with TASK one of "
                             f"--tasks ({', '.join(tasks)}), e.g. bbc_news:split.test=0.4")
        changes.setdefault(task, []).append(kv)
    files = {}
    for task in tasks:
        if task not in changes:
            files[task] = task
            continue
        cfg = load_task(task, changes[task])  # validated like any task recipe
        if cfg.base_dir is None:
            cfg.base_dir = str(resolve_task_path(task).resolve().parent)
        path = folder / f"{cfg.name}.yaml"
        atomic_write_text(path, f"# {task} with {', '.join(changes[task])} "
                                f"(bench/quality.py --task-set)\n" + to_yaml(cfg))
        files[task] = str(path)
    return files


def fingerprint(model_dir: str, hparams: dict, task: dict) -> dict:
    """What a kept fine-tuning result depends on: the weights (a SHA-256 of each weights
    file, so a copied or rebuilt-identical folder still matches), the hyperparameters
    and the task recipe (its split decides the test examples)."""
    import hashlib

    weights = []
    for p in sorted(Path(model_dir).iterdir()):
        if p.suffix in (".safetensors", ".bin"):
            digest = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            weights.append([p.name, digest.hexdigest()])
    task = {k: v for k, v in task.items() if k != "base_dir"}
    return {"protocol": PROTOCOL, "hparams": hparams, "task": task, "weights": weights}


PROTOCOL = 2
"""Raised when the fine-tuning code changes what a result means, so that kept results of
the older code are redone (2: early stopping waits for min_steps)."""


def finetuned(model_dir: str, task: str, out: Path, cfg, log) -> dict:
    """run_task, or its kept result when the weights, hyperparameters and task recipe are
    the same (``fingerprint``)."""
    import dataclasses

    from distill_common.fsio import atomic_write_text
    from finetune import run_task
    from finetune.tasks import load_task
    from finetune.train import resolve_hparams

    task_cfg = load_task(task)
    hparams = dataclasses.asdict(resolve_hparams(task_cfg, cfg))
    want = fingerprint(model_dir, hparams, dataclasses.asdict(task_cfg))
    done, stamp = out / "results.json", out / "fingerprint.json"
    if done.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        log.info("%s on %s: kept from %s", model_dir, task, done)
        return json.loads(done.read_text())
    res = run_task(model_dir, task, out, cfg)
    atomic_write_text(stamp, json.dumps(want, indent=1))
    return res


def per_seed(result: dict) -> list[float]:
    """The task metric of each seed's run, on the split the score is reported on."""
    split, metric = result["score_split"], result["metric"]
    return [float(rec[split][metric]) for rec in result["seeds"]]


if __name__ == "__main__":
    raise SystemExit(main())
