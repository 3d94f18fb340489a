"""Benchmark: fine-tune the real MiniLM-L6 teacher on BBC News, then compare it with a
3-layer student cut from it (embeddings + teacher layers 0, 2, 4; no distillation) in
`distill report`. Prints one JSON line: accuracies, retention, size and latency ratios.

    .venv/bin/python bench/finetune_report.py [--out DIR] [--seeds 0] [--epochs 3]

Needs `distill assets fetch minilm_l6 bbc_news`. Takes ~5-8 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEACHER_LAYERS_FOR_STUDENT = [0, 2, 4]


def cut_student(teacher_dir: Path, out: Path, layers: list[int]) -> Path:
    """A BertModel with the teacher's embeddings and the listed teacher layers."""
    import copy

    from transformers import AutoModel, AutoTokenizer

    teacher = AutoModel.from_pretrained(teacher_dir)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    student = type(teacher)(config, add_pooling_layer=False)
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith("encoder.layer."):
            index = int(key.split(".")[2])
            if index not in layers:
                continue
            key = key.replace(f"encoder.layer.{index}.", f"encoder.layer.{layers.index(index)}.", 1)
        state[key] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    assert not [k for k in missing if not k.startswith("pooler")], missing
    student.save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/finetune_report")
    parser.add_argument("--seeds", default="0", help="comma-separated fine-tuning seeds")
    parser.add_argument("--epochs", type=int, default=None, help="default: the task recipe's")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for fine-tuning and latency (default: torch's)")
    parser.add_argument("--skip-student-finetune", action="store_true")
    args = parser.parse_args()
    from distill_common.logs import setup_logging

    setup_logging()

    import torch

    from distill_common.assets import require
    from distill_common.config import load_config
    from finetune import build_report, run_task
    from finetune.config import FinetuneConfig, ReportConfig

    out = Path(args.out)
    teacher_dir = require("minilm_l6")
    student_dir = cut_student(teacher_dir, out / "student_L3", TEACHER_LAYERS_FOR_STUDENT)
    overrides = [f"seeds=[{args.seeds}]", "save_model=none"] + \
        ([f"epochs={args.epochs}"] if args.epochs else []) + \
        ([f"num_threads={args.threads}"] if args.threads else [])
    ft_cfg = load_config(FinetuneConfig, None, overrides)
    started = time.perf_counter()
    results = {"teacher": {"bbc_news": run_task(teacher_dir, "bbc_news",
                                                out / "finetune" / "teacher", ft_cfg)}}
    teacher_seconds = time.perf_counter() - started
    if not args.skip_student_finetune:
        results["student_L3"] = {"bbc_news": run_task(student_dir, "bbc_news",
                                                      out / "finetune" / "student_L3", ft_cfg)}
    started = time.perf_counter()
    report = build_report({"teacher": teacher_dir, "student_L3": student_dir}, results,
                          out / "report", "teacher", ReportConfig(threads=args.threads))
    report_seconds = time.perf_counter() - started
    t, s = report["models"]["teacher"], report["models"]["student_L3"]
    tr = results["teacher"]["bbc_news"]
    line = {
        "bench": "finetune_report", "task": "bbc_news", "device": "cpu",
        "cpu_threads": report["latency"]["cpu_threads"], "torch_threads": torch.get_num_threads(),
        "precision": tr["precision"], "seeds": tr["hparams"]["seeds"],
        "epochs": tr["hparams"]["epochs"], "split_sizes": tr["sizes"],
        "teacher_accuracy": round(tr["score"], 4),
        "teacher_macro_f1": round(tr["mean"]["macro_f1"], 4),
        "teacher_finetune_seconds": round(teacher_seconds, 1),
        "student_L3_accuracy": (round(results["student_L3"]["bbc_news"]["score"], 4)
                                if "student_L3" in results else None),
        "student_L3_retention_pct": s["tasks"].get("bbc_news", {}).get("retention_pct"),
        "teacher_params_M": round(t["parameters"] / 1e6, 2),
        "student_params_M": round(s["parameters"] / 1e6, 2),
        "size_ratio": round(t["size_bytes"] / s["size_bytes"], 2),
        "cpu_ms_b1": {"teacher": t["cpu"][0]["median_ms"], "student": s["cpu"][0]["median_ms"]},
        "cpu_ms_b32": {"teacher": t["cpu"][-1]["median_ms"],
                       "student": s["cpu"][-1]["median_ms"]},
        "latency_ratio_cpu_b1": s["speedup"]["cpu_b1"],
        "latency_ratio_cpu_b32": s["speedup"]["cpu_b32"],
        "report_seconds": round(report_seconds, 1),
        "report": str(out / "report" / "report.md"),
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
