"""One seed of one fine-tuning: a loop you can read top to bottom.

Fresh head, AdamW with linear warmup and decay, validation at fixed points with early
stopping, the best weights kept in memory, the test split scored once with them. Loss,
learning rate and validation scores go to this seed's TensorBoard events and
metrics.jsonl (``<out>/seed-<seed>/``); each step moves the whole run's progress line.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distill_common.distributed import World
from distill_common.progress import Progress
from distill_common.seeding import seed_rank_streams
from distill_common.tracking import Metrics
from finetune.config import HParams
from finetune.data import TaskData
from finetune.encode import EncodedSplit, collate
from finetune.loading import load_model, pooler_note
from finetune.predict import evaluate, gold_of
from finetune.tasks import TaskConfig

log = logging.getLogger(__name__)


@dataclass
class TaskRun:
    """What every seed of one (model, task) fine-tuning shares."""
    model_dir: Path
    task: TaskConfig
    data: TaskData
    splits: dict[str, EncodedSplit]
    hp: HParams
    ctx: World
    bf16: bool
    pad_id: int
    out_dir: Path
    progress: Progress
    """The whole run's progress line (every model, task and seed)."""


def schedule(n_train: int, hp: HParams, world_size: int) -> tuple[int, int]:
    """(optimizer steps per epoch, epochs): epochs raised to reach ``hp.min_steps``."""
    steps_per_epoch = math.ceil(math.ceil(n_train / world_size) / hp.batch_size)
    return steps_per_epoch, max(hp.epochs, math.ceil(hp.min_steps / steps_per_epoch))


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


class _Best:
    """The best validation score so far, its weights (on the CPU) and predictions, and
    the evaluations since it (early stopping)."""

    def __init__(self):
        self.score, self.state, self.at, self.preds, self.bad_evals = -math.inf, None, None, None, 0

    def update(self, model, score: float, preds: list, at: dict) -> None:
        if self.state is None or score > self.score:
            self.score, self.at, self.preds, self.bad_evals = score, at, preds, 0
            self.state = {k: v.detach().to("cpu", copy=True)
                          for k, v in model.state_dict().items()}
        else:
            self.bad_evals += 1


def _load(run: TaskRun, seed: int):
    from transformers import set_seed

    set_seed(seed)  # the new head's init: the same on every rank
    model, pooler = load_model(run.model_dir, run.task, run.data.labels)
    note = pooler_note(run.model_dir, pooler)
    if note and seed == run.hp.seeds[0]:
        log.warning("%s", note)
    model = model.to(run.ctx.device)
    seed_rank_streams(seed, run.ctx.rank)  # dropout and data order: each rank its own
    model.train()
    wrapped = model
    if run.ctx.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(
            model, device_ids=[run.ctx.device.index] if run.ctx.device.type == "cuda" else None)
    return model, wrapped, pooler


def _seed_metrics(run: TaskRun, seed: int, total_steps: int) -> Metrics:
    folder = run.out_dir / f"seed-{seed}"
    if run.ctx.is_main and (folder / "tensorboard").is_dir():
        shutil.rmtree(folder / "tensorboard")  # a rerun replaces the curves, as the results
    metrics = Metrics(folder, enabled=run.ctx.is_main, max_steps=total_steps)
    metrics.record_config({"model": str(run.model_dir), "task": run.task.name, "seed": seed,
                           "finetune": {k: v for k, v in vars(run.hp).items() if k != "seeds"}},
                          metrics=[f"validation/{run.task.metric}", "train/loss"])
    return metrics


def train_one_seed(run: TaskRun, seed: int):
    """Returns (best model on this rank, per-seed record)."""
    from transformers import get_linear_schedule_with_warmup

    task, hp, ctx, data = run.task, run.hp, run.ctx, run.data
    model, wrapped, pooler = _load(run, seed)
    train_split = run.splits["train"]
    steps_per_epoch, epochs = schedule(len(train_split), hp, ctx.world_size)
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
    best, history, step, stopped_early = _Best(), [], 0, False
    metrics = _seed_metrics(run, seed, total_steps)
    started = time.perf_counter()
    try:
        for epoch in range(epochs):
            order = _epoch_order(len(train_split), seed, epoch, ctx)
            for in_epoch, start in enumerate(range(0, len(order), hp.batch_size), start=1):
                batch = {k: v.to(ctx.device)
                         for k, v in collate(train_split, order[start:start + hp.batch_size],
                                             run.pad_id).items()}
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=run.bf16):
                    loss = wrapped(**batch).loss
                loss.backward()
                if hp.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), hp.max_grad_norm)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                run.progress.update(1, examples=len(batch["input_ids"]) * ctx.world_size)
                metrics.log(step, {"train/loss": loss.item(), "train/lr": lr}, progress=False)
                if in_epoch not in eval_at:
                    continue
                val, val_preds = evaluate(model, run.splits["validation"], gold_val, task,
                                          data.labels, hp, ctx.device, run.bf16, ctx,
                                          run.pad_id)
                metrics.log(step, {f"validation/{k}": v for k, v in val.items()},
                            progress=False)
                history.append({"epoch": epoch + 1, "step": step, "loss": loss.item(),
                                "validation": val})
                log.info("%s seed %d epoch %d step %d/%d: loss %.4f, validation %s %.4f",
                         task.name, seed, epoch + 1, step, total_steps, loss.item(),
                         task.metric, val[task.metric])
                best.update(model, val[task.metric], val_preds,
                            {"epoch": epoch + 1, "step": step})
                # min_steps is a floor: early stopping counts only once it is reached (a
                # dip at step 90 of a 150-step floor stopped a slow learner at 78%).
                if hp.patience and best.bad_evals >= hp.patience and step >= hp.min_steps:
                    stopped_early = True
                    break
            if stopped_early:
                log.info("%s seed %d: early stop after %d evaluations without improvement",
                         task.name, seed, best.bad_evals)
                break
    finally:
        metrics.close()
    run.progress.total -= total_steps - step  # the planned steps early stopping saved
    train_seconds = time.perf_counter() - started
    model.load_state_dict(best.state)
    best_val = next(h["validation"] for h in history if h["step"] == best.at["step"])
    # The best model's predictions on the split the score is reported on, kept so that two
    # models can be compared example by example (finetune.compare).
    test, predictions = None, best.preds
    if data.test is not None:
        test, predictions = evaluate(model, run.splits["test"], gold_of(task, data.test), task,
                                     data.labels, hp, ctx.device, run.bf16, ctx, run.pad_id)
    record = {"seed": seed, "validation": best_val, "test": test, "best": best.at,
              "epochs": epochs, "steps": step, "total_steps": total_steps,
              "stopped_early": stopped_early, "pooler": pooler,
              "train_seconds": round(train_seconds, 2), "history": history,
              "predictions": predictions}
    return model, record
