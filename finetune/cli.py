"""`distill finetune MODEL_DIR TASK [k=v...]`, `distill report ...`, `distill compare A B`,
`distill tasks ...`.

Overrides are dotted keys, as in every command: `finetune.<key>=` is a fine-tuning
setting (`finetune.epochs=2 finetune.seeds=[0,1,2]`, see finetune/config.py),
`task.<key>=` edits the task recipe (`task.split.seed=1`), `report.<key>=` a report
setting. A bare key (`epochs=2`, the old form) is refused with the dotted form to write.
Multi-process: `torchrun --nproc_per_node N -m distill_cli finetune ...`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub, add_recipe_args) -> None:
    ft = sub.add_parser(
        "finetune", help="fine-tune a model folder (student or teacher) on a task",
        description="Fine-tune any Hugging Face encoder folder on a task recipe (a built-in "
                    "name such as bbc_news / wiki_topic, or a task YAML). Writes "
                    "OUT/results.json and the fine-tuned model OUT/model.")
    ft.add_argument("model_dir", help="model folder, or a model asset name (minilm_l6)")
    ft.add_argument("task", help="built-in task name or task YAML path")
    ft.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="finetune.<key>=value (finetune.epochs=2 finetune.seeds=[0,1]) or "
                         "task.<key>=value (task.split.seed=1)")
    ft.add_argument("--out", help="output folder (default runs/finetune/<model>/<task>)")
    ft.set_defaults(func=_finetune)

    rp = sub.add_parser(
        "report", help="compare models: size, latency, scores, retention, speed-up",
        description="Measure each model (parameters, size, CPU/GPU latency) and join "
                    "fine-tuning results into report.json, report.md and PNG plots.")
    rp.add_argument("--model", action="append", default=[], metavar="NAME=DIR", required=True,
                    help="a model to compare (repeat); DIR may be a model asset name")
    rp.add_argument("--teacher", help="NAME of the reference model (default: the first)")
    rp.add_argument("--task", action="append", default=[], metavar="TASK",
                    help="tasks to score (repeat); default: those found in --results")
    rp.add_argument("--results", action="append", default=[], metavar="PATH",
                    help="results.json files or folders searched for them (repeat); "
                         "matched to models by their model_dir")
    rp.add_argument("--finetune-missing", action="store_true",
                    help="fine-tune the (model, task) pairs that have no results first")
    rp.add_argument("--out", required=True, help="report folder")
    rp.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="report.<key>=value (report.latency_repeats=20 report.threads=2) "
                         "or finetune.<key>=value (with --finetune-missing)")
    rp.set_defaults(func=_report)

    cp = sub.add_parser(
        "compare", help="is model A better than model B on a task, or is the gap noise?",
        description="Paired bootstrap over the test examples and the seeds of two "
                    "fine-tuning results of the same task (results.json files written by "
                    "`distill finetune`): the gap A - B, its 95%% interval and the share of "
                    "draws with A ahead.")
    cp.add_argument("a", metavar="A", help="results.json of model A (or its folder)")
    cp.add_argument("b", metavar="B", help="results.json of model B (or its folder)")
    cp.add_argument("--draws", type=int, default=2000, help="bootstrap draws (default 2000)")
    cp.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    cp.set_defaults(func=_compare)

    tk = sub.add_parser("tasks", help="list task recipes; write held-out text hashes")
    tsub = tk.add_subparsers(dest="tasks_command", metavar="ACTION", required=True)
    ls = tsub.add_parser("list", help="the built-in task recipes")
    ls.set_defaults(func=_tasks_list)
    ho = tsub.add_parser("holdout", help="write the doc_hash of every validation/test text "
                                         "(the prep.holdout file)")
    ho.add_argument("tasks", nargs="+", help="task names or YAML paths")
    ho.add_argument("--out", required=True, help="file to write (one sha256 per line)")
    ho.set_defaults(func=_tasks_holdout)


SECTIONS = {"finetune": "a fine-tuning setting", "task": "the task recipe",
            "report": "a report setting"}


def sections(overrides: list[str], allowed: tuple[str, ...]) -> dict[str, list[str]]:
    """``["finetune.epochs=2", "task.split.seed=1"]`` -> {"finetune": ["epochs=2"], "task":
    ["split.seed=1"]}, for the sections ``allowed``; any other key is refused, naming the
    dotted forms."""
    from distill_common.config import ConfigError

    out: dict[str, list[str]] = {name: [] for name in allowed}
    for item in overrides:
        head, dot, rest = item.partition(".")
        if dot and head in out:
            out[head].append(rest)
            continue
        forms = ", ".join(f"{name}.{item} for {SECTIONS[name]}" for name in allowed)
        raise ConfigError(f"override {item!r}: keys are dotted, as in every `distill` "
                          f"command: write {forms}")
    return out


def _finetune(args: argparse.Namespace) -> int:
    from distill_common.config import load_config
    from finetune.config import FinetuneConfig
    from finetune.tasks import load_task
    from finetune.train import run_task

    over = sections(args.overrides, ("finetune", "task"))
    cfg = load_config(FinetuneConfig, None, over["finetune"], section="finetune")
    task = load_task(args.task, over["task"])
    out = Path(args.out) if args.out else \
        Path("runs/finetune") / Path(args.model_dir).name / task.name
    res = run_task(args.model_dir, task, out, cfg)
    print(json.dumps({"task": res["task"], "metric": res["metric"], "score": res["score"],
                      "std": res["score_std"], "seeds": len(res["seeds"]),
                      "saved_model": res["saved_model"], "results": str(out / "results.json")}))
    return 0


def _find_results(paths: list[str]) -> list[dict]:
    from finetune.tasks import TaskError

    found = []
    for spec in paths:
        p = Path(spec)
        files = [p] if p.is_file() else sorted(p.rglob("results.json")) if p.is_dir() else []
        if not files:
            raise TaskError(f"--results {spec}: no results.json there")
        for f in files:
            data = json.loads(f.read_text())
            if "task" in data and "score" in data and "model_dir" in data:
                found.append(data)
    return found


def _compare(args: argparse.Namespace) -> int:
    from finetune.compare import compare_results
    from finetune.tasks import TaskError

    loaded = []
    for spec in (args.a, args.b):
        p = Path(spec)
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            raise TaskError(f"{spec}: no results.json there; give the file `distill "
                            f"finetune` wrote (OUT/results.json) or its folder")
        try:
            loaded.append(json.loads(f.read_text()))
        except json.JSONDecodeError as err:
            raise TaskError(f"{f}: not valid JSON ({err})") from None
    try:
        res = compare_results(*loaded, draws=args.draws, seed=args.seed)
    except ValueError as err:
        raise TaskError(f"compare {args.a} {args.b}: {err}") from None
    print(json.dumps({"task": loaded[0]["task"], "a": loaded[0].get("model_dir"),
                      "b": loaded[1].get("model_dir"), **res}))
    return 0


def _report(args: argparse.Namespace) -> int:
    from distill_common.assets import resolve_model_dir
    from distill_common.config import load_config
    from finetune.config import FinetuneConfig, ReportConfig
    from finetune.report import build_report
    from finetune.tasks import TaskError, load_task

    over = sections(args.overrides, ("report", "finetune"))  # before any model is read
    cfg = load_config(ReportConfig, None, over["report"], section="report")
    ft_cfg = load_config(FinetuneConfig, None, over["finetune"], section="finetune")
    models = {}
    for spec in args.model:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise TaskError(f"--model {spec!r}: expected NAME=DIR")
        models[name] = Path(resolve_model_dir(folder))
    teacher = args.teacher or next(iter(models))
    by_path = {str(p.resolve()): n for n, p in models.items()}
    results: dict[str, dict] = {n: {} for n in models}
    for res in _find_results(args.results):
        name = by_path.get(str(Path(res["model_dir"]).resolve()))
        if name is not None and (not args.task or res["task"] in
                                 {load_task(t).name for t in args.task}):
            results[name][res["task"]] = res
    if args.finetune_missing:
        from finetune.train import run_task

        for task_spec in args.task or ft_cfg.tasks:
            task = load_task(task_spec)
            for name, folder in models.items():
                if task.name not in results[name]:
                    out = Path(args.out) / "finetune" / name / task.name
                    results[name][task.name] = run_task(folder, task, out, ft_cfg)
    report = build_report(models, results, args.out, teacher, cfg,
                          task_configs={t.name: t for t in map(load_task, args.task)})
    summary = {name: {"params": row["parameters"], "speedup": row["speedup"],
                      "scores": {t: e["score"] for t, e in row["tasks"].items()}}
               for name, row in report["models"].items()}
    print(json.dumps({"report": str(Path(args.out) / "report.md"), "models": summary}))
    return 0


def _tasks_list(args: argparse.Namespace) -> int:
    from finetune.tasks import builtin_tasks, load_task

    for name in builtin_tasks():
        t = load_task(name)
        src = t.source.corpus or t.source.path or t.source.train
        print(f"{name:<16} {t.type:<22} metric {t.metric:<10} source {src}")
    return 0


def _tasks_holdout(args: argparse.Namespace) -> int:
    from finetune.holdout import write_holdout_file

    n = write_holdout_file(args.tasks, args.out)
    print(f"{n} hashes -> {args.out}")
    return 0
