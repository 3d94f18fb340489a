"""`distill pretrain`: the distillation loop, top to bottom.

    setup      distributed world, recipe checks, teacher, shards, student + objective,
               DeepSpeed engine, resume (model, optimizer, schedule, data position, RNG)
    loop       batch -> teacher forward (no grad) -> student + objective forward ->
               all ranks agree the loss is finite -> backward -> optimizer step
    every N    metrics (TensorBoard + metrics.jsonl + progress line), evaluation on the
               validation shards, checkpoint
    end        final evaluation and checkpoint, export of the student to train.export_dir

Faults: SIGTERM (Slurm preemption, `scancel`, torchrun shutting down) on any rank makes
every rank save a checkpoint at the next micro-batch and stop; the same command resumes.
A non-finite loss on any rank is seen by every rank (one all-reduced flag); the
micro-batch is skipped by all of them (no backward, no step) and counted. After
``train.max_bad_steps`` in a row every rank saves a checkpoint and stops with the same
error. A data error on one rank stops every rank the same way.

Test hook (test-only): ``DISTILL_TEST_NAN_LOSS="RANK:N[,N...]"`` makes rank RANK see a
NaN loss on the N-th micro-batch this process draws (1-based; ``N-`` = from the N-th on).
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from distill_pretrain import checkpoint as ckpt
from distill_pretrain import data as D
from distill_pretrain.compiled_ops import prepare_compiled_ops
from distill_pretrain.distributed import (World, all_reduce, any_rank, broadcast_object,
                                          init_distributed)
from distill_pretrain.engine import (COMPUTE_DTYPES, build_engine, current_lr,
                                     global_grad_norm, resolve_precision)
from distill_pretrain.metrics import Metrics

log = logging.getLogger(__name__)

STAT_KEYS = ("mlm_correct", "mlm_count", "agreement_sum", "agreement_count")


class NonFiniteLossUserError(RuntimeError):
    """Too many non-finite losses in a row; a checkpoint of the last good state exists."""


@dataclass
class TrainState:
    """What the loop counts; saved in every checkpoint."""
    step: int = 0
    skipped: int = 0
    bad_in_row: int = 0
    samples: int = 0
    tokens: int = 0


@dataclass
class Interval:
    """Sums since the last log line (this rank)."""
    micro_batches: int = 0
    total: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    tokens: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("data", "teacher", "student", "optimizer"), 0.0))
    started: float = field(default_factory=time.perf_counter)


@dataclass
class TrainResult:
    rank: int
    step: int
    output_dir: Path
    checkpoint: Path
    export_dir: Path | None
    final_eval: dict[str, float]
    stopped: bool = False
    """Stopped by SIGTERM before max_steps (a checkpoint was saved; not exported)."""


class _StopSignal:
    """Remembers a SIGTERM instead of dying mid-step; the loop checks it collectively."""

    def __init__(self):
        import signal
        import threading

        self._flag = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

    def is_set(self) -> bool:
        return self._flag.is_set()

    def restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# --- the module DeepSpeed wraps -------------------------------------------------------------


def engine_module(student, objective):
    """``DistillModule`` whose forward returns a plain dict ``{"total", "parts",
    "stats"}`` instead of the ObjectiveOutput dataclass: ZeRO-3 finds the tensors of a
    module's output to hook its backward pass and looks only into tensors, tuples, lists
    and dicts; with a dataclass the hooks are missed and backward fails
    ("active_backward_submodules is empty"). State-dict keys are unchanged."""
    from distill_pretrain.objective import DistillModule

    class EngineModule(DistillModule):
        def forward(self, input_ids, attention_mask, labels, teacher_out) -> dict:
            out = super().forward(input_ids, attention_mask, labels, teacher_out)
            return {"total": out.total, "parts": dict(out.parts), "stats": dict(out.stats)}

    return EngineModule(student, objective)


def as_output(raw: dict):
    from distill_pretrain.objective import ObjectiveOutput

    return ObjectiveOutput(total=raw["total"], parts=raw["parts"], stats=raw["stats"])


# --- setup ----------------------------------------------------------------------------------


def _nan_hook(rank: int) -> tuple[set[int], int | None]:
    spec = os.environ.get("DISTILL_TEST_NAN_LOSS", "")
    if not spec:
        return set(), None
    who, _, steps = spec.partition(":")
    if int(who) != rank:
        return set(), None
    exact, from_step = set(), None
    for item in steps.split(","):
        if item.endswith("-"):
            from_step = int(item[:-1])
        elif item:
            exact.add(int(item))
    return exact, from_step


def _seed_everything(seed: int, rank: int) -> None:
    # Ranks differ (dropout); the student's init has its own seed in build_student.
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def _timed(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _memory_mb(device: torch.device) -> dict[str, float]:
    import resource

    out = {"memory/host_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["memory/gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        out["memory/gpu_reserved_mb"] = torch.cuda.memory_reserved(device) / 2 ** 20
    return out


def _manifest_summary(manifest: dict) -> dict:
    return {"tokenizer": manifest["tokenizer"].get("name_or_path"),
            "seq_len": manifest["seq_len"],
            "splits": {name: {"samples": s.get("samples"), "tokens": s.get("tokens"),
                              "shards": len(s.get("shards", []))}
                       for name, s in manifest["splits"].items()},
            "sources": manifest.get("sources"), "dropped": manifest.get("dropped")}


# --- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def evaluate(engine, objective, teacher, batches: list[dict], world: World) -> dict[str, float]:
    """Student MLM loss/accuracy, every objective and teacher-student agreement on this
    rank's validation batches, summed over ranks. Every rank runs the same number of
    forwards (ZeRO-3 gathers parameters collectively): ranks with fewer batches repeat
    their first one with weight 0."""
    n_local = len(batches)
    n_max = int(all_reduce([n_local], "max")[0])
    if n_max == 0:
        return {}
    dummy = batches[0] if batches else _empty_batch(engine, teacher)
    engine.eval()
    sums: dict[str, float] = {}
    for i in range(n_max):
        weight = 1.0 if i < n_local else 0.0
        batch = {k: v.to(world.device) for k, v in (batches[i] if i < n_local else dummy).items()}
        n = batch["input_ids"].shape[0] * weight
        t_out = objective.teacher_forward(teacher, batch["input_ids"], batch["attention_mask"],
                                          batch["labels"])
        out = as_output(engine(batch["input_ids"], batch["attention_mask"], batch["labels"],
                               t_out))
        values = {"samples": n, "total": float(out.total) * n}
        values.update({f"part/{k}": float(v) * n for k, v in out.parts.items()})
        values.update({k: float(out.stats[k]) * weight for k in STAT_KEYS})
        if "mlm" not in out.parts:  # the student's own MLM loss, for every recipe
            labels = batch["labels"]
            logits_loss = engine.module.student(input_ids=batch["input_ids"],
                                                attention_mask=batch["attention_mask"],
                                                labels=labels).loss
            values["mlm_loss"] = float(logits_loss) * n
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
    engine.train()
    keys = sorted(sums)
    reduced = dict(zip(keys, all_reduce([sums[k] for k in keys]).tolist()))
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


def _empty_batch(engine, teacher) -> dict[str, torch.Tensor]:
    """A one-sequence batch for a rank that has no validation data (weight 0)."""
    tok = teacher.tokenizer
    ids = torch.tensor([[tok.cls_token_id, tok.mask_token_id, tok.sep_token_id]])
    labels = torch.tensor([[-100, tok.cls_token_id, -100]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


# --- the run --------------------------------------------------------------------------------


def pretrain(recipe) -> TrainResult:
    """Run (or resume) the distillation of ``recipe``; every rank calls this."""
    prepare_compiled_ops()  # own build cache, stale locks cleared, no silent compile
    from transformers import AutoTokenizer

    from distill_common.assets import resolve_model_dir
    from distill_common.config import to_dict
    from distill_pretrain.objective import build_objective
    from distill_pretrain.student import build_student
    from distill_pretrain.teacher import load_teacher
    from distill_pretrain.validate import validate_recipe

    cfg = recipe.train
    # Checks first, before any process group or model: every rank reads the same files,
    # so every rank fails the same way (no rank is left waiting for the others).
    validate_recipe(recipe)
    manifest = D.load_manifest(cfg.data_dir)
    train_urls = D.shard_urls(cfg.data_dir, manifest, "train")
    val_urls = D.shard_urls(cfg.data_dir, manifest, "validation")
    teacher_dir = resolve_model_dir(recipe.teacher.path)
    D.check_tokenizer(manifest, AutoTokenizer.from_pretrained(teacher_dir), cfg.data_dir,
                      str(teacher_dir))

    world = init_distributed(cfg.device)
    precision = resolve_precision(cfg.precision, world.device)
    _seed_everything(recipe.seed, world.rank)
    output_dir = Path(cfg.output_dir)
    teacher = load_teacher(recipe.teacher, device=world.device,
                           dtype=COMPUTE_DTYPES[precision])
    counts = D.load_token_counts(cfg.data_dir, manifest) \
        if cfg.mask_selection == "frequency" else None
    masker = D.build_masker(teacher.tokenizer, manifest, mask_prob=cfg.mask_prob,
                            replace_prob=cfg.mask_replace_prob,
                            random_prob=cfg.mask_random_prob,
                            whole_word=cfg.whole_word_mask, token_counts=counts,
                            smoothing=cfg.mask_smoothing)

    student = build_student(recipe.student, teacher, seed=recipe.seed)
    objective = build_objective(recipe.objective, teacher, student.config)
    engine, _ = build_engine(engine_module(student, objective), cfg, world.world_size,
                             precision, world.device)
    objective = engine.module.objective  # the wrapped module's own

    state, position = TrainState(), D.StreamPosition(num_workers=max(1, cfg.num_workers))
    resume_from = broadcast_object(
        str(found) if (found := ckpt.find_resume(output_dir, cfg.resume)) else None)
    if resume_from:
        client_state, rank_state = ckpt.load(engine, Path(resume_from), world.rank)
        state = TrainState(**client_state["train_state"])
        state.bad_in_row = 0
        if rank_state is None:
            log.warning("%s was written by %s rank(s), this run has %d: data restarts at "
                        "the beginning of an epoch and RNG streams are fresh", resume_from,
                        client_state.get("world_size"), world.world_size)
        else:
            position = D.StreamPosition.from_dict(rank_state["data"])
            ckpt.restore_rng(rank_state["rng"])
        log.info("resumed from %s at step %d", resume_from, state.step)

    stream = D.TrainStream(train_urls, seq_len=manifest["seq_len"],
                           batch_size=cfg.micro_batch_size, masker=masker, seed=recipe.seed,
                           rank=world.rank, world_size=world.world_size,
                           num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer,
                           position=position)
    val_batches = D.validation_batches(val_urls, seq_len=manifest["seq_len"],
                                       batch_size=cfg.micro_batch_size, masker=masker,
                                       seed=recipe.seed, rank=world.rank,
                                       world_size=world.world_size,
                                       max_samples=cfg.eval_samples)
    metrics = Metrics(output_dir, enabled=world.is_main, max_steps=cfg.max_steps,
                      tensorboard=cfg.tensorboard, start_step=state.step)
    run_info = {"recipe": to_dict(recipe), "manifest": _manifest_summary(manifest),
                "teacher": {"path": str(teacher.path), "layers": teacher.total_layers,
                            "hidden_size": teacher.hidden_size,
                            "has_mlm_head": teacher.has_mlm_head},
                "precision": precision, "world_size": world.world_size}

    def save(final_eval: dict | None = None) -> Path:
        rank_state = {"data": position.to_dict(), "rng": ckpt.capture_rng()}
        client_state = {"train_state": asdict(state), "world_size": world.world_size,
                        "recipe": run_info["recipe"]}

        def write_hf(folder: Path) -> None:
            from distill_common.fsio import atomic_write_json

            hf = folder / "hf"
            engine.module.student.config.save_pretrained(hf)
            teacher.tokenizer.save_pretrained(hf)
            atomic_write_json(hf / "run_info.json",
                              {**run_info, "step": state.step, "skipped_steps": state.skipped,
                               "samples": state.samples, "tokens": state.tokens,
                               "final_eval": final_eval or {}})
        return ckpt.save(engine, output_dir, state.step, rank=world.rank,
                         client_state=client_state, rank_state=rank_state,
                         keep_last=cfg.keep_last, write_extra=write_hf)

    nan_steps, nan_from = _nan_hook(world.rank)
    loader = iter(D.train_loader(stream, cfg.num_workers))
    interval = Interval()
    last_saved: Path | None = Path(resume_from) if resume_from else None
    final_eval: dict[str, float] = {}
    log.info("training %d steps from step %d (%s, %d rank(s))", cfg.max_steps, state.step,
             world.device, world.world_size)
    engine.train()
    micro_in_step = drawn = 0
    stopped = False
    stop_signal = _StopSignal()
    try:
        while state.step < cfg.max_steps:
            t0 = _timed(world.device)
            batch, meta, data_error = None, None, None
            try:
                batch, meta = D.split_meta(next(loader))
            except D.DataError as err:
                data_error = str(err).strip().splitlines()[-1]
            flags = all_reduce([data_error is not None, stop_signal.is_set()], "max",
                               world.device)
            if flags[0]:
                raise D.DataError(data_error or f"another rank could not read its shards "
                                                f"(see its log); rank {world.rank} stops too")
            if flags[1]:  # the drawn batch is not consumed: the saved position precedes it
                last_saved = save()
                log.warning("stopped by SIGTERM at step %d; checkpoint %s; run the same "
                            "command to resume", state.step, last_saved)
                stopped = True
                break
            position.after(meta)
            batch = {k: v.to(world.device, non_blocking=True) for k, v in batch.items()}
            t1 = _timed(world.device)
            teacher_out = objective.teacher_forward(teacher, batch["input_ids"],
                                                    batch["attention_mask"], batch["labels"])
            t2 = _timed(world.device)
            out = as_output(engine(batch["input_ids"], batch["attention_mask"],
                                   batch["labels"], teacher_out))
            loss = out.total
            step_number = state.step + 1
            drawn += 1
            if drawn in nan_steps or (nan_from is not None and drawn >= nan_from):
                loss = loss * float("nan")
            if any_rank(not bool(torch.isfinite(loss.detach())), world.device):
                state.skipped += 1
                state.bad_in_row += 1
                log.warning("step %d: non-finite loss on at least one rank; micro-batch "
                            "skipped (%d in a row, %d in total)", step_number,
                            state.bad_in_row, state.skipped)
                if state.bad_in_row >= cfg.max_bad_steps:
                    last_saved = save()
                    raise NonFiniteLossUserError(
                        f"{state.bad_in_row} non-finite losses in a row at step "
                        f"{step_number}: training stopped on all ranks. The last good state "
                        f"is saved in "
                        f"{last_saved}; lower train.lr, raise train.warmup_steps or use "
                        f"train.precision=fp32, then resume (train.resume=auto)")
                continue
            state.bad_in_row = 0
            engine.backward(loss)
            t3 = _timed(world.device)
            engine.step()
            t4 = _timed(world.device)
            micro_in_step += 1
            _accumulate(interval, out, batch, (t0, t1, t2, t3, t4))
            if micro_in_step < cfg.grad_accum_steps:
                continue
            micro_in_step = 0
            state.step += 1
            is_last = state.step == cfg.max_steps
            if state.step % cfg.log_every == 0 or is_last:
                values = _interval_metrics(interval, engine, state, world)
                state.samples += int(values.pop("_samples"))
                state.tokens += int(values.pop("_tokens"))
                metrics.log(state.step, values)
                interval = Interval()
            if (cfg.eval_every and state.step % cfg.eval_every == 0) or is_last:
                final_eval = evaluate(engine, objective, teacher, val_batches, world)
                metrics.log(state.step, final_eval)
            if (cfg.save_every and state.step % cfg.save_every == 0) or is_last:
                last_saved = save(final_eval if is_last else None)
    finally:
        # Shut the loader workers down now: an exception's traceback would keep the
        # loader alive until interpreter exit, where joining them can hang.
        loader = None
        stop_signal.restore()
    metrics.close()
    if last_saved is None or ckpt.tag_for(state.step) != last_saved.name:
        last_saved = save(final_eval)  # resumed at or past max_steps
    export_dir = None
    if cfg.export and not stopped:
        from distill_pretrain.distributed import barrier
        from distill_pretrain.export import export_checkpoint

        if world.is_main:
            export_dir = export_checkpoint(last_saved, cfg.export_dir)
        barrier()
        export_dir = Path(cfg.export_dir)
    return TrainResult(rank=world.rank, step=state.step, output_dir=output_dir,
                       checkpoint=last_saved, export_dir=export_dir, final_eval=final_eval,
                       stopped=stopped)


def _accumulate(interval: Interval, out, batch: dict, times: tuple[float, ...]) -> None:
    t0, t1, t2, t3, t4 = times
    interval.micro_batches += 1
    interval.total += float(out.total.detach())
    for k, v in out.parts.items():
        interval.parts[k] = interval.parts.get(k, 0.0) + float(v)
    interval.samples += int(batch["input_ids"].shape[0])
    interval.tokens += int(batch["attention_mask"].sum())
    for name, dt in (("data", t1 - t0), ("teacher", t2 - t1), ("student", t3 - t2),
                     ("optimizer", t4 - t3)):
        interval.seconds[name] += dt


def _interval_metrics(interval: Interval, engine, state: TrainState,
                      world: World) -> dict[str, float]:
    """Rank-averaged losses and global throughput since the last log line."""
    part_keys = sorted(interval.parts)
    local = [interval.micro_batches, interval.total, interval.samples, interval.tokens,
             *(interval.parts[k] for k in part_keys)]
    summed = all_reduce(local).tolist()
    n = max(summed[0], 1.0)
    elapsed = max(time.perf_counter() - interval.started, 1e-9)
    values = {"train/total": summed[1] / n, "train/lr": current_lr(engine),
              "train/grad_norm": global_grad_norm(engine),
              "train/skipped_steps": state.skipped,
              "throughput/samples_per_s": summed[2] / elapsed,
              "throughput/tokens_per_s": summed[3] / elapsed,
              "_samples": summed[2], "_tokens": summed[3]}
    for k, v in zip(part_keys, summed[4:]):
        values[f"train/part/{k}"] = v / n
    steps = max(interval.micro_batches, 1)
    for name, seconds in interval.seconds.items():
        values[f"time/{name}_ms"] = 1000.0 * seconds / steps
    values.update(_memory_mb(world.device))
    return values
