"""Fine-tune one model folder on one task: a loop you can read top to bottom.

run_task: check model + data (errors before any training) -> tokenize once -> for each
seed: fresh head, AdamW + linear warmup/decay, validation at fixed points with early
stopping, best weights kept in memory, test once -> mean/std over seeds -> results.json
and a saved Hugging Face folder.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from distill_common.distributed import World, init_world, shutdown
from distill_common.fsio import atomic_dir, atomic_write_json
from distill_common.progress import Progress
from distill_common.seeding import seed_rank_streams
from finetune.config import DEFAULT_HPARAMS, FinetuneConfig, HParams, merge_hparams
from finetune.data import TaskData, cap_train_split, load_task_data
from finetune.encode import EncodedSplit, collate, encode_split
from finetune.loading import load_model, load_tokenizer
from finetune.metrics import task_metrics
from finetune.tasks import TaskConfig, load_task

log = logging.getLogger(__name__)

TASK_RECORD = "distill_task.json"


# ------------------------------------------------------------------ precision

def cpu_has_native_bf16() -> bool:
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


# ------------------------------------------------------------------ prediction

@torch.inference_mode()
def predict(model, split: EncodedSplit, task: TaskConfig, labels, batch_size: int,
            device: torch.device, bf16: bool, ctx: World, pad_id: int) -> list:
    """Predictions in example order: label names, floats, or a tag list per example
    (words cut off by max_length get "O", or the first label when there is no "O")."""
    was_training = model.training
    model.eval()
    by_length = sorted(range(len(split)), key=lambda i: -len(split.features[i]["input_ids"]))
    mine = by_length[ctx.rank::ctx.world_size]  # length-sorted: little padding per batch
    local = []
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate(split, idx, pad_id, False).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(**batch).logits.float()
        if task.type == "regression":
            local += zip(idx, logits[:, 0].tolist())
        elif task.type == "token_classification":
            best = logits.argmax(-1).tolist()  # (batch, width)
            fill = "O" if "O" in labels else labels[0]
            for row, i in zip(best, idx):
                tags = [labels[row[pos]] for pos in split.word_starts[i]]
                local.append((i, tags + [fill] * (split.n_words[i] - len(tags))))
        else:
            local += zip(idx, [labels[j] for j in logits.argmax(-1).tolist()])
    model.train(was_training)
    merged = dict(pair for part in ctx.gather_objects(local) for pair in part)
    return [merged[i] for i in range(len(split))]


def evaluate(model, split: EncodedSplit, gold: list, task: TaskConfig, labels, hp: HParams,
             device, bf16, ctx, pad_id) -> tuple[dict[str, float], list]:
    """(the task metrics, the predictions they were computed from)"""
    preds = predict(model, split, task, labels, hp.eval_batch_size, device, bf16, ctx, pad_id)
    return task_metrics(task.type, gold, preds), preds


def gold_of(task: TaskConfig, examples) -> list:
    return [ex.label for ex in examples]


# ------------------------------------------------------------------ training

def _eval_points(steps_per_epoch: int, evals_per_epoch: int) -> set[int]:
    """Steps within an epoch (1-based) after which validation runs; the last is the
    epoch's end."""
    n = min(evals_per_epoch, steps_per_epoch)
    return {round(k * steps_per_epoch / n) for k in range(1, n + 1)}


def _epoch_order(n: int, seed: int, epoch: int, ctx: World) -> list[int]:
    """Shuffled training indices for this rank; every rank gets the same count (the
    permutation is wrapped around to a multiple of the world size)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen).tolist()
    per_rank = math.ceil(n / ctx.world_size)
    order += order[:per_rank * ctx.world_size - n]
    return order[ctx.rank::ctx.world_size]


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name
         else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def train_one_seed(model_dir: Path, task: TaskConfig, data: TaskData, splits: dict,
                   hp: HParams, seed: int, ctx: World, bf16: bool, pad_id: int):
    """Returns (best model on this rank, per-seed record)."""
    from transformers import get_linear_schedule_with_warmup, set_seed

    set_seed(seed)  # the new head's init: the same on every rank
    model = load_model(model_dir, task, data.labels).to(ctx.device)
    seed_rank_streams(seed, ctx.rank)  # dropout and data order: each rank its own stream
    model.train()
    wrapped = model
    if ctx.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    train_split: EncodedSplit = splits["train"]
    n_train = len(train_split)
    steps_per_epoch = math.ceil(math.ceil(n_train / ctx.world_size) / hp.batch_size)
    epochs = max(hp.epochs, math.ceil(hp.min_steps / steps_per_epoch))
    if epochs > hp.epochs:
        log.info("%s seed %d: %d epochs instead of %d, to reach min_steps %d at %d steps "
                 "per epoch", task.name, seed, epochs, hp.epochs, hp.min_steps,
                 steps_per_epoch)
    total_steps = steps_per_epoch * epochs
    optimizer = torch.optim.AdamW(_param_groups(model, hp.weight_decay), lr=hp.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(hp.warmup_ratio * total_steps),
                                                total_steps)
    eval_at = _eval_points(steps_per_epoch, hp.evals_per_epoch)
    gold_val = gold_of(task, data.validation)
    best_score, best_state, best_at, bad_evals = -math.inf, None, None, 0
    best_val_preds = None
    history, step, stopped_early = [], 0, False
    progress = Progress(f"finetune {task.name} seed {seed}", total=total_steps, unit="steps")
    started = time.perf_counter()
    for epoch in range(epochs):
        order = _epoch_order(n_train, seed, epoch, ctx)
        for in_epoch, start in enumerate(range(0, len(order), hp.batch_size), start=1):
            batch = {k: v.to(ctx.device)
                     for k, v in collate(train_split, order[start:start + hp.batch_size],
                                         pad_id).items()}
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = wrapped(**batch).loss
            loss.backward()
            if hp.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), hp.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1, examples=len(batch["input_ids"]) * ctx.world_size)
            if in_epoch not in eval_at:
                continue
            metrics, val_preds = evaluate(model, splits["validation"], gold_val, task,
                                          data.labels, hp, ctx.device, bf16, ctx, pad_id)
            score = metrics[task.metric]
            history.append({"epoch": epoch + 1, "step": step, "loss": loss.item(),
                            "validation": metrics})
            log.info("%s seed %d epoch %d step %d/%d: loss %.4f, validation %s %.4f",
                     task.name, seed, epoch + 1, step, total_steps, loss.item(), task.metric,
                     score)
            if best_state is None or score > best_score:
                best_score, best_at, bad_evals = score, {"epoch": epoch + 1, "step": step}, 0
                best_val_preds = val_preds
                best_state = {k: v.detach().to("cpu", copy=True)
                              for k, v in model.state_dict().items()}
            else:
                bad_evals += 1
            if hp.patience and bad_evals >= hp.patience:
                stopped_early = True
                break
        if stopped_early:
            log.info("%s seed %d: early stop after %d evaluations without improvement",
                     task.name, seed, bad_evals)
            break
    progress.close()
    train_seconds = time.perf_counter() - started
    model.load_state_dict(best_state)
    best_val = next(h["validation"] for h in history if h["step"] == best_at["step"])
    # The best model's predictions on the split the score is reported on, kept so that two
    # models can be compared example by example (finetune.compare).
    test, predictions = None, best_val_preds
    if data.test is not None:
        test, predictions = evaluate(model, splits["test"], gold_of(task, data.test), task,
                                     data.labels, hp, ctx.device, bf16, ctx, pad_id)
    record = {"seed": seed, "validation": best_val, "test": test, "best": best_at,
              "epochs": epochs, "steps": step, "total_steps": total_steps,
              "stopped_early": stopped_early,
              "train_seconds": round(train_seconds, 2), "history": history,
              "predictions": predictions}
    return model, record


# ------------------------------------------------------------------ the task run

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


def run_task(model_dir: "str | Path", task: "str | Path | TaskConfig", out_dir: "str | Path",
             cfg: Optional[FinetuneConfig] = None, task_overrides: Sequence[str] = ()) -> dict:
    """Fine-tune ``model_dir`` on ``task`` for every seed; write ``out_dir/results.json``
    (and the model folder ``out_dir/model`` by default); return the results dict:
    ``score``/``score_std`` (mean/std of the task metric over seeds on test, or
    validation when there is no test split), ``mean``/``std`` of every metric, ``seeds``
    (per-seed records, each with its ``predictions`` on that split), ``gold`` (the labels
    of that split, in the same order), ``saved_model`` (folder or None)."""
    from distill_common.assets import resolve_model_dir

    cfg = cfg or FinetuneConfig()
    task = load_task(task, task_overrides)
    model_dir = Path(resolve_model_dir(str(model_dir))) if not Path(model_dir).is_dir() \
        else Path(model_dir)
    out_dir = Path(out_dir)
    hp = resolve_hparams(task, cfg)
    tokenizer = load_tokenizer(model_dir, task)  # errors before reading data or training
    data = load_task_data(task)
    cap_train_split(data, hp.max_train_examples, task.split.seed)
    threads_before = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    owns_group = not torch.distributed.is_initialized()
    ctx = init_world(cfg.device)
    try:
        bf16 = use_bf16(hp.precision, ctx.device)
        splits = {}
        for name in ("train", "validation", "test"):
            examples = getattr(data, name)
            if examples is not None:
                splits[name] = encode_split(tokenizer, task, examples, data.labels,
                                            hp.max_length)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        log.info("fine-tuning %s on %s: %s, %s, %d process(es), seeds %s", model_dir,
                 task.name, data.sizes(), "bf16" if bf16 else "fp32", ctx.world_size,
                 hp.seeds)
        score_split = "test" if data.test is not None else "validation"
        records, saved, best_val = [], None, -math.inf
        for seed in hp.seeds:
            model, record = train_one_seed(model_dir, task, data, splits, hp, seed, ctx, bf16,
                                           pad_id)
            records.append(record)
            val_score = record["validation"][task.metric]
            meta = {"task": task.name, "type": task.type, "metric": task.metric,
                    "labels": data.labels, "seed": seed, "source_model": str(model_dir),
                    "validation": record["validation"], "test": record["test"]}
            if ctx.is_main and cfg.save_model == "all":
                folder = out_dir / f"seed-{seed}" / "model"
                _save_model(model, tokenizer, folder, meta)
                if val_score > best_val:
                    saved = folder
            elif ctx.is_main and cfg.save_model == "best" and val_score > best_val:
                saved = out_dir / "model"
                _save_model(model, tokenizer, saved, meta)
            best_val = max(best_val, val_score)
            del model
        mean, std = _summary(records, score_split)
        results = {
            "task": task.name, "type": task.type, "metric": task.metric,
            "model_dir": str(model_dir.resolve()), "score_split": score_split,
            "score": mean[task.metric], "score_std": std[task.metric],
            "mean": mean, "std": std, "labels": data.labels, "sizes": data.sizes(),
            "gold": gold_of(task, data.test if score_split == "test" else data.validation),
            "notes": data.notes, "unseen_labels": data.unseen,
            "hparams": dataclasses.asdict(hp),
            "precision": "bf16" if bf16 else "fp32", "device": str(ctx.device),
            "world_size": ctx.world_size, "seeds": records,
            "saved_model": str(saved) if saved else None,
            "train_seconds": round(sum(r["train_seconds"] for r in records), 2),
        }
        if ctx.is_main:
            atomic_write_json(out_dir / "results.json", results)
            log.info("%s on %s: %s %s = %.4f +- %.4f over %d seed(s)", model_dir.name,
                     task.name, score_split, task.metric, results["score"],
                     results["score_std"], len(records))
        ctx.barrier()
        return results
    finally:
        if owns_group:
            shutdown()
        torch.set_num_threads(threads_before)



def run_tasks(model_dir: "str | Path", out_dir: "str | Path",
              cfg: Optional[FinetuneConfig] = None) -> dict[str, dict]:
    """run_task for every task of ``cfg.tasks``, into ``out_dir/<task name>``; returns
    {task name: results}."""
    cfg = cfg or FinetuneConfig()
    results = {}
    for spec in cfg.tasks:
        task = load_task(spec)
        results[task.name] = run_task(model_dir, task, Path(out_dir) / task.name, cfg)
    return results
