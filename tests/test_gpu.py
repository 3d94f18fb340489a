"""The GPU path, on one CUDA GPU: bf16 pretraining under ZeRO-2 and ZeRO-3 with a
DistilBERT-style (logit + MLM) and a MiniLMv2-style objective, resume with the CUDA RNG,
the NaN skip, NCCL's device rules in a world of one (collectives forced), fine-tuning on
CUDA, latency with bf16 weights. Tiny models; every test is marked ``gpu`` and skipped
with a reason where no GPU is visible (conftest.py). bench/gpu_check.sh runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import conftest
from test_data_loader import save_wordpiece_tokenizer, write_shards
from test_train import DISTILBERT_STYLE, curve, write_recipe

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parent.parent
MINILMV2_STYLE = ["  qkv_relation_kl: {weight: 1.0, relation_heads: 4}", "  mlm: {weight: 0.1}"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu_assets")
    tok = save_wordpiece_tokenizer(root / "tokenizer")
    teacher = conftest._save_tiny_bert(root / "teacher", tok, with_head=True)
    shards = write_shards(root / "shards", tok, seq_len=32, train_shards=4,
                          samples_per_shard=48, validation_samples=20)
    return {"tokenizer": tok, "teacher": teacher, "shards": shards}


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DS_ACCELERATOR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
               DISTILL_FORCE_COLLECTIVES="1", **extra)  # NCCL's rules even alone
    return env


def _pretrain(recipe: Path, *overrides: str, timeout: float = 300, **env):
    return subprocess.run([sys.executable, "-m", "distill_cli", "pretrain", str(recipe),
                           "train.device=cuda", "train.precision=bf16", "train.tensorboard=false",
                           *overrides], cwd=REPO, env=_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("zero_stage", [2, 3])
@pytest.mark.parametrize("style", ["distilbert", "minilmv2"])
def test_bf16_pretraining_on_the_gpu(tmp_path, assets, zero_stage, style):
    objective = DISTILBERT_STYLE if style == "distilbert" else MINILMV2_STYLE
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", assets, out, objective=objective,
                          init="teacher_layers" if style == "distilbert" else "random")
    _ok(_pretrain(recipe, f"train.zero_stage={zero_stage}"))
    losses = curve(out)
    assert sorted(losses) == list(range(1, 17))
    assert sum(losses[s] for s in (14, 15, 16)) < 0.97 * sum(losses[s] for s in (1, 2, 3))
    assert curve(out, "memory/gpu_peak_mb")[16] > 0
    assert all(v > 0 for v in curve(out, "time/student_ms").values())  # CUDA events
    info = json.loads((out / "student" / "distill_run.json").read_text())
    assert info["precision"] == "bf16"
    from transformers import AutoModelForMaskedLM

    AutoModelForMaskedLM.from_pretrained(out / "student")


def test_sigterm_and_resume_on_the_gpu_match_an_uninterrupted_run(tmp_path, assets):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    recipe_ref = write_recipe(tmp_path / "ref.yaml", assets, ref, save_every=4)
    _ok(_pretrain(recipe_ref))
    recipe = write_recipe(tmp_path / "cut.yaml", assets, cut, save_every=4)
    cmd = [sys.executable, "-m", "distill_cli", "pretrain", str(recipe), "train.device=cuda",
           "train.precision=bf16", "train.tensorboard=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stderr=subprocess.PIPE, text=True)
    metrics = cut / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 6:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    assert proc.wait(timeout=120) == 143, proc.stderr.read()[-3000:]
    saved = sorted((cut / "pretrain" / "checkpoints").glob("step-*"))[-1]
    import torch

    assert "cuda" in torch.load(saved / "rank-00000.pt", weights_only=True)["rng"]
    _ok(_pretrain(recipe))
    want, got = curve(ref), curve(cut)
    assert sorted(got) == list(range(1, 17))
    for step in range(1, 17):
        assert got[step] == pytest.approx(want[step], rel=1e-3), step


def test_a_nan_step_is_skipped_on_the_gpu(tmp_path, assets):
    out = tmp_path / "nan"
    recipe = write_recipe(tmp_path / "recipe.yaml", assets, out, max_steps=6, eval_every=0,
                          save_every=0, export=False)
    proc = _pretrain(recipe, DISTILL_TEST_NAN_LOSS="0:3")
    _ok(proc)
    assert "step skipped" in proc.stderr
    assert curve(out, "train/skipped_steps")[6] == 1


NCCL_WORLD = r'''
import json, sys, torch
from distill_common import distributed as D
world = D.init_world("cuda", always_group=True)
assert world.backend == "nccl" and world.communicates
out = {"sum": world.all_reduce([1.0, 2.0]).tolist(), "any": world.any(True),
       "objects": world.gather_objects("x"), "broadcast": world.broadcast_object("y")}
D.check_shared_folder(world, sys.argv[1], "train.output_dir")
world.barrier()
print("RESULT " + json.dumps(out))
D.shutdown()
'''


def test_collectives_follow_nccl_rules_in_a_world_of_one(tmp_path):
    script = tmp_path / "world.py"
    script.write_text(NCCL_WORLD)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "1", str(script), str(tmp_path / "out")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    _ok(proc)
    result = json.loads(next(line[7:] for line in proc.stdout.splitlines()
                             if line.startswith("RESULT ")))
    assert result == {"sum": [1.0, 2.0], "any": True, "objects": ["x"], "broadcast": "y"}


def test_fine_tuning_runs_on_cuda(tmp_path):
    import pandas as pd

    from finetune import run_task
    from test_finetune_train import (classification_rows, finetune_cfg, save_tiny_bert,
                                     write_task)

    model = save_tiny_bert(tmp_path / "encoder")
    pd.DataFrame(classification_rows(200)).to_csv(tmp_path / "topics.csv", index=False)
    task = write_task(tmp_path, "topics", """
name: topics
type: classification
source: {path: topics.csv}
columns: {text: sentence, label: topic}
split: {validation: 0.15, test: 0.15, seed: 3}
""")
    res = run_task(model, task, tmp_path / "out", finetune_cfg("device=cuda",
                                                               "precision=bf16"))
    assert res["device"].startswith("cuda") and res["precision"] == "bf16"
    assert res["score"] > 0.6


def test_gpu_latency_is_measured_with_bf16_weights(tmp_path):
    from finetune.latency import measure
    from test_finetune_train import save_tiny_bert

    model = save_tiny_bert(tmp_path / "encoder")
    out = measure(model, [1, 8], seq_len=32, warmup=2, repeats=5, threads=1, gpu=True)
    assert out["gpu_dtype"] == "bfloat16" and len(out["gpu"]) == 2
    assert all(row["median_ms"] > 0 for row in out["gpu"])
