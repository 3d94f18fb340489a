"""The DeepSpeed engine: the only place that calls ``deepspeed.initialize``.

The module it wraps is ``EngineModule(student, objective)`` (a DistillModule whose output
DeepSpeed can hook), so the objective's projections train with the student; the teacher
is never given to DeepSpeed. DeepSpeed adopts the process group that
distill_common.distributed made. The optimizer is ``torch.optim.AdamW`` (no compilation)
unless offload or ``train.deepspeed_optimizer`` asks for DeepSpeed's own, which is
JIT-compiled on first use. The learning-rate schedule is a pure function of the step,
wrapped in a LambdaLR whose state DeepSpeed saves and restores with every checkpoint.

Non-finite gradients: an optimizer step whose gradients are not all finite is skipped
(no update, no schedule step) and ``engine.was_step_applied()`` says so, on every rank
alike. ZeRO 1-3 and bf16 do it inside DeepSpeed (its overflow check, one collective per
step); plain fp32 data parallelism (ZeRO-0) has no such check, so its AdamW does it
itself (``SkippingAdamW``).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from functools import partial

import torch

from distill_common.distributed import World, cpu_has_native_bf16
from distill_common.errors import DistillUserError
from distill_pretrain.distill_module import DistillModule
from distill_pretrain.objective_outputs import ObjectiveOutput
from distill_pretrain.train_config import TrainConfig

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class EngineUserError(DistillUserError, RuntimeError):
    """A precision / device / offload combination that cannot run here."""


CPU_BF16_ENV = "DISTILL_CPU_BF16"
"""`1`: keep train.precision=bf16 on a CPU without native bf16 (slow; tests use it)."""


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto -> bf16 on a GPU that supports it, else fp32. fp16 needs a GPU. bf16 on a CPU
    without native bf16 runs in fp32 instead (with a warning; DISTILL_CPU_BF16=1 keeps
    it)."""
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise EngineUserError("train.precision=fp16 needs a CUDA GPU (loss scaling is a GPU "
                              "feature in DeepSpeed); use bf16 or fp32 on CPU")
    if requested == "bf16" and device.type == "cpu" and not cpu_has_native_bf16() \
            and os.environ.get(CPU_BF16_ENV) != "1":
        log.warning("train.precision=bf16: this CPU has no native bf16 (no AVX512-BF16 or "
                    "AMX), where bf16 matmuls run about 70x slower than fp32; training in "
                    "fp32 instead (set train.precision=fp32 to silence this, %s=1 to keep "
                    "bf16)", CPU_BF16_ENV)
        return "fp32"
    return requested


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Learning rate at optimizer step ``step`` as a fraction of cfg.lr: linear warmup
    from 0, then linear / cosine decay to min_lr_ratio at max_steps (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def deepspeed_config(cfg: TrainConfig, world_size: int, precision: str,
                     on_gpu: bool) -> dict:
    zero: dict = {"stage": cfg.zero_stage, "contiguous_gradients": True,
                  "overlap_comm": on_gpu}
    if cfg.zero_stage == 3:
        # Lets a ZeRO-3 run write a consolidated 16-bit model without gathering by hand.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": cfg.offload_optimizer, "pin_memory": on_gpu}
    if cfg.offload_params != "none":
        zero["offload_param"] = {"device": cfg.offload_params, "pin_memory": on_gpu}
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum_steps * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.uses_deepspeed_optimizer:
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps,
            "weight_decay": cfg.weight_decay}}
    return config


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave biases and norm weights (1-D) alone. Tied weights appear
    once (named_parameters de-duplicates)."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    # "decays" stays in the groups (and their saved state): a resume that changes
    # train.weight_decay knows which group to give it.
    return [{"params": decay, "weight_decay": weight_decay, "decays": True},
            {"params": no_decay, "weight_decay": 0.0, "decays": False}]


class SkippingAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not all finite, and says so through
    ``overflow`` (the attribute DeepSpeed's engine reads to count a skipped step and hold
    the learning-rate schedule). Used where DeepSpeed has no check of its own (ZeRO-0
    fp32, where gradients are already all-reduced when ``step`` runs, so every rank
    decides the same)."""

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads \
            else torch.tensor(True)
        self.overflow = not bool(finite)  # the one host sync of the step
        if self.overflow:
            return None
        return super().step(closure)


class EngineModule(DistillModule):
    """A DistillModule whose forward returns a plain dict ``{"total", "parts", "stats"}``:
    ZeRO-3 finds the tensors of a module's output to hook its backward pass and looks
    only into tensors, tuples, lists and dicts; with a dataclass the hooks are missed and
    backward fails ("active_backward_submodules is empty"). State-dict keys are those of
    DistillModule."""

    def forward(self, input_ids, attention_mask, labels, teacher_out,
                logit_index=None) -> dict:
        out = super().forward(input_ids, attention_mask, labels, teacher_out, logit_index)
        return {"total": out.total, "parts": dict(out.parts), "stats": dict(out.stats)}


def as_output(raw: dict) -> ObjectiveOutput:
    return ObjectiveOutput(total=raw["total"], parts=raw["parts"], stats=raw["stats"])


def adopt_process_group(world: World, timeout_min: float) -> None:
    """Let DeepSpeed's communication layer wrap the process group we made (it would
    otherwise look for MPI or make its own)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=world.backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(minutes=timeout_min))


def build_engine(module: torch.nn.Module, cfg: TrainConfig, world: World, precision: str,
                 load_universal: bool = False):
    """-> (engine, lr_scheduler). ``module`` is moved and partitioned by DeepSpeed.
    ``load_universal``: the engine will load a universal checkpoint (resume.py)."""
    import deepspeed

    on_gpu = world.device.type == "cuda"
    config = deepspeed_config(cfg, world.world_size, precision, on_gpu)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    groups = param_groups(module, cfg.weight_decay)
    if cfg.uses_deepspeed_optimizer:
        optimizer = None
        log.info("optimizer: DeepSpeed AdamW (compiled on first use; set "
                 "TORCH_EXTENSIONS_DIR to cache it)")
    else:
        adamw = SkippingAdamW if (cfg.zero_stage == 0 and precision == "fp32") \
            else torch.optim.AdamW
        optimizer = adamw(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                          weight_decay=cfg.weight_decay, fused=on_gpu or None)
    schedule = partial(lr_multiplier, cfg=cfg)
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer,
        model_parameters=groups if optimizer is None else None,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=config)
    log.info("engine: ZeRO-%d, %s, micro-batch %d x accum %d x %d rank(s) = %d sequences "
             "per step", cfg.zero_stage, precision, cfg.micro_batch_size, cfg.grad_accum_steps,
             world.world_size, config["train_batch_size"])
    return engine, scheduler


def global_grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)


def current_lr(engine) -> float:
    return float(engine.optimizer.param_groups[0]["lr"])
