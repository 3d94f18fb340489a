"""The distillation loop, top to bottom, one optimizer step per turn:

    draw the step's micro-batches (CPU) -> one collective: any rank with a data error or a
    stop request? -> per micro-batch: teacher forward (no grad), student forward and the
    objective, backward, engine.step -> was the step applied (finite gradients)? ->
    every N steps: metrics, evaluation, checkpoint

Faults: SIGTERM (Slurm preemption, `scancel`, torchrun shutting down) on any rank makes
every rank save a checkpoint before the next step and stop; the same command resumes.
Steps stop only at optimizer-step boundaries, so a resume with gradient accumulation is
exact. A step whose gradients are not all finite (a NaN or inf loss, or a finite loss
with an inf gradient) is skipped by every rank (no update) and counted; after
``train.max_bad_steps`` in a row every rank saves the last good state and stops with the
same error. A data error on one rank stops every rank the same way.

Test hooks (test-only): ``DISTILL_TEST_NAN_LOSS="RANK:N[,N...]"`` makes rank RANK see a
NaN loss on the N-th micro-batch this process draws (1-based; ``N-`` = from the N-th on);
``DISTILL_TEST_INF_GRAD`` likewise gives a finite loss whose gradient is infinite.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distill_common.distributed import World
from distill_common.errors import DistillUserError
from distill_common.manifest import DataError
from distill_common.tracking import Metrics
from distill_pretrain.engine import current_lr, global_grad_norm
from distill_pretrain.evaluate import evaluate
from distill_pretrain.step import Interval, MicroStep, PhaseClock, draw_step
from distill_pretrain.stop import StopSignal
from distill_pretrain.train_config import TrainConfig

log = logging.getLogger(__name__)


class NonFiniteLossUserError(DistillUserError, RuntimeError):
    """Too many non-finite steps in a row; a checkpoint of the last good state exists."""


@dataclass
class TrainState:
    """What the loop counts; saved in every checkpoint."""
    step: int = 0
    skipped: int = 0
    bad_in_row: int = 0
    samples: int = 0
    tokens: int = 0


@dataclass
class LoopOutcome:
    last_saved: Path | None
    final_eval: dict[str, float]
    stopped: bool
    """Stopped by SIGTERM before max_steps (a checkpoint was saved)."""


class _FaultHook:
    """Which micro-batches a test hook poisons on this rank (see the module docstring)."""

    def __init__(self, variable: str, rank: int):
        self.exact: set[int] = set()
        self.from_draw: int | None = None
        self.drawn = 0
        who, _, draws = os.environ.get(variable, "").partition(":")
        if not who or int(who) != rank:
            return
        for item in draws.split(","):
            if item.endswith("-"):
                self.from_draw = int(item[:-1])
            elif item:
                self.exact.add(int(item))

    def hit(self) -> bool:
        self.drawn += 1
        return self.drawn in self.exact or (self.from_draw is not None
                                            and self.drawn >= self.from_draw)


class TrainLoop:
    def __init__(self, *, cfg: TrainConfig, world: World, engine, objective, teacher, loader,
                 position, state: TrainState, metrics: Metrics, checkpoints,
                 val_batches: list[dict], precision: str):
        self.cfg, self.world, self.engine = cfg, world, engine
        self.objective, self.teacher, self.loader = objective, teacher, loader
        self.position, self.state, self.metrics = position, state, metrics
        self.checkpoints, self.val_batches, self.precision = checkpoints, val_batches, precision
        self.clock = PhaseClock(world.device, sync=cfg.profile_sync)
        self.micro = MicroStep(engine, objective, teacher, world.device, self.clock)
        self.nan_hook = _FaultHook("DISTILL_TEST_NAN_LOSS", world.rank)
        self.inf_grad_hook = _FaultHook("DISTILL_TEST_INF_GRAD", world.rank)

    def save(self, final_eval: dict | None = None) -> Path:
        return self.checkpoints.save(final_eval)

    def run(self, last_saved: Path | None) -> LoopOutcome:
        cfg, state = self.cfg, self.state
        final_eval: dict[str, float] = {}
        stop = StopSignal()
        loader = iter(self.loader)
        interval = Interval()
        log.info("training %d steps from step %d (%s, %d rank(s))", cfg.max_steps,
                 state.step, self.world.device, self.world.world_size)
        self.engine.train()
        try:
            while state.step < cfg.max_steps:
                t0 = time.perf_counter()
                drawn = draw_step(loader, cfg.grad_accum_steps, DataError)
                interval.data_seconds += time.perf_counter() - t0
                data_failed, stop_asked = self.world.all_reduce(
                    [drawn.error is not None, stop.is_set()], "max").tolist()
                if data_failed:
                    raise DataError(drawn.error or f"another rank could not read its shards "
                                                   f"(see its log); rank {self.world.rank} "
                                                   f"stops too")
                if stop_asked:  # the drawn batches are not consumed: the saved position
                    last_saved = self.save()  # precedes them
                    log.warning("stopped by SIGTERM at step %d; checkpoint %s; run the same "
                                "command to resume", state.step, last_saved)
                    return LoopOutcome(last_saved, final_eval, stopped=True)
                step_sums = Interval()
                for batch, meta in zip(drawn.batches, drawn.metas):
                    self.position.after(meta)
                    self.micro(batch, step_sums, nan_loss=self.nan_hook.hit(),
                               inf_grad=self.inf_grad_hook.hit())
                if not self.engine.was_step_applied():
                    self._skipped()
                    continue
                interval.merge(step_sums)
                state.bad_in_row = 0
                state.step += 1
                is_last = state.step == cfg.max_steps
                if state.step % cfg.log_every == 0 or is_last:
                    self.metrics.log(state.step, self._interval_metrics(interval))
                    interval = Interval()
                if (cfg.eval_every and state.step % cfg.eval_every == 0) or is_last:
                    final_eval = evaluate(self.engine, self.objective, self.teacher,
                                          self.val_batches, self.world)
                    self.metrics.log(state.step, final_eval)
                if (cfg.save_every and state.step % cfg.save_every == 0) or is_last:
                    last_saved = self.save(final_eval if is_last else None)
        finally:
            # Shut the loader workers down now: an exception's traceback would keep the
            # loader alive until interpreter exit, where joining them can hang.
            loader = None
            stop.restore()
        return LoopOutcome(last_saved, final_eval, stopped=False)

    def _skipped(self) -> None:
        """The optimizer step was not applied (non-finite gradients on some rank: every
        rank sees the same). fp16's loss scaler skips steps by design while it lowers the
        scale; those do not count as bad until the scale is at its floor."""
        state = self.state
        state.skipped += 1
        if self.precision == "fp16" and _loss_scale(self.engine) > 1.0:
            log.info("step %d: fp16 overflow, loss scale lowered to %g", state.step + 1,
                     _loss_scale(self.engine))
            return
        state.bad_in_row += 1
        log.warning("step %d: non-finite loss or gradients on at least one rank; step "
                    "skipped (%d in a row, %d in total)", state.step + 1, state.bad_in_row,
                    state.skipped)
        if state.bad_in_row >= self.cfg.max_bad_steps:
            saved = self.save()
            raise NonFiniteLossUserError(
                f"{state.bad_in_row} non-finite steps in a row at step {state.step + 1}: "
                f"training stopped on all ranks. The last good state is saved in {saved}; "
                f"lower train.lr or raise train.warmup_steps, then resume (the new "
                f"settings take effect), or start over with train.precision=fp32")

    def _interval_metrics(self, interval: Interval) -> dict[str, float]:
        """Rank-summed losses and throughput since the last log line: the one read of
        the device sums (one collective, one host sync)."""
        part_keys = sorted(interval.parts)
        device = self.world.device
        host = torch.tensor([interval.micro_batches, interval.samples, interval.tokens],
                            dtype=torch.float64, device=device)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        sums = [interval.total.double() if interval.total is not None else zero,
                *(interval.parts[k].double() for k in part_keys)]
        reduced = self.world.all_reduce(torch.cat([host, torch.stack(sums)])).tolist()
        micro_batches, samples, tokens, total, *parts = reduced
        n = max(micro_batches, 1.0)
        elapsed = max(time.perf_counter() - interval.started, 1e-9)
        self.state.samples += int(samples)
        self.state.tokens += int(tokens)
        values = {"train/total": total / n, "train/lr": current_lr(self.engine),
                  "train/grad_norm": global_grad_norm(self.engine),
                  "train/skipped_steps": self.state.skipped,
                  "throughput/samples_per_s": samples / elapsed,
                  "throughput/tokens_per_s": tokens / elapsed,
                  "time/data_ms": 1000.0 * interval.data_seconds / max(interval.micro_batches, 1)}
        values.update({f"train/part/{k}": v / n for k, v in zip(part_keys, parts)})
        local_n = max(interval.micro_batches, 1)
        values.update({f"time/{name}_ms": ms / local_n
                       for name, ms in self.clock.elapsed_ms().items()})
        values.update(_memory_mb(device))
        return values


def _loss_scale(engine) -> float:
    scale = getattr(engine.optimizer, "cur_scale", None) or \
        getattr(engine.optimizer, "loss_scale", None)
    return float(scale) if scale is not None else 1.0


def _memory_mb(device: torch.device) -> dict[str, float]:
    import resource

    out = {"memory/host_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["memory/gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        out["memory/gpu_reserved_mb"] = torch.cuda.memory_reserved(device) / 2 ** 20
    return out
