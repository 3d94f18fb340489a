"""Predictions and scores of a fine-tuned model on a split, on every rank together, and
the precision it runs in."""

from __future__ import annotations

import torch

from distill_common.distributed import World, cpu_has_native_bf16
from finetune.config import HParams
from finetune.encode import EncodedSplit, collate
from finetune.metrics import task_metrics
from finetune.tasks import TaskConfig


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


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
