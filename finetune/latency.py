"""Size and speed of an encoder folder: parameters, bytes on disk, forward latency.

Latency is of the bare encoder (``AutoModel``: what every task head sits on) on
full-length sequences of random in-vocabulary ids, median over timed runs after
warm-up, at a fixed thread count so that models are compared like for like.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

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
    """Parameters, size on disk and latency rows for one model folder; ``progress``
    (distill_common.progress.Progress) moves one unit per latency row."""
    tick = progress.update if progress is not None else (lambda n=1: None)
    model = load_encoder(model_dir)
    vocab = model.config.vocab_size
    seq_len = min(seq_len, getattr(model.config, "max_position_embeddings", seq_len) - 2)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu = [_ticked(tick, time_forward(model, vocab, b, seq_len, warmup, repeats,
                                          torch.device("cpu")))
               for b in batch_sizes]
    finally:
        torch.set_num_threads(previous)
    out = {"parameters": count_parameters(model), "size_bytes": weights_bytes(model_dir),
           "architecture": (model.config.architectures or [type(model).__name__])[0],
           "layers": getattr(model.config, "num_hidden_layers", None),
           "hidden": getattr(model.config, "hidden_size", None),
           "cpu_threads": threads, "cpu": cpu, "gpu": None}
    if gpu:
        device = torch.device("cuda")
        # What a GPU serves: bf16 weights where the card has bf16, else fp16.
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        model.to(device, dtype=dtype)
        out["gpu"] = [_ticked(tick, time_forward(model, vocab, b, seq_len, warmup, repeats,
                                                 device))
                      for b in batch_sizes]
        out["gpu_name"] = torch.cuda.get_device_name(device)
        out["gpu_dtype"] = str(dtype).removeprefix("torch.")
        model.to("cpu")
    del model
    return out


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
