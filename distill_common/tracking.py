"""One metrics interface for every stage that trains: TensorBoard (rank 0), the same
figures in ``metrics.jsonl``, and a progress line with rate and ETA. A training loop calls
``log`` and nothing else.

Names are TensorBoard tags: ``train/total``, ``train/part/<objective>``, ``train/lr``,
``eval/mlm_accuracy``, ``time/data``... Each JSONL line is ``{"step": n, "time": unix,
"<tag>": value, ...}``; after a resume, lines past the resumed step are dropped so the
file holds one curve.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

from distill_common.fsio import atomic_write_text
from distill_common.progress import format_seconds

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, output_dir: str | Path, *, enabled: bool, max_steps: int,
                 tensorboard: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.max_steps = max_steps
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        self._t0 = time.perf_counter()
        self._step0 = start_step
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_after(start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a killed run wrote past the resumed step.
            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"),
                                        purge_step=start_step + 1 if start_step else None)

    def _drop_after(self, step: int) -> None:
        """Keep the records up to ``step``. A line a killed run left half-written is
        dropped with a warning, not a crash (every resume would meet it again)."""
        if not self.path.is_file():
            return
        kept, torn = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:
                torn += 1
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        if torn:
            log.warning("%s: dropped %d unreadable line(s) (a run killed while writing)",
                        self.path, torn)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def record_config(self, config: dict, metrics: Sequence[str] = ()) -> None:
        """The run's resolved configuration in TensorBoard: as YAML text (Text tab, tag
        ``config``) and its scalar leaves, dotted, as hyperparameters (HParams tab,
        beside ``metrics``: tags this run logs, e.g. ``eval/mlm_accuracy``)."""
        if not self.enabled or self.writer is None:
            return
        import yaml
        from torch.utils.tensorboard.summary import hparams

        text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
        # TensorBoard renders text as markdown: indented lines stay a literal block.
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()))
        # Written to this run's own event file (add_hparams would open a second run), so
        # the HParams tab pairs the values with this run's scalars.
        for summary in hparams(flat_hparams(config), {tag: 0.0 for tag in metrics}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log(self, step: int, values: dict[str, float], *, progress: bool = True) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if v is not None else None) for k, v in values.items()}
        if self.writer is not None:
            for tag, value in clean.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(tag, value, step)
        record = {"step": step, "time": round(time.time(), 3)}
        record.update({k: (v if v is None or math.isfinite(v) else str(v))
                       for k, v in clean.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if progress:
            log.info(self.progress_line(step, clean))

    def progress_line(self, step: int, values: dict[str, float]) -> str:
        elapsed = time.perf_counter() - self._t0
        done = step - self._step0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.max_steps - step) / rate if rate > 0 else float("inf")
        parts = [f"step {step}/{self.max_steps}"]
        for tag, label, fmt in (("train/total", "loss", "{:.4f}"), ("train/lr", "lr", "{:.2e}"),
                                ("train/grad_norm", "grad", "{:.2f}"),
                                ("eval/mlm_accuracy", "eval mlm acc", "{:.3f}"),
                                ("eval/agreement", "agreement", "{:.3f}"),
                                ("throughput/samples_per_s", "samples/s", "{:.1f}"),
                                ("throughput/tokens_per_s", "tokens/s", "{:,.0f}")):
            if values.get(tag) is not None:
                parts.append(f"{label} {fmt.format(values[tag])}")
        parts.append(f"{rate:.2f} steps/s, ETA {format_seconds(eta)}")
        return ", ".join(parts)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.close()
        self._file.close()


def flat_hparams(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``; lists and None become text
    (TensorBoard takes numbers, strings and booleans)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl (for tests, the model card and the report); a torn
    last line is skipped."""
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in records if isinstance(r, dict)]
