"""One optimizer step of distillation, and what is measured of it, without host syncs.

A GPU runs ahead of the Python loop only if the loop never waits for it. So per
micro-batch nothing here reads a device value: loss parts are summed on the device
(``Interval``), time is split by CUDA events (``PhaseClock``) and both are read once per
log line; the logit rows are chosen on the CPU batch (an index shipped with it, not a
boolean mask the GPU would have to count); the flags every rank must agree on (a data
error, a stop request) travel in one collective per optimizer step, before its first
forward; a non-finite gradient is caught by the optimizer step itself
(``engine.was_step_applied()``, see engine.py). ``train.profile_sync`` turns on exact
synchronous timing instead (a synchronize per phase).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from distill_pretrain.engine import as_output
from distill_pretrain.stream import split_meta

PHASES = ("teacher", "student", "optimizer")


class PhaseClock:
    """Per micro-batch: marks between phases. On CUDA the marks are events recorded on
    the stream (no wait); ``elapsed_ms`` synchronises once and sums them. On the CPU, or
    with ``sync=True``, marks are host times (after a synchronize when on CUDA)."""

    def __init__(self, device: torch.device, sync: bool = False):
        self.events = device.type == "cuda" and not sync
        self.sync_device = device if device.type == "cuda" and sync else None
        self._marks: list[list] = []

    def start(self) -> None:
        self._marks.append([self._mark()])

    def mark(self) -> None:
        self._marks[-1].append(self._mark())

    def _mark(self):
        if self.events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        if self.sync_device is not None:
            torch.cuda.synchronize(self.sync_device)
        return time.perf_counter()

    def elapsed_ms(self) -> dict[str, float]:
        """Milliseconds per phase summed over the marked micro-batches; resets."""
        totals = dict.fromkeys(PHASES, 0.0)
        if self.events and self._marks:
            self._marks[-1][-1].synchronize()
        for marks in self._marks:
            for name, a, b in zip(PHASES, marks, marks[1:]):
                totals[name] += a.elapsed_time(b) if self.events else 1000.0 * (b - a)
        self._marks = []
        return totals


@dataclass
class Interval:
    """Sums since the last log line, on this rank; device tensors until read."""
    micro_batches: int = 0
    samples: int = 0
    tokens: int = 0
    data_seconds: float = 0.0
    total: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, total: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        total = total.detach().float()
        self.total = total if self.total is None else self.total + total
        for k, v in parts.items():
            self.parts[k] = self.parts[k] + v if k in self.parts else v.float()

    def merge(self, step: "Interval") -> None:
        """Add an applied step's sums (a skipped step's NaN stays out of the curves)."""
        self.micro_batches += step.micro_batches
        self.samples += step.samples
        self.tokens += step.tokens
        if step.total is not None:
            self.add(step.total, step.parts)


@dataclass
class DrawnStep:
    """The micro-batches of one optimizer step, drawn before any compute (CPU tensors),
    or the data error that stopped the draw."""
    batches: list[dict] = field(default_factory=list)
    metas: list[dict] = field(default_factory=list)
    error: str | None = None


def draw_step(loader_iter, micro_batches: int, data_error: type) -> DrawnStep:
    drawn = DrawnStep()
    try:
        for _ in range(micro_batches):
            batch, meta = split_meta(next(loader_iter))
            drawn.batches.append(batch)
            drawn.metas.append(meta)
    except data_error as err:
        drawn.error = str(err).strip().splitlines()[-1]
    return drawn


class MicroStep:
    """Teacher forward, student forward, backward and ``engine.step`` of one micro-batch
    (DeepSpeed applies the optimizer on the step's last one)."""

    def __init__(self, engine, objective, teacher, device: torch.device, clock: PhaseClock):
        self.engine, self.objective, self.teacher = engine, objective, teacher
        self.device, self.clock = device, clock

    def __call__(self, batch: dict, interval: Interval, poison: bool = False) -> None:
        index = self.objective.logit_index(batch["attention_mask"], batch["labels"])
        interval.samples += int(batch["input_ids"].shape[0])
        interval.tokens += int(batch["attention_mask"].sum())  # CPU tensor: no sync
        on = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        index = index.to(self.device, non_blocking=True)
        ids, mask, labels = on["input_ids"], on["attention_mask"], on["labels"]
        self.clock.start()
        teacher_out = self.objective.teacher_forward(self.teacher, ids, mask, labels, index)
        self.clock.mark()
        out = as_output(self.engine(ids, mask, labels, teacher_out, index))
        loss = out.total * float("nan") if poison else out.total
        self.engine.backward(loss)
        self.clock.mark()
        self.engine.step()
        self.clock.mark()
        interval.micro_batches += 1
        interval.add(loss, out.parts)
