"""What a resume may and may not change, decided before anything is loaded.

A checkpoint records two fingerprints in its ``complete.json``: the shards' (every shard's
SHA-256, the tokenizer, seq_len) and the run's (the settings that shape the model, the
optimizer state layout and the data stream: teacher, student, objective, seed, masking,
micro-batch size, data slots, ZeRO stage, precision, optimizer kind). Resuming onto
re-prepared shards or a changed recipe is refused with both named; ``train.resume=never``
starts over, clearing the old checkpoints first. Everything else (learning rate and its
schedule, AdamW's betas / eps / weight decay, clipping, max_steps, cadences) may change
on resume: it takes effect, and the log says what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from distill_pretrain.checkpoint import CheckpointUserError, checkpoints_root, read_complete
from distill_pretrain.config import PretrainJob
from distill_pretrain.engine import lr_multiplier
from distill_pretrain.train_config import TrainConfig

log = logging.getLogger(__name__)

_RUN_TRAIN_KEYS = ("micro_batch_size", "mask_prob", "mask_replace_prob", "mask_random_prob",
                   "whole_word_mask", "mask_selection", "mask_smoothing", "shuffle_buffer",
                   "zero_stage", "offload_optimizer", "offload_params", "deepspeed_optimizer")
CHANGEABLE = ("lr", "min_lr_ratio", "warmup_steps", "lr_decay", "weight_decay", "betas",
              "eps", "grad_clip", "max_steps", "grad_accum_steps", "log_every", "eval_every",
              "save_every", "keep_last", "max_bad_steps", "eval_samples", "num_workers")


def run_settings(job: PretrainJob, precision: str, data_slots: int) -> dict:
    """The settings a resume must keep, as plain data."""
    recipe = job.recipe
    train = recipe.get("train", {})
    return {"teacher": recipe.get("teacher"), "student": recipe.get("student"),
            "objective": recipe.get("objective"), "seed": job.seed,
            **{f"train.{k}": train.get(k) for k in _RUN_TRAIN_KEYS},
            "train.precision": precision, "train.data_slots": data_slots}


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def check_compatible(folder: Path, data_fingerprint: str, settings: dict) -> None:
    """Refuse a checkpoint made from other shards or another run recipe."""
    saved = read_complete(folder)
    if saved.get("data_fingerprint") != data_fingerprint:
        raise CheckpointUserError(
            f"{folder} was trained on other shards (fingerprint "
            f"{str(saved.get('data_fingerprint'))[:12]}, the current shards' is "
            f"{data_fingerprint[:12]}: prep was redone or train.data_dir changed). Use "
            f"train.resume=never to start over (it clears the old checkpoints), or point "
            f"train.data_dir back at the shards it was trained on")
    old = saved.get("run_settings") or {}
    changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if changed:
        detail = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(settings.get(k))}"
                           for k in changed[:4])
        raise CheckpointUserError(
            f"{folder} was made by another recipe ({detail}). These settings shape the "
            f"model, the optimizer state or the data stream and cannot change on resume. "
            f"Use train.resume=never to start over (it clears the old checkpoints), or "
            f"restore them")


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def changed_settings(folder: Path, cfg: TrainConfig) -> dict[str, tuple]:
    """Changeable train settings that differ from the checkpoint's: key -> (old, new)."""
    old = read_complete(folder).get("train_settings") or {}
    new = train_settings(cfg)
    return {k: (old.get(k), new[k]) for k in CHANGEABLE if k in old and old[k] != new[k]}


def train_settings(cfg: TrainConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in ((k, getattr(cfg, k)) for k in CHANGEABLE)}


def apply_optimizer_settings(engine, scheduler, cfg: TrainConfig, step: int) -> None:
    """After a load, the optimizer's groups hold the *saved* lr, betas, eps and weight
    decay and the schedule the saved base lr: set the recipe's. (The schedule's shape,
    warmup and max_steps come from ``cfg`` through lr_multiplier already.)"""
    for group in engine.optimizer.param_groups:
        group["weight_decay"] = cfg.weight_decay if group.get("decays", True) else 0.0
        group["betas"] = tuple(cfg.betas)
        group["eps"] = cfg.eps
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * lr_multiplier(step, cfg)
    if scheduler is not None:
        scheduler.base_lrs = [cfg.lr] * len(scheduler.base_lrs)
    # Clipping is read from the engine's config (ZeRO-0) or kept by ZeRO's optimizer.
    engine.gradient_clipping = lambda: cfg.grad_clip
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = cfg.grad_clip


def clear_for_fresh_start(output_dir: str | Path, is_main: bool) -> None:
    """train.resume=never into a used folder: old checkpoints go (a later resume=auto
    would otherwise pick them up)."""
    root = checkpoints_root(output_dir)
    if is_main and root.is_dir() and any(root.iterdir()):
        log.warning("train.resume=never: removing the old checkpoints in %s", root)
        shutil.rmtree(root)
