"""Throughput of `distill pretrain` against a bare PyTorch loop doing the same work.

One process, same run: teacher = the offline minilm_l6 (BertModel 6 x 384, no MLM head),
student = 3 x 384 initialised from teacher layers, MiniLMv2 Q-K-V relations (R=48) plus the
student's MLM loss, micro-batch 16 x 128 tokens.

* `distill pretrain`: the real trainer (DeepSpeed ZeRO-2 engine, shard streaming with a
  loader worker and on-the-fly masking, finite-loss all-reduce, metrics), on shards of
  Wikipedia summaries written here in the contract-1 format. samples/s is read from its
  metrics.jsonl after the first logging interval (which includes start-up).
* bare loop: the same teacher forward, student + objective forward/backward, gradient
  clipping and torch AdamW step on batches already masked and in memory; no DeepSpeed,
  no loader, no logging.

Phases run bare -> trainer -> bare (the bare figure is over both) so that a drift in the
machine's load does not favour either side. Prints one JSON line: both rates, their ratio
(target >= 0.9) and peak host memory.
GPU variant (bf16, NCCL, MFU) not measured here: no GPU on this machine.

Usage: python bench/train_throughput.py [--steps 25] [--batch 16] [--seq 128]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RECIPE = """
name: bench
output_dir: {out}
teacher: {{path: minilm_l6}}
student: {{num_layers: 3, init: teacher_layers}}
objective:
  qkv_relation_kl: {{weight: 1.0, relation_heads: 48}}
  mlm: {{weight: 1.0}}
train:
  data_dir: {shards}
  max_steps: {steps}
  micro_batch_size: {batch}
  zero_stage: 2
  precision: fp32
  log_every: 5
  eval_every: 0
  eval_samples: 32
  save_every: 0
  export: false
  tensorboard: false
  num_workers: 1
  shuffle_buffer: 256
  lr: 1.0e-4
"""


def _npy(ids: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, ids, allow_pickle=False)
    return buf.getvalue()


def write_shards(out: Path, tokenizer, samples_needed: int, seq_len: int) -> Path:
    """Wikipedia summaries packed into CLS ... SEP sequences, contract-1 layout."""
    from distill_common.corpora import iter_documents
    from distill_common.fsio import atomic_write_json, sha256_file
    from distill_common.textnorm import vocab_hash

    body, stream, rows = seq_len - 2, [], []
    for doc in iter_documents("wiki_summaries"):
        stream += tokenizer(doc.text, add_special_tokens=False)["input_ids"] + \
            [tokenizer.sep_token_id]
        while len(stream) >= body:
            rows.append([tokenizer.cls_token_id, *stream[:body], tokenizer.sep_token_id])
            stream = stream[body:]
        if len(rows) >= samples_needed + 64:
            break
    splits, counts = {}, np.zeros(len(tokenizer), dtype=np.int64)
    for split, part in (("train", rows[64:]), ("validation", rows[:64])):
        (out / split).mkdir(parents=True, exist_ok=True)
        shards = []
        for shard, start in enumerate(range(0, len(part), 256)):
            rel = f"{split}/shard-{shard:06d}.tar"
            chunk = part[start:start + 256]
            with tarfile.open(out / rel, "w") as tar:
                for i, row in enumerate(chunk):
                    ids = np.array(row, dtype=np.uint16)
                    if split == "train":
                        np.add.at(counts, ids.astype(np.int64), 1)
                    data = _npy(ids)
                    info = tarfile.TarInfo(f"{shard:06d}-{i:07d}.input_ids.npy")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            shards.append({"file": rel, "samples": len(chunk), "tokens": len(chunk) * seq_len,
                           "sha256": sha256_file(out / rel)})
        splits[split] = {"samples": len(part), "tokens": len(part) * seq_len, "shards": shards}
    np.save(out / "token_counts.npy", counts)
    special = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id,
               "pad": tokenizer.pad_token_id, "mask": tokenizer.mask_token_id,
               "unk": tokenizer.unk_token_id}
    atomic_write_json(out / "manifest.json", {
        "format_version": 1,
        "tokenizer": {"name_or_path": "minilm_l6", "vocab_hash": vocab_hash(tokenizer),
                      "vocab_size": len(tokenizer), "class": type(tokenizer).__name__,
                      "special_ids": special},
        "seq_len": seq_len, "dtype": "uint16", "splits": splits,
        "token_counts": {"file": "token_counts.npy",
                         "sha256": sha256_file(out / "token_counts.npy")},
        "sources": ["wiki_summaries"], "dropped": {}, "documents": {}, "config": {}})
    return out


def bare_loop(recipe, shards: Path, steps: int, warmup: int) -> list[float]:
    """samples/s of the same computation without the trainer around it, per timed step."""
    from distill_common import manifest as M
    from distill_pretrain.distill_module import DistillModule
    from distill_pretrain.masking import build_masker
    from distill_pretrain.objective import build_objective
    from distill_pretrain.stream import validation_batches
    from distill_pretrain.student import build_student
    from distill_pretrain.teacher import load_teacher

    cfg = recipe.train
    teacher = load_teacher(recipe.teacher, dtype=torch.float32)
    student = build_student(recipe.student, teacher, seed=0)
    objective = build_objective(recipe.objective, teacher, student.config)
    module = DistillModule(student, objective).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=0.01)
    manifest = M.load_manifest(str(shards))
    masker = build_masker(teacher.tokenizer, manifest)
    batches = validation_batches(M.shard_urls(str(shards), manifest, "train"),
                                 seq_len=manifest["seq_len"], batch_size=cfg.micro_batch_size,
                                 masker=masker, seed=0, max_samples=8 * cfg.micro_batch_size)
    rates = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        batch = batches[step % len(batches)]
        t_out = objective.teacher_forward(teacher, batch["input_ids"], batch["attention_mask"],
                                          batch["labels"])
        out = module(batch["input_ids"], batch["attention_mask"], batch["labels"], t_out)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            rates.append(cfg.micro_batch_size / (time.perf_counter() - start))
    return rates


def trainer_rate(recipe) -> float:
    from distill_common.tracking import read_metrics
    from distill_pretrain.train import run_pretrain

    run_pretrain(recipe.pretrain_job())
    records = read_metrics(Path(recipe.train.output_dir) / "metrics.jsonl")
    rates = [r["throughput/samples_per_s"] for r in records
             if "throughput/samples_per_s" in r and r["step"] > recipe.train.log_every]
    return float(np.mean(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from distill_common.assets import require
    from distill_common.logs import setup_logging
    from launcher.recipe import load_recipe

    setup_logging()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        tokenizer = AutoTokenizer.from_pretrained(require("minilm_l6"))
        shards = write_shards(tmp / "shards", tokenizer, args.steps * args.batch * 2, args.seq)
        (tmp / "recipe.yaml").write_text(RECIPE.format(out=tmp / "run", shards=shards,
                                                       steps=args.steps, batch=args.batch))
        recipe = load_recipe(str(tmp / "recipe.yaml"))
        # bare, trainer, bare: the machine's load drifts; the bare rate is the harmonic
        # mean of both bare phases (time-weighted, like the trainer's interval rates).
        half = max(2, (args.steps - args.batch // 8) // 2)
        bare_rates = bare_loop(recipe, shards, steps=half, warmup=2)
        peak_bare = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ours = trainer_rate(recipe)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        bare_rates += bare_loop(recipe, shards, steps=half, warmup=1)
        bare = len(bare_rates) / sum(1.0 / r for r in bare_rates)
    print(json.dumps({
        "bench": "train_throughput", "device": "cpu", "threads": torch.get_num_threads(),
        "teacher": "minilm_l6 (6x384)", "student": "3x384", "seq_len": args.seq,
        "micro_batch": args.batch, "precision": "fp32", "zero_stage": 2,
        "distill_pretrain_samples_per_s": round(ours, 3),
        "bare_loop_samples_per_s": round(bare, 3),
        "ratio": round(ours / bare, 3), "target_ratio": 0.9,
        "peak_rss_mb_bare_loop": round(peak_bare), "peak_rss_mb_total": round(peak),
        "gpu": "not measured (no GPU on this machine)"}))


if __name__ == "__main__":
    main()
