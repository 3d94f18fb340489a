"""Size and speed of an encoder folder: parameters, bytes on disk, forward latency.

Latency is of the bare encoder (``AutoModel``: what every task head sits on) on
full-length sequences of random in-vocabulary ids, median over timed runs after
warm-up, at a fixed thread count so that models are compared like for like.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

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


@torch.inference_mode()
def time_forward(model, vocab_size: int, batch: int, seq_len: int, warmup: int,
                 repeats: int, device: torch.device) -> dict:
    """Median and spread (ms) of ``repeats`` forward passes after ``warmup`` untimed ones,
    in the model's own dtype (bf16 weights are served as bf16, not autocast over fp32)."""
    inputs = _inputs(vocab_size, batch, seq_len, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        model(**inputs)
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    median = statistics.median(times)
    return {"batch": batch, "seq_len": seq_len, "median_ms": round(median, 3),
            "min_ms": round(min(times), 3), "max_ms": round(max(times), 3),
            "throughput_seq_per_s": round(batch / (median / 1000), 2)}


def measure(model_dir: Path, batch_sizes: Sequence[int], seq_len: int, warmup: int,
            repeats: int, threads: int, gpu: bool) -> dict:
    """Parameters, size on disk and latency rows for one model folder."""
    model = load_encoder(model_dir)
    vocab = model.config.vocab_size
    seq_len = min(seq_len, getattr(model.config, "max_position_embeddings", seq_len) - 2)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu = [time_forward(model, vocab, b, seq_len, warmup, repeats, torch.device("cpu"))
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
        out["gpu"] = [time_forward(model, vocab, b, seq_len, warmup, repeats, device)
                      for b in batch_sizes]
        out["gpu_name"] = torch.cuda.get_device_name(device)
        out["gpu_dtype"] = str(dtype).removeprefix("torch.")
        model.to("cpu")
    del model
    return out


def latency_at(measured: dict, where: str, batch: int) -> Optional[float]:
    rows = measured.get(where) or []
    return next((r["median_ms"] for r in rows if r["batch"] == batch), None)
