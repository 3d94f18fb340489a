"""Size and speed of an encoder folder: parameters, bytes on disk, forward latency.

Latency is of the bare encoder (``AutoModel``: what every task head sits on) on
full-length sequences of random in-vocabulary ids, median over timed runs after
warm-up, at a fixed thread count so that models are compared like for like.

A speed-up is a ratio of two medians. Timed one model after the other, a machine whose
load drifts (shared cores, another job starting) puts the drift into the ratio: on a
2-core machine the same 12 x 768 teacher timed 176 ms at batch 1 in one run and 268 in
the next, its student 34-37 in both. ``measure_all`` therefore loads every model first
and interleaves their timed runs (one forward of each, in a rotating order, per round),
so that each median is taken over the same stretch of time.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch

from finetune.loading import load_encoder

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_bytes(model_dir: Path) -> int:
    """Bytes of the weight files in the folder (what a user downloads to serve it)."""
    return sum(p.stat().st_size for p in Path(model_dir).iterdir()
               if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _inputs(vocab_size: int, batch: int, seq_len: int, device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch * 1000 + seq_len)
    # Ids above 1000 avoid the special tokens of BERT/MPNet vocabularies.
    low = min(1000, vocab_size // 2)
    ids = torch.randint(low, vocab_size, (batch, seq_len), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _timed(call: Callable[[], object], warmup: int, repeats: int,
           sync: Callable[[], None] = lambda: None) -> list[float]:
    """Wall times (ms) of ``repeats`` calls after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        call()
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return times


def _latency_row(batch: int, seq_len: int, times: list[float]) -> dict:
    median = statistics.median(times)
    return {"batch": batch, "seq_len": seq_len, "median_ms": round(median, 3),
            "min_ms": round(min(times), 3), "max_ms": round(max(times), 3),
            "throughput_seq_per_s": round(batch / (median / 1000), 2)}


@torch.inference_mode()
def time_forward(model, vocab_size: int, batch: int, seq_len: int, warmup: int,
                 repeats: int, device: torch.device) -> dict:
    """Median and spread (ms) of ``repeats`` forward passes after ``warmup`` untimed ones,
    in the model's own dtype (bf16 weights are served as bf16, not autocast over fp32)."""
    inputs = _inputs(vocab_size, batch, seq_len, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return _latency_row(batch, seq_len, _timed(lambda: model(**inputs), warmup, repeats, sync))


def measure(model_dir: Path, batch_sizes: Sequence[int], seq_len: int, warmup: int,
            repeats: int, threads: int, gpu: bool, progress=None) -> dict:
    """Parameters, size on disk and latency rows for one model folder, its timed runs
    back to back; ``progress`` (distill_common.progress.Progress) moves one unit per
    latency row."""
    return measure_all({"model": model_dir}, batch_sizes, seq_len, warmup, repeats, threads,
                       gpu, progress=progress)["model"]


def measure_all(model_dirs: Mapping[str, Path], batch_sizes: Sequence[int], seq_len: int,
                warmup: int, repeats: int, threads: int, gpu: bool, *,
                interleave: bool = True, progress=None) -> dict[str, dict]:
    """``measure`` for every model, name -> its row. ``interleave``: every model is
    loaded at once and their CPU runs alternate (``time_interleaved``), so that a
    machine's changing load falls on all of them alike; else one model at a time (less
    memory: one model loaded at a time). GPU runs are per model either way."""
    if not interleave:
        return {name: measure(folder, batch_sizes, seq_len, warmup, repeats, threads, gpu,
                              progress)
                for name, folder in model_dirs.items()}
    tick = progress.update if progress is not None else (lambda n=1: None)
    models = {name: load_encoder(folder) for name, folder in model_dirs.items()}
    with _threads(threads):
        cpu = time_interleaved(models, batch_sizes, seq_len, warmup, repeats, tick)
    out = {}
    for name, model in models.items():
        out[name] = _describe(model, model_dirs[name], threads, cpu[name])
        if gpu:
            out[name].update(_gpu_rows(model, batch_sizes, seq_len, warmup, repeats, tick))
    return out


@torch.inference_mode()
def time_interleaved(models: Mapping[str, torch.nn.Module], batch_sizes: Sequence[int],
                     seq_len: int, warmup: int, repeats: int,
                     tick: Callable[[int], None] = lambda n=1: None) -> dict[str, list[dict]]:
    """CPU latency rows of several loaded models, name -> rows as ``time_forward``'s.
    Per batch size: each model's ``warmup`` untimed forwards, then ``repeats`` rounds
    of one timed forward of every model, each round starting one model further along
    (no model always runs right after the same other one)."""
    names = list(models)
    rows: dict[str, list[dict]] = {name: [] for name in names}
    for batch in batch_sizes:
        calls = {}
        for name, model in models.items():
            inputs = _inputs(model.config.vocab_size, batch, _seq_len(model, seq_len), "cpu")
            calls[name] = (lambda m=model, x=inputs: m(**x))
        for name in names:
            _timed(calls[name], warmup, 0)
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(repeats):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                times[name] += _timed(calls[name], 0, 1)
        for name in names:
            rows[name].append(_latency_row(batch, _seq_len(models[name], seq_len),
                                           times[name]))
        tick(len(names))
    return rows


def _seq_len(model, seq_len: int) -> int:
    """The requested length, or the longest the model's positions allow."""
    return min(seq_len, getattr(model.config, "max_position_embeddings", seq_len + 2) - 2)


@contextmanager
def _threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _describe(model, model_dir: Path, threads: int, cpu: list[dict]) -> dict:
    return {"parameters": count_parameters(model), "size_bytes": weights_bytes(model_dir),
            "architecture": (model.config.architectures or [type(model).__name__])[0],
            "layers": getattr(model.config, "num_hidden_layers", None),
            "hidden": getattr(model.config, "hidden_size", None),
            "cpu_threads": threads, "cpu": cpu, "gpu": None}


def _gpu_rows(model, batch_sizes: Sequence[int], seq_len: int, warmup: int, repeats: int,
              tick) -> dict:
    device = torch.device("cuda")
    # What a GPU serves: bf16 weights where the card has bf16, else fp16.
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    model.to(device, dtype=dtype)
    rows = [_ticked(tick, time_forward(model, model.config.vocab_size, b,
                                       _seq_len(model, seq_len), warmup, repeats, device))
            for b in batch_sizes]
    model.to("cpu")
    return {"gpu": rows, "gpu_name": torch.cuda.get_device_name(device),
            "gpu_dtype": str(dtype).removeprefix("torch.")}


def _ticked(tick, row: dict) -> dict:
    tick(1)
    return row


def latency_at(measured: dict, where: str, batch: int) -> Optional[float]:
    rows = measured.get(where) or []
    return next((r["median_ms"] for r in rows if r["batch"] == batch), None)


def onnx_latency(model_dir: Path, batch_sizes: Sequence[int], seq_len: int, *,
                 warmup: int = 3, repeats: int = 10, threads: Optional[int] = None,
                 onnx_dir: Optional[Path] = None, int8: bool = True) -> dict:
    """ONNX Runtime (CPU) latency rows of the folder's bare encoder, like ``measure``'s:
    ``{"ort": [...], "ort_int8": [...]}``. Uses ``model_dir/onnx/model.onnx`` (and
    ``model_int8.onnx``) when `distill export --onnx` wrote them, else exports into
    ``onnx_dir``. ``threads``: ORT intra-op threads (the PyTorch rows' count, to compare)."""
    import json

    from distill_common.onnx_export import export_encoder, ort_feed, ort_session

    model_dir = Path(model_dir)
    files = {"ort": model_dir / "onnx" / "model.onnx",
             "ort_int8": model_dir / "onnx" / "model_int8.onnx"}
    if not files["ort"].is_file() or (int8 and not files["ort_int8"].is_file()):
        if onnx_dir is None:
            raise ValueError(f"{model_dir}: no onnx/model.onnx; give onnx_dir to export to")
        exported = export_encoder(model_dir, Path(onnx_dir), int8=int8)
        files = dict(zip(("ort", "ort_int8"), exported))
    config = json.loads((model_dir / "config.json").read_text())
    seq_len = min(seq_len, config.get("max_position_embeddings", seq_len + 2) - 2)
    out = {}
    for key, path in files.items():
        if key == "ort_int8" and not int8:
            continue
        session = ort_session(path, threads)
        rows = []
        for batch in batch_sizes:
            feed = ort_feed(session, _inputs(config["vocab_size"], batch, seq_len, "cpu"))
            rows.append(_latency_row(batch, seq_len, _timed(lambda: session.run(None, feed),
                                                            warmup, repeats)))
        out[key] = rows
    return out
