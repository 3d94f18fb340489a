"""Typed configs of `distill finetune` and `distill report`.

Hyperparameters resolve in three layers, later wins: the built-in defaults
(``DEFAULT_HPARAMS``), the task recipe's ``train:`` section (configs/tasks/*.yaml), then
the run's ``finetune:`` section / command-line overrides. A field left at ``None`` means
"inherit from the layer below".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from distill_common.config import check, check_choice

PRECISIONS = ("auto", "bf16", "fp32")
SAVE_MODES = ("best", "all", "none")


@dataclass
class HParams:
    """The fine-tuning recipe: AdamW, linear warmup then linear decay, early stopping."""

    seeds: Optional[List[int]] = None
    """One full run per seed (classifier init and data order); results give mean and std."""
    epochs: Optional[int] = None
    """Passes over the training split (fewer if early stopping triggers)."""
    batch_size: Optional[int] = None
    """Training examples per optimizer step, per process (global = this x world size)."""
    eval_batch_size: Optional[int] = None
    """Examples per forward pass at evaluation."""
    learning_rate: Optional[float] = None
    """Peak AdamW learning rate, reached after warmup."""
    weight_decay: Optional[float] = None
    """AdamW decoupled weight decay (not applied to biases and LayerNorm weights)."""
    warmup_ratio: Optional[float] = None
    """Fraction of all steps with a linear warmup from 0; linear decay to 0 afterwards."""
    max_length: Optional[int] = None
    """Tokens per example (pairs: both texts together); longer inputs are truncated."""
    patience: Optional[int] = None
    """Stop after this many validation evaluations without improvement; 0 = never."""
    evals_per_epoch: Optional[int] = None
    """Validation evaluations per epoch (early-stopping checkpoints)."""
    max_grad_norm: Optional[float] = None
    """Gradient clipping norm; 0 = no clipping."""
    precision: Optional[str] = None
    """auto (bf16 on a GPU, and on a CPU with native bf16; else fp32), bf16 or fp32."""
    max_train_examples: Optional[int] = None
    """Use at most this many training examples (a seeded subset); 0 = all."""
    min_steps: Optional[int] = None
    """Train for at least this many optimizer steps: on a small training split the epochs
    are raised to reach it, and early stopping applies only after it (the best validation
    checkpoint is still the one scored); 0 = the epochs as given."""

    def __post_init__(self):
        if self.seeds is not None:
            check(len(self.seeds) > 0, "seeds", "give at least one seed, e.g. [0]")
            check(all(s >= 0 for s in self.seeds), "seeds", f"must be >= 0, got {self.seeds}")
        for name in ("epochs", "batch_size", "eval_batch_size", "max_length",
                     "evals_per_epoch"):
            value = getattr(self, name)
            check(value is None or value > 0, name, f"must be > 0, got {value}")
        for name in ("patience", "max_train_examples", "min_steps", "weight_decay",
                     "max_grad_norm"):
            value = getattr(self, name)
            check(value is None or value >= 0, name, f"must be >= 0, got {value}")
        check(self.learning_rate is None or self.learning_rate > 0, "learning_rate",
              f"must be > 0, got {self.learning_rate}")
        check(self.warmup_ratio is None or 0 <= self.warmup_ratio < 1, "warmup_ratio",
              f"must be in [0, 1), got {self.warmup_ratio}")
        if self.precision is not None:
            check_choice(self.precision, "precision", PRECISIONS)


DEFAULT_HPARAMS = HParams(
    seeds=[0], epochs=3, batch_size=32, eval_batch_size=64, learning_rate=5e-5,
    weight_decay=0.01, warmup_ratio=0.1, max_length=128, patience=2, evals_per_epoch=1,
    max_grad_norm=1.0, precision="auto", max_train_examples=0, min_steps=0)


def merge_hparams(*layers: HParams) -> HParams:
    """Later layers win; ``None`` inherits. The result has every field set."""
    merged = {}
    for f in dataclasses.fields(HParams):
        for layer in layers:
            value = getattr(layer, f.name, None)
            if value is not None:
                merged[f.name] = value
    return HParams(**merged)


@dataclass
class FinetuneConfig(HParams):
    """The recipe's ``finetune:`` section: which tasks, where, and hyperparameter overrides
    (every field of HParams; ``None`` = the task recipe's value, else the default)."""

    tasks: List[str] = field(default_factory=lambda: ["bbc_news"])
    """Task recipes: names of the built-in tasks (configs/tasks/NAME.yaml) or YAML paths."""
    output_dir: Optional[str] = None
    """Default `<output_dir>/finetune`; one folder per model and task below it."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    num_threads: Optional[int] = None
    """torch intra-op threads on CPU; None keeps torch's default."""
    save_model: str = "best"
    """best: keep the fine-tuned model of the best-validation seed; all: every seed; none."""
    learning_rates: Optional[List[float]] = None
    """A learning-rate grid, e.g. [1.0e-4, 1.0e-3]: every model is fine-tuned at each rate
    (all seeds; into ``<model>/<task>/lr-<rate>/``) and scored at the rate whose seeds'
    mean validation score is best, the lower rate on a tie; test scores play no part.
    Takes the place of ``learning_rate``. A small student often wants a higher rate than
    its teacher (a 3 x 224 student: 1e-3 where the task's 1e-4 suits the teacher)."""

    def __post_init__(self):
        super().__post_init__()
        if self.learning_rates is not None:
            check(len(self.learning_rates) > 0, "learning_rates",
                  "give at least one rate, e.g. [1.0e-4, 1.0e-3], or leave it unset")
            check(all(r > 0 for r in self.learning_rates), "learning_rates",
                  f"every rate must be > 0, got {self.learning_rates}")
            check(len(set(self.learning_rates)) == len(self.learning_rates),
                  "learning_rates", f"a rate is listed twice: {self.learning_rates}")
        check(len(self.tasks) > 0, "tasks", "list at least one task, e.g. [bbc_news]")
        check_choice(self.device, "device", ("auto", "cpu", "cuda"))
        check_choice(self.save_model, "save_model", SAVE_MODES)
        check(self.num_threads is None or self.num_threads > 0, "num_threads",
              f"must be > 0, got {self.num_threads}")


@dataclass
class ReportConfig:
    """The recipe's ``report:`` section: what `distill report` measures and how."""

    output_dir: Optional[str] = None
    """Default `<output_dir>/report`."""
    models: Dict[str, str] = field(default_factory=dict)
    """Extra models to compare, name -> folder or model asset (the pipeline adds the
    teacher and the student itself)."""
    teacher: Optional[str] = None
    """Name (a key of the models) that retention and speed-up are relative to."""
    latency_batch_sizes: List[int] = field(default_factory=lambda: [1, 32])
    """Batch sizes timed on CPU (and GPU when there is one)."""
    latency_seq_len: int = 128
    """Tokens per sequence in the latency runs (no padding)."""
    latency_warmup: int = 3
    """Untimed forward passes before timing."""
    latency_repeats: int = 10
    """Timed forward passes; the median is reported."""
    latency_interleave: bool = True
    """Load every model at once and alternate their timed CPU runs (one forward of each
    per round), so that a machine whose load changes during the report slows every model
    alike and the speed-ups stay true; false: one model after the other, one loaded at a
    time (less memory)."""
    threads: Optional[int] = None
    """CPU threads for every model's latency run (the same for all); None = torch's
    default at the start of the report."""
    gpu: str = "auto"
    """auto: also time on a CUDA GPU when there is one (bf16); off: CPU only."""
    plots: bool = True
    """Write score-vs-size and score-vs-latency PNGs."""
    bootstrap_draws: int = 2000
    """Draws of the paired bootstrap behind each student's gap to the teacher and its 95%
    interval (from the predictions results.json keeps); 0 leaves the interval out."""

    onnx: bool = False
    """Also time every encoder under ONNX Runtime (fp32 and dynamic int8) and check that
    each fine-tuned model, exported to ONNX, scores its test split as under PyTorch (needs
    the `onnx` extra)."""
    onnx_tolerance: float = 0.005
    """Largest |ONNX - PyTorch| test score (a fraction: 0.005 = half a point) that counts
    as equal."""

    def __post_init__(self):
        check(self.onnx_tolerance >= 0, "onnx_tolerance",
              f"must be >= 0, got {self.onnx_tolerance}")
        check(self.bootstrap_draws >= 0, "bootstrap_draws",
              f"must be >= 0 (0: no interval), got {self.bootstrap_draws}")
        check(len(self.latency_batch_sizes) > 0 and all(b > 0 for b in self.latency_batch_sizes),
              "latency_batch_sizes", f"must be positive sizes, got {self.latency_batch_sizes}")
        check(self.latency_seq_len >= 2, "latency_seq_len",
              f"must be >= 2 (CLS and SEP), got {self.latency_seq_len}")
        check(self.latency_warmup >= 0, "latency_warmup", f"must be >= 0, got "
              f"{self.latency_warmup}")
        check(self.latency_repeats > 0, "latency_repeats", f"must be > 0, got "
              f"{self.latency_repeats}")
        check(self.threads is None or self.threads > 0, "threads",
              f"must be > 0, got {self.threads}")
        check_choice(self.gpu, "gpu", ("auto", "off"))
