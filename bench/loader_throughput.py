"""Can one loader worker feed a GPU? Sequences/s of the training stream in one process.

A 6 x 384 student under a 12 x 768 teacher at 40% MFU on an H100 consumes roughly 10,000
sequences of 128 tokens per second per GPU, so reading, masking (whole words, frequency
smoothing) and collation must reach >= 10,000 sequences/s per loader worker process.

Measured here, in one process and one thread (what one DataLoader worker has):
* ``ours``: distill_pretrain.stream.TrainStream over contract-1 shards (our tar reader,
  .npy decoding, shuffle buffer, batch-vectorised masking and collation), micro-batch 32;
* ``baseline``: the same samples read the common way in the same run: Python's
  ``tarfile`` + ``np.load`` per sample and the masker called once per sequence (what
  the stream did before), so the ratio shows the speed-up on this machine today.

Data: 30,522-id WordPiece vocabulary (~20% ``##`` pieces, as bert-base-uncased), Zipf
token frequencies, 128-token sequences (bench/synthetic.py). Prints one JSON line.

Rates are wall-clock; ``ours_seq_per_cpu_s`` (per CPU-second of the process) is what an
idle core would give when other jobs share the machine.

Usage: python bench/loader_throughput.py [--batches 150] [--batch 32] [--seq 128]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import synthetic  # noqa: E402

TARGET = 10_000


def _stream(shards: Path, tokenizer, batch: int, whole_word: bool, frequency: bool):
    from distill_common import manifest as M
    from distill_pretrain.data import load_token_counts
    from distill_pretrain.masking import build_masker
    from distill_pretrain.stream import TrainStream

    manifest = M.load_manifest(shards)
    counts = load_token_counts(str(shards), manifest) if frequency else None
    masker = build_masker(tokenizer, manifest, whole_word=whole_word, token_counts=counts)
    return TrainStream(M.shard_urls(shards, manifest, "train"),
                       sample_counts=M.shard_sample_counts(manifest, "train"),
                       seq_len=manifest["seq_len"], batch_size=batch, masker=masker, seed=0,
                       shuffle_buffer=1000), masker


def ours(shards: Path, tokenizer, batches: int, batch: int, **kw) -> tuple[float, float]:
    """(sequences per second, per CPU-second of this process)."""
    stream, _ = _stream(shards, tokenizer, batch, **kw)
    it = iter(stream)
    for _ in range(5):
        next(it)
    start, cpu = time.perf_counter(), time.process_time()
    n = sum(next(it)["input_ids"].shape[0] for _ in range(batches))
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def baseline(shards: Path, tokenizer, batches: int, batch: int, **kw) -> float:
    """tarfile + np.load per sample, one masker call per sequence, per-row padding."""
    stream, masker = _stream(shards, tokenizer, batch, **kw)
    rng = np.random.default_rng(0)
    seq_len, n, start = stream.seq_len, 0, time.perf_counter()
    rows = []
    for url in stream.urls:
        with tarfile.open(url) as tar:
            for member in tar:
                ids = np.load(io.BytesIO(tar.extractfile(member).read())).astype(np.int64)
                rows.append(masker(ids, rng))
                if len(rows) == batch:
                    ids_out = torch.full((batch, seq_len), masker.pad_id, dtype=torch.long)
                    labels = torch.full((batch, seq_len), -100, dtype=torch.long)
                    for i, (masked, lab) in enumerate(rows):
                        ids_out[i, :len(masked)] = torch.from_numpy(masked)
                        labels[i, :len(lab)] = torch.from_numpy(lab)
                    n += batch
                    rows = []
                    if n >= batches * batch:
                        return n / (time.perf_counter() - start)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    figures = {}
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        tmp = Path(tmp)
        tokenizer = synthetic.wordpiece_tokenizer(tmp / "tokenizer")
        n = (args.batches + 10) * args.batch
        shards = synthetic.write_shards(
            tmp / "shards", tokenizer, synthetic.zipf_rows(n, args.seq, tokenizer),
            synthetic.zipf_rows(64, args.seq, tokenizer, seed=1), args.seq)
        for name, kw in (("token", {"whole_word": False, "frequency": False}),
                         ("whole_word", {"whole_word": True, "frequency": False}),
                         ("whole_word_frequency", {"whole_word": True, "frequency": True})):
            base = baseline(shards, tokenizer, args.batches // 3, args.batch, **kw)
            mine, per_cpu = ours(shards, tokenizer, args.batches, args.batch, **kw)
            figures[name] = {"ours_seq_per_s": round(mine), "ours_seq_per_cpu_s": round(per_cpu),
                             "baseline_seq_per_s": round(base), "ratio": round(mine / base, 2)}
    worst = min(f["ours_seq_per_s"] for f in figures.values())
    synthetic.dump({"bench": "loader_throughput", "threads": 1, "seq_len": args.seq,
                    "micro_batch": args.batch, **figures, "slowest_seq_per_s": worst,
                    "target_seq_per_s_per_worker": TARGET, "meets_target": worst >= TARGET})


if __name__ == "__main__":
    main()
