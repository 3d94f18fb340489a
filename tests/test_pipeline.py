"""`distill run`: the whole chain on tiny models, end to end and resumable.

prep -> pretrain -> export -> finetune -> report on the tiny teacher and corpus; a rerun
skips every stage; a changed config is refused naming the changed key; the evaluation
text of the fine-tuning task never reaches the shards; a run killed during pretraining
resumes from its checkpoint when the same command is run again.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import WORDS


def write_task(folder: Path) -> Path:
    """A separable 2-class task: sentences about rivers vs about music."""
    rng = random.Random(0)
    rows = []
    for i in range(80):
        label = "water" if i % 2 else "music"
        topic = ["river", "water", "north", "south"] if label == "water" else \
            ["music", "film", "book", "game"]
        words = [rng.choice(topic) for _ in range(4)] + [rng.choice(WORDS) for _ in range(4)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + f" {i}", "label": label})
    data = folder / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = folder / "tiny_task.yaml"
    task.write_text(yaml.safe_dump({
        "name": "tiny_task", "type": "classification",
        "source": {"path": str(data)}, "columns": {"text": "text", "label": "label"},
        "split": {"validation": 0.2, "test": 0.2, "seed": 0}, "metric": "accuracy",
        "train": {"epochs": 3, "batch_size": 8, "learning_rate": 1e-3, "max_length": 32}}))
    return task


def write_recipe(folder: Path, teacher: Path, corpus: Path, task: Path,
                 max_steps: int = 6) -> Path:
    recipe = {
        "name": "pipe", "output_dir": str(folder / "run"), "seed": 0,
        "teacher": {"path": str(teacher)},
        "student": {"num_layers": 2},
        "objective": {"hidden_cosine": {"weight": 1.0}, "mlm": {"weight": 1.0}},
        # The task's own file is a source too: its evaluation rows must be held out.
        "prep": {"sources": [str(corpus), str(task.parent / "task.jsonl")], "seq_len": 32,
                 "doc_split": "blank_line", "validation_fraction": 0.1,
                 "docs_per_shard": 50, "workers": 0},
        "train": {"max_steps": max_steps, "micro_batch_size": 4, "zero_stage": 0,
                  "precision": "fp32", "device": "cpu", "num_workers": 0, "log_every": 1,
                  "eval_every": 3, "save_every": 2, "eval_samples": 16,
                  "tensorboard": False},
        "finetune": {"tasks": [str(task)], "seeds": [0], "num_threads": 1},
        "report": {"latency_batch_sizes": [1], "latency_repeats": 2, "latency_warmup": 1,
                   "threads": 1},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def distill(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "distill_cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture
def pipeline_recipe(tmp_path, tiny_teacher_dir, tiny_corpus_dir):
    task = write_task(tmp_path)
    return write_recipe(tmp_path, tiny_teacher_dir, tiny_corpus_dir, task)


@pytest.mark.slow
def test_run_whole_chain_then_rerun_skips_everything(pipeline_recipe, tmp_path):
    run_dir = tmp_path / "run"
    proc = distill("run", str(pipeline_recipe))
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Every stage left its output and a fingerprint record.
    assert (run_dir / "shards" / "manifest.json").is_file()
    assert list((run_dir / "pretrain" / "checkpoints").glob("step-*"))
    assert (run_dir / "student" / "model.safetensors").is_file()
    assert (run_dir / "finetune" / "results.json").is_file()
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "student"}
    assert (run_dir / "report" / "score_vs_size.png").is_file()
    assert "| teacher |" in proc.stdout.replace("**", "")  # report table printed
    for stage in ("prep", "pretrain", "export", "finetune", "report"):
        record = json.loads((run_dir / ".pipeline" / f"{stage}.json").read_text())
        assert record["stage"] == stage and len(record["fingerprint"]) == 16

    # The fine-tuning task's validation and test rows were kept out of the shards.
    lines = (run_dir / "holdout.txt").read_text().splitlines()
    holdout = [h for h in lines if h.strip() and not h.startswith("#")]
    assert len(holdout) == 32  # 40% of 80 rows
    manifest = json.loads((run_dir / "shards" / "manifest.json").read_text())
    assert manifest["dropped"].get("holdout") == 32

    # Second run: nothing to do.
    t0 = time.perf_counter()
    again = distill("run", str(pipeline_recipe))
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("prep", "pretrain", "export", "finetune", "report"):
        assert f"{stage}: up to date" in again.stderr, stage
    assert time.perf_counter() - t0 < 120

    # A changed training knob: refused, naming it, nothing overwritten.
    changed = distill("run", str(pipeline_recipe), "train.lr=0.01")
    assert changed.returncode == 2
    assert "train.lr" in changed.stderr and "--force pretrain" in changed.stderr
    # Dry run says what would happen, runs nothing.
    dry = distill("run", str(pipeline_recipe), "--dry-run", "--force", "report")
    assert dry.returncode == 0 and "report: would run" in dry.stdout


@pytest.mark.slow
def test_run_killed_during_pretrain_resumes(pipeline_recipe, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "distill_cli", "run", str(pipeline_recipe),
           "train.max_steps=40", "--stages", "prep,pretrain"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        ckpts = run_dir / "pretrain" / "checkpoints"
        while time.time() < deadline and not list(ckpts.glob("step-*/complete.json")):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.5)
        assert list(ckpts.glob("step-*/complete.json")), "no checkpoint within 300 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job, pretrain subprocess included
        proc.wait()
    assert not (run_dir / ".pipeline" / "pretrain.json").exists()
    resumed = distill("run", str(pipeline_recipe), "train.max_steps=40", "--stages",
                      "prep,pretrain")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "prep: up to date" in resumed.stderr
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert (run_dir / ".pipeline" / "pretrain.json").is_file()


def test_unknown_stage_and_cluster_profile_errors(pipeline_recipe, capsys):
    from distill_cli.main import main

    assert main(["run", str(pipeline_recipe), "--stages", "prep,bake"]) == 2
    assert "unknown stage(s) ['bake']" in capsys.readouterr().err
    assert main(["run", str(pipeline_recipe), "--cluster", "slurm/cpu", "--stages",
                 "pretrain"]) == 2
    err = capsys.readouterr().err
    assert "distill launch" in err and "--stage all" in err
