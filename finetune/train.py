"""Fine-tune model folders on tasks: the run around the per-seed loop (finetune.loop).

run_task: check model + data (errors before any training) -> tokenize once -> every seed
(finetune.loop.train_one_seed) -> mean/std over seeds -> results.json and a saved Hugging
Face folder; with a learning-rate grid (``learning_rates``), that at each rate, and the
rate chosen on validation (choose_on_validation). run_tasks / run_models: every task of a
config, for one model or several, with one progress line whose ETA covers all of them
(the steps of every model, rate, task and seed are planned before the first one starts).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from distill_common.distributed import (init_world, launched_rank, launched_world_size,
                                        shutdown)
from distill_common.fsio import atomic_dir, atomic_write_json
from distill_common.progress import Progress
from finetune.config import DEFAULT_HPARAMS, FinetuneConfig, HParams, merge_hparams
from finetune.data import TaskData, cap_train_split, load_task_data
from finetune.encode import encode_split
from finetune.loading import load_tokenizer
from finetune.loop import TaskRun, schedule, train_one_seed
from finetune.predict import gold_of, use_bf16
from finetune.tasks import TaskConfig, load_task

log = logging.getLogger(__name__)

TASK_RECORD = "distill_task.json"


def resolve_hparams(task: TaskConfig, cfg: FinetuneConfig) -> HParams:
    run_layer = HParams(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(HParams)})
    return merge_hparams(DEFAULT_HPARAMS, task.train, run_layer)


def _save_model(model, tokenizer, folder: Path, record: dict) -> None:
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / TASK_RECORD, record)


def _summary(records: list[dict], split: str) -> tuple[dict, dict]:
    keys = records[0][split].keys()
    mean = {k: statistics.fmean(r[split][k] for r in records) for k in keys}
    std = {k: statistics.pstdev([r[split][k] for r in records]) for k in keys}
    return mean, std


def _model_folder(model_dir: "str | Path") -> Path:
    from distill_common.assets import resolve_model_dir

    return Path(model_dir) if Path(model_dir).is_dir() else \
        Path(resolve_model_dir(str(model_dir)))


def _task_data(task: TaskConfig, hp: HParams) -> TaskData:
    data = load_task_data(task)
    cap_train_split(data, hp.max_train_examples, task.split.seed)
    return data


def planned_steps(data: TaskData, hp: HParams, world_size: int) -> int:
    """Optimizer steps of every seed of one (model, task), before early stopping."""
    steps_per_epoch, epochs = schedule(len(data.train), hp, world_size)
    return steps_per_epoch * epochs * len(hp.seeds)


def run_task(model_dir: "str | Path", task: "str | Path | TaskConfig", out_dir: "str | Path",
             cfg: Optional[FinetuneConfig] = None, task_overrides: Sequence[str] = (), *,
             data: Optional[TaskData] = None, progress: Optional[Progress] = None) -> dict:
    """Fine-tune ``model_dir`` on ``task`` for every seed; write ``out_dir/results.json``
    (and the model folder ``out_dir/model`` by default); return the results dict:
    ``score``/``score_std`` (mean/std of the task metric over seeds on test, or
    validation when there is no test split), ``mean``/``std`` of every metric, ``seeds``
    (per-seed records, each with its ``predictions`` on that split), ``gold`` (the labels
    of that split, in the same order), ``saved_model`` (folder or None), ``pooler`` (how
    the task model's pooler started: trained, fresh or none). ``data`` and ``progress``:
    the task's data already read, and the progress line of a larger run."""
    cfg = cfg or FinetuneConfig()
    task = load_task(task, task_overrides)
    if cfg.learning_rates:
        return _run_rate_grid(model_dir, task, Path(out_dir), cfg, data, progress)
    model_dir = _model_folder(model_dir)
    hp = resolve_hparams(task, cfg)
    tokenizer = load_tokenizer(model_dir, task)  # errors before reading data or training
    data = data if data is not None else _task_data(task, hp)
    own_progress = progress is None
    if own_progress:
        progress = Progress(f"finetune {task.name}", unit="steps",
                            total=planned_steps(data, hp, launched_world_size()))
    threads_before = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    owns_group = not torch.distributed.is_initialized()
    ctx = init_world(cfg.device)
    try:
        bf16 = use_bf16(hp.precision, ctx.device)
        splits = {name: encode_split(tokenizer, task, getattr(data, name), data.labels,
                                     hp.max_length)
                  for name in ("train", "validation", "test") if getattr(data, name) is not None}
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        log.info("fine-tuning %s on %s: %s, %s, %d process(es), seeds %s", model_dir,
                 task.name, data.sizes(), "bf16" if bf16 else "fp32", ctx.world_size,
                 hp.seeds)
        run = TaskRun(model_dir, task, data, splits, hp, ctx, bf16, pad_id, Path(out_dir),
                      progress)
        records, saved = _train_seeds(run, tokenizer, cfg.save_model)
        results = _results(run, records, saved)
        if ctx.is_main:
            atomic_write_json(run.out_dir / "results.json", results)
            log.info("%s on %s: %s %s = %.4f +- %.4f over %d seed(s)", model_dir.name,
                     task.name, results["score_split"], task.metric, results["score"],
                     results["score_std"], len(records))
        ctx.barrier()
        return results
    finally:
        if own_progress:
            progress.close()
        if owns_group:
            shutdown()
        torch.set_num_threads(threads_before)


def _run_rate_grid(model_dir, task: TaskConfig, out_dir: Path, cfg: FinetuneConfig,
                   data: Optional[TaskData], progress: Optional[Progress]) -> dict:
    """run_task at every rate of ``cfg.learning_rates`` (into ``out_dir/lr-<rate>``), then
    the result of the rate chosen on validation, written to ``out_dir/results.json``."""
    hp = resolve_hparams(task, cfg)
    load_tokenizer(_model_folder(model_dir), task)  # errors before reading data or training
    data = data if data is not None else _task_data(task, hp)
    own_progress = progress is None
    if own_progress:  # one line whose ETA covers every rate
        progress = Progress(f"finetune {task.name}", unit="steps", total=len(
            cfg.learning_rates) * planned_steps(data, hp, launched_world_size()))
    runs = {}
    try:
        for rate in cfg.learning_rates:
            one = dataclasses.replace(cfg, learning_rate=rate, learning_rates=None)
            runs[rate] = run_task(model_dir, task, out_dir / f"lr-{rate:g}", one, data=data,
                                  progress=progress)
    finally:
        if own_progress:
            progress.close()
    chosen = choose_on_validation(runs)
    if launched_rank() == 0:
        atomic_write_json(out_dir / "results.json", chosen)
        log.info("%s on %s: learning rate %g chosen on validation (mean validation %s by "
                 "rate: %s)", Path(str(model_dir)).name, task.name, chosen["learning_rate"],
                 task.metric, chosen["lr_validation"])
    return chosen


def validation_mean(result: Mapping[str, Any]) -> float:
    """The mean over seeds of each seed's best validation score (the task metric)."""
    return statistics.fmean(float(rec["validation"][result["metric"]])
                            for rec in result["seeds"])


def choose_on_validation(runs: Mapping[Any, dict]) -> dict:
    """Of the fine-tuning runs of one model on one task at several learning rates ({key:
    results}), the one whose seeds' mean validation score is best, the lower rate on a
    tie; returned with ``learning_rate`` (the rate used) and ``lr_validation`` ({rate:
    mean validation score}), so that the choice can be checked. Test scores play no
    part."""
    scored = {key: validation_mean(res) for key, res in runs.items()}
    rate = {key: float(res["hparams"]["learning_rate"]) for key, res in runs.items()}
    best = max(runs, key=lambda key: (scored[key], -rate[key]))
    return {**runs[best], "learning_rate": rate[best],
            "lr_validation": {f"{rate[key]:g}": round(scored[key], 4) for key in runs}}


def _train_seeds(run: TaskRun, tokenizer, save_model: str) -> tuple[list[dict], Optional[Path]]:
    """Every seed in turn; keeps the model of the best validation score (or all)."""
    records, saved, best_val = [], None, -math.inf
    for seed in run.hp.seeds:
        model, record = train_one_seed(run, seed)
        records.append(record)
        val_score = record["validation"][run.task.metric]
        meta = {"task": run.task.name, "type": run.task.type, "metric": run.task.metric,
                "labels": run.data.labels, "seed": seed, "source_model": str(run.model_dir),
                "validation": record["validation"], "test": record["test"]}
        if run.ctx.is_main and save_model == "all":
            folder = run.out_dir / f"seed-{seed}" / "model"
            _save_model(model, tokenizer, folder, meta)
            if val_score > best_val:
                saved = folder
        elif run.ctx.is_main and save_model == "best" and val_score > best_val:
            saved = run.out_dir / "model"
            _save_model(model, tokenizer, saved, meta)
        best_val = max(best_val, val_score)
        del model
    return records, saved


def _results(run: TaskRun, records: list[dict], saved: Optional[Path]) -> dict:
    task, data = run.task, run.data
    score_split = "test" if data.test is not None else "validation"
    mean, std = _summary(records, score_split)
    return {
        "task": task.name, "type": task.type, "metric": task.metric,
        "model_dir": str(run.model_dir.resolve()), "score_split": score_split,
        "score": mean[task.metric], "score_std": std[task.metric],
        "mean": mean, "std": std, "labels": data.labels, "sizes": data.sizes(),
        "gold": gold_of(task, data.test if score_split == "test" else data.validation),
        "notes": data.notes, "unseen_labels": data.unseen, "pooler": records[0]["pooler"],
        "hparams": dataclasses.asdict(run.hp),
        "precision": "bf16" if run.bf16 else "fp32", "device": str(run.ctx.device),
        "world_size": run.ctx.world_size, "seeds": records,
        "saved_model": str(saved) if saved else None,
        "train_seconds": round(sum(r["train_seconds"] for r in records), 2),
    }


def run_models(models: Mapping[str, "str | Path"], out_dir: "str | Path",
               cfg: Optional[FinetuneConfig] = None) -> dict[str, dict[str, dict]]:
    """Every task of ``cfg.tasks`` for every model, into ``out_dir/<model>/<task>``;
    returns {model: {task: results}}. Each task's data is read once for all models, and
    one progress line covers the whole run."""
    cfg = cfg or FinetuneConfig()
    tasks = []
    for spec in cfg.tasks:
        task = load_task(spec)
        tasks.append((task, _task_data(task, resolve_hparams(task, cfg))))
    world = launched_world_size()
    rates = len(cfg.learning_rates or [None])
    total = len(models) * rates * sum(planned_steps(data, resolve_hparams(task, cfg), world)
                                      for task, data in tasks)
    progress = Progress("finetune (all models, tasks and seeds)", total=total, unit="steps")
    results: dict[str, dict[str, dict]] = {}
    try:
        for name, folder in models.items():
            results[name] = {task.name: run_task(folder, task, Path(out_dir) / name / task.name,
                                                 cfg, data=data, progress=progress)
                             for task, data in tasks}
    finally:
        progress.close()
    return results


def run_tasks(model_dir: "str | Path", out_dir: "str | Path",
              cfg: Optional[FinetuneConfig] = None) -> dict[str, dict]:
    """run_task for every task of ``cfg.tasks``, into ``out_dir/<task name>``; returns
    {task name: results}."""
    return run_models({"": model_dir}, out_dir, cfg)[""]
