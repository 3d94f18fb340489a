"""The Hugging Face round trip, offline, end to end: a recipe whose teacher is a Hub id
(`teacher.path: org/name`) and whose task is a Hub dataset, both resolved from a
Hub-layout cache built here (HF_HOME, HF_HUB_OFFLINE=1), run by `distill run`. The student
loads with AutoModel, AutoModelForMaskedLM (its MLM head was trained) and
SentenceTransformer, has its ONNX file and a model card under 10 KB; the report's plots
carry error bars and the distillation curves, and report.json holds the data behind them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import conftest
from export_fixtures import save_st_teacher
from test_finetune_sources import write_hub_dataset
from test_hub import hf_home, populate_hub_cache  # noqa: F401  (fixture)

TEACHER = "tiny-org/all-MiniLM-tiny"
DATASET = "tiny-org/topics"


def write_recipe(folder: Path, corpus: Path) -> Path:
    task = folder / "hub_topics.yaml"
    task.write_text(yaml.safe_dump({
        "name": "hub_topics", "source": {"hub": DATASET, "splits": {
            "train": "train", "validation": "dev", "test": "test"}},
        "columns": {"text": "sentence", "label": "topic"},
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-3, "max_length": 32}}))
    recipe = {
        "name": "hub", "output_dir": str(folder / "run"), "seed": 0,
        "teacher": {"path": TEACHER},
        "student": {"num_layers": 2, "init": "teacher_layers", "attention_dropout": 0.0},
        "objective": {"qkv_relation_kl": {"weight": 1.0, "relation_heads": 16},
                      "hidden_cosine": {"weight": 1.0}, "mlm": {"weight": 0.5}},
        "prep": {"sources": [str(corpus)], "seq_len": 32, "doc_split": "blank_line",
                 "validation_fraction": 0.1, "docs_per_shard": 50, "workers": 0},
        "train": {"max_steps": 6, "micro_batch_size": 4, "zero_stage": 0,
                  "precision": "fp32", "device": "cpu", "num_workers": 0, "log_every": 1,
                  "eval_every": 3, "save_every": 3, "eval_samples": 16,
                  "export_onnx": True},
        "finetune": {"tasks": [str(task)], "seeds": [0, 1], "num_threads": 1},
        "report": {"latency_batch_sizes": [1], "latency_repeats": 2, "latency_warmup": 1,
                   "threads": 1, "bootstrap_draws": 500},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.slow
def test_hub_teacher_and_dataset_through_the_whole_chain(tmp_path, hf_home, tokenizer_dir,
                                                         tiny_corpus_dir):
    from huggingface_hub import ModelCard
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoModelForMaskedLM

    pytest.importorskip("onnxscript", reason="the onnx extra (pip install '.[onnx]')")
    teacher = save_st_teacher(tmp_path / "st_teacher", tokenizer_dir, legacy=False)
    populate_hub_cache(hf_home / "hub", TEACHER, teacher)
    populate_hub_cache(hf_home / "hub", DATASET, write_hub_dataset(tmp_path / "dataset"),
                       repo_type="dataset")
    recipe = write_recipe(tmp_path, tiny_corpus_dir)
    proc = subprocess.run([sys.executable, "-m", "distill_cli", "run", str(recipe)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    run = tmp_path / "run"
    student = run / "student"

    AutoModel.from_pretrained(student)
    _, info = AutoModelForMaskedLM.from_pretrained(student, output_loading_info=True)
    assert not info["missing_keys"], info  # the trained MLM head is in the folder
    texts = conftest.sentences(3, seed=4)
    embeddings = SentenceTransformer(str(student), device="cpu").encode(
        texts, convert_to_tensor=True)
    assert embeddings.shape == (3, 64)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert (student / "onnx" / "model.onnx").is_file()
    card = student / "README.md"
    assert card.stat().st_size < 10_000
    assert ModelCard.load(card).data.base_model == TEACHER

    report_dir = run / "report"
    report = json.loads((report_dir / "report.json").read_text())
    for name in ("teacher", "student"):
        entry = report["models"][name]["tasks"]["hub_topics"]
        low, high = entry["ci95"]
        assert low <= entry["score"] <= high  # the error bar around each point
    gap = report["models"]["student"]["tasks"]["hub_topics"]["vs_teacher"]
    assert gap["ci95"][0] <= gap["diff"] <= gap["ci95"][1]
    series = report["distillation"]["student"]["series"]
    assert {"train/total", "train/part/mlm", "train/part/hidden_cosine",
            "eval/mlm_accuracy", "eval/agreement"} <= set(series)
    assert any(tag.startswith("train/part/") and "relation" in tag for tag in series)
    assert len(series["train/total"]) == 6 and [s for s, _ in series["eval/agreement"]] == [3, 6]
    for png in ("score_vs_size.png", "score_vs_latency.png", "distillation_student.png"):
        assert png in report["plots"]
        assert (report_dir / png).read_bytes()[:4] == b"\x89PNG"
    md = (report_dir / "report.md").read_text()
    assert "## Distillation" in md and "size (MiB)" in md

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "pretrain" / "tensorboard"))
    events.Reload()
    assert "config/text_summary" in events.Tags()["tensors"]  # the resolved recipe
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    seed_events = run / "finetune" / "student" / "hub_topics" / "seed-1" / "tensorboard"
    assert any(seed_events.iterdir())
