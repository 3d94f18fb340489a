"""Throughput of `distill pretrain` against a bare PyTorch loop doing the same work.

One process, same run, two settings:

* ``--shape demo`` (the default on CPU): teacher = the offline minilm_l6 (BertModel 6 x
  384, no MLM head), student = 3 x 384 initialised from teacher layers, MiniLMv2 Q-K-V
  relations (R=48) plus the student's MLM loss, fp32, micro-batch 16 x 128 tokens, shards
  of Wikipedia summaries written here.
* ``--shape real`` (the default on a GPU): a BERT-base-shaped teacher (12 x 768, random
  weights: speed does not depend on them) and a 6 x 384 student, the same objective,
  bf16, ZeRO-2, micro-batch 256 x 128, synthetic shards (bench/synthetic.py): needs no
  download, so it runs on a GPU machine without network.

* `distill pretrain`: the real trainer (DeepSpeed engine, shard streaming with loader
  workers and on-the-fly masking, the per-step flags all-reduce, metrics); samples/s from
  its metrics.jsonl after the first logging interval (which includes start-up).
* bare loop: the same teacher forward, student + objective forward/backward (autocast
  bf16 on a GPU), gradient clipping and a torch AdamW step on batches already masked and
  in memory; no DeepSpeed, no loader, no logging.

Phases run bare -> trainer -> bare (the bare figure is over both) so that a drift in the
machine's load does not favour either side. Prints one JSON line: both rates, their ratio
(target >= 0.9), the model FLOPs utilisation of each on a GPU (the whole step: teacher
forward, student forward and backward, the MLM head at the masked rows; target >= 40% of
the card's dense bf16 peak) and peak memory.

Usage: python bench/train_throughput.py [--device auto|cpu|cuda] [--shape demo|real]
       [--steps N] [--batch N] [--seq 128] [--peak-tflops T]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RECIPE = """
name: bench
output_dir: {out}
teacher: {{path: {teacher}}}
student: {student}
objective:
  qkv_relation_kl: {{weight: 1.0, relation_heads: 48}}
  mlm: {{weight: 1.0}}
train:
  data_dir: {shards}
  max_steps: {steps}
  micro_batch_size: {batch}
  zero_stage: 2
  precision: {precision}
  device: {device}
  log_every: 5
  eval_every: 0
  eval_samples: 32
  save_every: 0
  export: false
  tensorboard: false
  num_workers: {workers}
  shuffle_buffer: 256
  lr: 1.0e-4
"""
SHAPES = {
    "demo": {"teacher": "minilm_l6", "student": "{num_layers: 3, init: teacher_layers}"},
    "real": {"student": "{num_layers: 6, hidden_size: 384, num_heads: 12, init: random}"},
}
# Dense bf16 peak by the vendors' datasheets (FLOP/s), for MFU; --peak-tflops overrides.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12}


def write_shards(out: Path, tokenizer, samples_needed: int, seq_len: int) -> Path:
    """Wikipedia summaries packed into CLS ... SEP sequences, contract-1 layout."""
    import synthetic

    from distill_common.corpora import iter_documents

    body, stream, rows = seq_len - 2, [], []
    for doc in iter_documents("wiki_summaries"):
        stream += tokenizer(doc.text, add_special_tokens=False)["input_ids"] + \
            [tokenizer.sep_token_id]
        while len(stream) >= body:
            rows.append(np.array([tokenizer.cls_token_id, *stream[:body],
                                  tokenizer.sep_token_id]))
            stream = stream[body:]
        if len(rows) >= samples_needed + 64:
            break
    return synthetic.write_shards(out, tokenizer, rows[64:], rows[:64], seq_len,
                                  rows_per_shard=256, name="minilm_l6")


def bare_loop(recipe, shards: Path, steps: int, warmup: int, device: torch.device,
              bf16: bool) -> list[float]:
    """samples/s of the same computation without the trainer around it, per timed step."""
    from distill_common import manifest as M
    from distill_pretrain.distill_module import DistillModule
    from distill_pretrain.masking import build_masker
    from distill_pretrain.objective import build_objective
    from distill_pretrain.stream import validation_batches
    from distill_pretrain.student import build_student
    from distill_pretrain.teacher import load_teacher

    cfg = recipe.train
    teacher = load_teacher(recipe.teacher, device=device,
                           dtype=torch.bfloat16 if bf16 else torch.float32)
    student = build_student(recipe.student, teacher, seed=0)
    objective = build_objective(recipe.objective, teacher, student.config)
    module = DistillModule(student, objective).to(device).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=0.01,
                                  fused=device.type == "cuda" or None)
    manifest = M.load_manifest(str(shards))
    masker = build_masker(teacher.tokenizer, manifest)
    batches = validation_batches(M.shard_urls(str(shards), manifest, "train"),
                                 seq_len=manifest["seq_len"], batch_size=cfg.micro_batch_size,
                                 masker=masker, seed=0, max_samples=8 * cfg.micro_batch_size)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates = []
    for step in range(warmup + steps):
        sync()
        start = time.perf_counter()
        batch = batches[step % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            t_out = objective.teacher_forward(teacher, batch["input_ids"],
                                              batch["attention_mask"], batch["labels"])
            out = module(batch["input_ids"], batch["attention_mask"], batch["labels"], t_out)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= warmup:
            rates.append(cfg.micro_batch_size / (time.perf_counter() - start))
    return rates


def step_flops(teacher, student, seq_len: int, masked_fraction: float = 0.15) -> float:
    """FLOPs of one sequence's step: teacher forward, student forward + backward (x3),
    the student's MLM head at the masked rows (x3). Per layer and token, forward: QKV and
    output projections 8h^2, feed-forward 4hi, scores and context 4sh (two matmuls)."""
    def layer(cfg) -> float:
        h, i = cfg.hidden_size, cfg.intermediate_size
        return 8 * h * h + 4 * h * i + 4 * seq_len * h

    t_cfg, s_cfg = teacher, student
    tokens = seq_len
    teacher_fwd = t_cfg.num_hidden_layers * layer(t_cfg) * tokens
    student_fwd = s_cfg.num_hidden_layers * layer(s_cfg) * tokens
    head = 2 * (s_cfg.hidden_size ** 2 + s_cfg.hidden_size * s_cfg.vocab_size) \
        * masked_fraction * tokens
    return teacher_fwd + 3 * (student_fwd + head)


def bf16_peak(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def trainer_rate(recipe) -> float:
    from distill_common.tracking import read_metrics
    from distill_pretrain.train import run_pretrain

    run_pretrain(recipe.pretrain_job())
    records = read_metrics(Path(recipe.train.output_dir) / "metrics.jsonl")
    rates = [r["throughput/samples_per_s"] for r in records
             if "throughput/samples_per_s" in r and r["step"] > recipe.train.log_every]
    return float(np.mean(rates))


def _inputs(args, tmp: Path) -> tuple[str, Path, object]:
    """(teacher path, shards, tokenizer) for the shape."""
    n = args.steps * args.batch * 2
    if args.shape == "demo":
        from transformers import AutoTokenizer

        from distill_common.assets import require

        tokenizer = AutoTokenizer.from_pretrained(require("minilm_l6"))
        return "minilm_l6", write_shards(tmp / "shards", tokenizer, n, args.seq), tokenizer
    import synthetic

    tokenizer = synthetic.wordpiece_tokenizer(tmp / "tokenizer")
    teacher = synthetic.bert_model(tmp / "teacher", tokenizer, layers=12, hidden=768,
                                   heads=12, with_head=False)
    shards = synthetic.write_shards(
        tmp / "shards", tokenizer, synthetic.zipf_rows(n, args.seq, tokenizer),
        synthetic.zipf_rows(64, args.seq, tokenizer, seed=1), args.seq)
    return str(teacher), shards, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--shape", choices=tuple(SHAPES), default=None,
                        help="demo (default on CPU) or real (default on a GPU)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of the GPU (default: from its name)")
    args = parser.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda:
        os.environ.pop("DS_ACCELERATOR", None)
    device = torch.device("cuda" if cuda else "cpu")
    args.shape = args.shape or ("real" if cuda else "demo")
    args.steps = args.steps or (40 if cuda else 25)
    args.batch = args.batch or (256 if cuda else 16)
    precision = "bf16" if cuda else "fp32"
    from distill_common.logs import setup_logging
    from launcher.recipe import load_recipe

    setup_logging()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        teacher, shards, _ = _inputs(args, tmp)
        (tmp / "recipe.yaml").write_text(RECIPE.format(
            out=tmp / "run", shards=shards, steps=args.steps, batch=args.batch,
            teacher=teacher, student=SHAPES[args.shape]["student"], precision=precision,
            device=device.type, workers=2 if cuda else 1))
        recipe = load_recipe(str(tmp / "recipe.yaml"))
        # bare, trainer, bare: the machine's load drifts; the bare rate is the harmonic
        # mean of both bare phases (time-weighted, like the trainer's interval rates).
        half = max(2, (args.steps - 5) // 2)
        bare_rates = bare_loop(recipe, shards, steps=half, warmup=2, device=device, bf16=cuda)
        peak_bare = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ours = trainer_rate(recipe)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        bare_rates += bare_loop(recipe, shards, steps=half, warmup=1, device=device, bf16=cuda)
        bare = len(bare_rates) / sum(1.0 / r for r in bare_rates)
        flops = _flops_per_sequence(recipe, args.seq)
    record = {
        "bench": "train_throughput", "device": device.type, "shape": args.shape,
        "threads": torch.get_num_threads(), "teacher": teacher if args.shape == "demo"
        else "BERT-base shape (12x768, random weights)",
        "student": "3x384" if args.shape == "demo" else "6x384", "seq_len": args.seq,
        "micro_batch": args.batch, "precision": precision, "zero_stage": 2,
        "distill_pretrain_samples_per_s": round(ours, 3),
        "bare_loop_samples_per_s": round(bare, 3),
        "ratio": round(ours / bare, 3), "target_ratio": 0.9,
        "flops_per_sequence": flops,
        "peak_rss_mb_bare_loop": round(peak_bare), "peak_rss_mb_total": round(peak)}
    if cuda:
        name = torch.cuda.get_device_name()
        peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else bf16_peak(name)
        record.update({"gpu": name, "bf16_peak_tflops": peak_flops and peak_flops / 1e12,
                       "gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2 ** 20)})
        if peak_flops:
            record["mfu"] = round(ours * flops / peak_flops, 4)
            record["mfu_bare_loop"] = round(bare * flops / peak_flops, 4)
            record["target_mfu"] = 0.4
    print(json.dumps(record))


def _flops_per_sequence(recipe, seq_len: int) -> float:
    from transformers import AutoConfig

    from distill_common.assets import resolve_model_dir
    from distill_pretrain.architectures import architecture_of
    from distill_pretrain.student import student_hf_config

    teacher = AutoConfig.from_pretrained(resolve_model_dir(recipe.teacher.path))
    student = student_hf_config(recipe.student, teacher, architecture_of(teacher))
    return step_flops(teacher, student, seq_len)


if __name__ == "__main__":
    main()
