"""Typed config of `distill pretrain` (the `train:` section of a recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from distill_common.config import check, check_choice

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_DECAYS = ("linear", "cosine", "constant")
MASK_SELECTIONS = ("uniform", "frequency")
OFFLOAD_DEVICES = ("none", "cpu")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    # --- where things are -----------------------------------------------------------------
    data_dir: Optional[str] = None
    """Shards made by `distill prep`; default: the recipe's prep output."""
    output_dir: Optional[str] = None
    """Checkpoints, logs and TensorBoard events; default `<output_dir>/pretrain`."""
    export_dir: Optional[str] = None
    """The exported Hugging Face student; default `<output_dir>/student`."""

    # --- length and batch -----------------------------------------------------------------
    max_steps: int = 100
    """Optimizer steps (skipped non-finite steps do not count)."""
    micro_batch_size: int = 16
    """Sequences per rank per forward pass."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step. Global batch = micro x accum x world size."""

    # --- optimisation -----------------------------------------------------------------------
    lr: float = 5e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.0
    """The decay ends at lr x min_lr_ratio."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many steps."""
    lr_decay: str = "linear"
    """After warmup: linear | cosine | constant."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and LayerNorm weights)."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""

    # --- DeepSpeed --------------------------------------------------------------------------
    zero_stage: int = 2
    """ZeRO stage 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients) or 3
    (+ parameters)."""
    precision: str = "auto"
    """auto (bf16 on a GPU that supports it, else fp32) | fp32 | bf16 | fp16."""
    device: str = "auto"
    """auto (cuda when available, unless DS_ACCELERATOR=cpu) | cpu | cuda."""
    dist_timeout_min: float = 30.0
    """Minutes a collective may wait for the other ranks before the run fails."""
    profile_sync: bool = False
    """Exact per-phase timing (time/teacher_ms...) by synchronising the GPU after each
    phase; off, the phases are timed with CUDA events and nothing waits."""
    offload_optimizer: str = "none"
    """ZeRO-Offload of optimizer states: none | cpu. Needs zero_stage >= 1 and switches to
    DeepSpeed's own (JIT-compiled) AdamW, because ZeRO-Offload refuses a torch optimizer."""
    offload_params: str = "none"
    """ZeRO-3 parameter offload: none | cpu. Needs zero_stage 3."""
    deepspeed_optimizer: bool = False
    """Use DeepSpeed's AdamW (FusedAdam / CPUAdam, compiled on first use) instead of
    torch.optim.AdamW. Forced on by offload_optimizer."""

    # --- data -------------------------------------------------------------------------------
    mask_prob: float = 0.15
    """Fraction of (non-special) tokens chosen for prediction."""
    mask_replace_prob: float = 0.8
    """Of the chosen tokens: replaced by [MASK]."""
    mask_random_prob: float = 0.1
    """Of the chosen tokens: replaced by a random token (the rest are kept)."""
    whole_word_mask: bool = False
    """Choose whole words (a word and its ## continuation pieces) instead of pieces."""
    mask_selection: str = "uniform"
    """uniform | frequency (DistilBERT: tokens chosen with p ~ count^-mask_smoothing, counts
    from the shards' token_counts.npy)."""
    mask_smoothing: float = 0.7
    """Exponent of the frequency-smoothed selection."""
    shuffle_buffer: int = 1000
    """Samples held in each loader worker's seeded shuffle buffer."""
    num_workers: Optional[int] = None
    """DataLoader worker processes per rank (0 = read in the training process; null = 2 on
    a GPU, 1 on the CPU: one worker reads, masks and collates > 10,000 sequences/s)."""
    data_slots: Optional[int] = None
    """Independent read streams the data is split into (null = ranks x workers at the
    first start; fixed for the run by its checkpoints). A resume may use any number of
    ranks x workers up to it; set it higher at the first start for elastic runs."""
    eval_samples: Optional[int] = 2048
    """Validation samples used per evaluation (null = the whole validation split)."""

    # --- checks, checkpoints, logs -----------------------------------------------------------
    log_every: int = 10
    """Log metrics (TensorBoard, metrics.jsonl, progress line) every N steps."""
    eval_every: int = 100
    """Evaluate on the validation shards every N steps (and at the end; 0 = only at the
    end)."""
    save_every: int = 500
    """Checkpoint every N steps (and at the end; 0 = only at the end)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    resume: str = "auto"
    """auto (newest complete checkpoint in output_dir, if any) | never | a checkpoint
    folder."""
    max_bad_steps: int = 5
    """Stop (with a checkpoint) after this many non-finite losses in a row."""
    tensorboard: bool = True
    """Write TensorBoard events under output_dir/tensorboard."""
    export: bool = True
    """Export the student to export_dir at the end of the run."""
    export_onnx: bool = False
    """Also write the exported encoder in ONNX (export_dir/onnx/model.onnx; needs the
    `onnx` extra: onnx, onnxruntime, onnxscript)."""
    export_onnx_int8: bool = False
    """Also write its dynamic int8 variant (export_dir/onnx/model_int8.onnx)."""

    def __post_init__(self):
        self.betas = list(self.betas)
        check(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        check(self.micro_batch_size >= 1, "micro_batch_size",
              f"must be >= 1, got {self.micro_batch_size}")
        check(self.grad_accum_steps >= 1, "grad_accum_steps",
              f"must be >= 1, got {self.grad_accum_steps}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio",
              f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check_choice(self.lr_decay, "lr_decay", LR_DECAYS)
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
              f"must be two numbers in [0, 1), got {self.betas}")
        check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        check_choice(self.zero_stage, "zero_stage", (0, 1, 2, 3))
        check_choice(self.precision, "precision", PRECISIONS)
        check_choice(self.device, "device", DEVICES)
        check_choice(self.offload_optimizer, "offload_optimizer", OFFLOAD_DEVICES)
        check_choice(self.offload_params, "offload_params", OFFLOAD_DEVICES)
        check(self.offload_optimizer == "none" or self.zero_stage >= 1, "offload_optimizer",
              "needs zero_stage >= 1; set train.zero_stage=2 (or 3)")
        check(self.offload_params == "none" or self.zero_stage == 3, "offload_params",
              "parameter offload needs zero_stage 3; set train.zero_stage=3")
        check(0.0 < self.mask_prob < 1.0, "mask_prob", f"must be in (0, 1), got {self.mask_prob}")
        check(self.mask_replace_prob >= 0 and self.mask_random_prob >= 0
              and self.mask_replace_prob + self.mask_random_prob <= 1.0, "mask_replace_prob",
              "mask_replace_prob + mask_random_prob must be in [0, 1], got "
              f"{self.mask_replace_prob} + {self.mask_random_prob}")
        check_choice(self.mask_selection, "mask_selection", MASK_SELECTIONS)
        check(self.mask_smoothing >= 0, "mask_smoothing",
              f"must be >= 0, got {self.mask_smoothing}")
        check(self.shuffle_buffer >= 1, "shuffle_buffer",
              f"must be >= 1 (1 = no shuffling), got {self.shuffle_buffer}")
        check(self.num_workers is None or self.num_workers >= 0, "num_workers",
              f"must be >= 0 or null, got {self.num_workers}")
        check(self.data_slots is None or self.data_slots >= 1, "data_slots",
              f"must be >= 1 or null, got {self.data_slots}")
        check(self.dist_timeout_min > 0, "dist_timeout_min",
              f"must be > 0, got {self.dist_timeout_min}")
        check(self.eval_samples is None or self.eval_samples >= 1, "eval_samples",
              f"must be >= 1 or null, got {self.eval_samples}")
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        check(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        check(self.save_every >= 0, "save_every", f"must be >= 0, got {self.save_every}")
        check(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")
        check(bool(self.resume), "resume", "must be auto, never or a checkpoint folder")
        check(self.max_bad_steps >= 1, "max_bad_steps",
              f"must be >= 1, got {self.max_bad_steps}")

    @property
    def uses_deepspeed_optimizer(self) -> bool:
        return self.deepspeed_optimizer or self.offload_optimizer != "none"
