"""Evaluation during pretraining: the student's MLM loss and accuracy, every objective
part and teacher-student agreement on the validation shards, summed over ranks."""

from __future__ import annotations

import torch

from distill_common.distributed import World
from distill_pretrain.engine import as_output

STAT_KEYS = ("mlm_correct", "mlm_count", "agreement_sum", "agreement_count")


@torch.no_grad()
def evaluate(engine, objective, teacher, batches: list[dict], world: World) -> dict[str, float]:
    """Every rank runs the same number of forwards (ZeRO-3 gathers parameters
    collectively): ranks with fewer batches repeat their first one with weight 0.
    Sums stay on the device until one all-reduce at the end."""
    n_max = int(world.all_reduce([len(batches)], "max")[0])
    if n_max == 0:
        return {}
    dummy = batches[0] if batches else _empty_batch(teacher)
    engine.eval()
    sums: dict[str, torch.Tensor] = {}
    for i in range(n_max):
        weight = 1.0 if i < len(batches) else 0.0
        for name, value in _batch_sums(engine, objective, teacher,
                                       batches[i] if weight else dummy, weight, world).items():
            sums[name] = sums[name] + value if name in sums else value
    engine.train()
    keys = sorted(sums)
    reduced = dict(zip(keys, world.all_reduce(torch.stack([sums[k].double() for k in keys]))
                       .tolist()))
    return _summary(reduced)


def _batch_sums(engine, objective, teacher, batch: dict, weight: float,
                world: World) -> dict[str, torch.Tensor]:
    index = objective.logit_index(batch["attention_mask"], batch["labels"])
    batch = {k: v.to(world.device, non_blocking=True) for k, v in batch.items()}
    index = index.to(world.device, non_blocking=True)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    t_out = objective.teacher_forward(teacher, ids, mask, labels, index)
    out = as_output(engine(ids, mask, labels, t_out, index))
    n = ids.shape[0] * weight
    values = {"samples": torch.tensor(float(n), device=world.device),
              "total": out.total.detach().float() * n}
    values.update({f"part/{k}": v.float() * n for k, v in out.parts.items()})
    values.update({k: out.stats[k].float() * weight for k in STAT_KEYS})
    if "mlm" not in out.parts:  # the student's own MLM loss, for every recipe
        loss = engine.module.student(input_ids=ids, attention_mask=mask, labels=labels).loss
        values["mlm_loss"] = loss.float() * n
    return values


def _summary(reduced: dict[str, float]) -> dict[str, float]:
    samples = max(reduced.pop("samples"), 1.0)
    result = {"eval/total": reduced.pop("total") / samples}
    for k in list(reduced):
        if k.startswith("part/"):
            result[f"eval/{k}"] = reduced.pop(k) / samples
    if "mlm_loss" in reduced:
        result["eval/mlm_loss"] = reduced.pop("mlm_loss") / samples
    elif "eval/part/mlm" in result:
        result["eval/mlm_loss"] = result["eval/part/mlm"]
    if reduced["mlm_count"] > 0:
        result["eval/mlm_accuracy"] = reduced["mlm_correct"] / reduced["mlm_count"]
    if reduced["agreement_count"] > 0:
        result["eval/agreement"] = reduced["agreement_sum"] / reduced["agreement_count"]
    return result


def _empty_batch(teacher) -> dict[str, torch.Tensor]:
    """A one-sequence batch for a rank that has no validation data (weight 0)."""
    tok = teacher.tokenizer
    ids = torch.tensor([[tok.cls_token_id, tok.mask_token_id, tok.sep_token_id]])
    labels = torch.tensor([[-100, tok.cls_token_id, -100]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
