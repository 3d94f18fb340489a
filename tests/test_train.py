"""`distill pretrain` end to end on CPU with real processes: 2-rank ZeRO-2 and ZeRO-3
runs (gloo), exact resume after kill -9, a NaN on one rank handled by both, and the
tokenizer check. Tiny teacher (4 x 64 with an MLM head), tiny shards."""

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

import conftest
from test_data_loader import save_wordpiece_tokenizer, write_shards

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_assets")
    tok = save_wordpiece_tokenizer(root / "tokenizer")
    teacher = conftest._save_tiny_bert(root / "teacher", tok, with_head=True)
    shards = write_shards(root / "shards", tok, seq_len=32, train_shards=4,
                          samples_per_shard=24, validation_samples=20)
    return {"tokenizer": tok, "teacher": teacher, "shards": shards}


DISTILBERT_STYLE = ["  logit_kl: {weight: 1.0}", "  mlm: {weight: 1.0}",
                    "  hidden_cosine: {weight: 1.0}"]
# No term uses the MLM head: the student's head only runs at evaluation.
MINILM_STYLE = ["  attention_kl: {weight: 1.0}", "  value_relation_kl: {weight: 1.0}"]


def write_recipe(path: Path, assets: dict[str, Path], out: Path,
                 objective: list[str] = DISTILBERT_STYLE, init: str = "teacher_layers",
                 hidden_dropout: float | None = None, **train) -> Path:
    settings = dict(data_dir=str(assets["shards"]), max_steps=16, micro_batch_size=8,
                    lr=2.0e-3, warmup_steps=2, log_every=1, eval_every=8, save_every=8,
                    num_workers=1, shuffle_buffer=16, eval_samples=None)
    settings.update(train)
    lines = [f"name: tiny", f"output_dir: {out}", f"teacher: {{path: {assets['teacher']}}}",
             f"student: {{num_layers: 2, init: {init}, attention_dropout: 0.0"
             + (f", hidden_dropout: {hidden_dropout}}}" if hidden_dropout is not None else "}"),
             "objective:", *objective, "train:"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    env.pop("RANK", None)
    env.update(extra)
    return env


def torchrun_cmd(recipe: Path, *overrides: str, nproc: int = 2) -> list[str]:
    return [*TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), "-m", "distill_cli",
            "pretrain", str(recipe), *overrides]


def run(cmd: list[str], timeout: float = 240, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def curve(out: Path, tag: str = "train/total") -> dict[int, float]:
    from distill_common.tracking import read_metrics

    return {r["step"]: r[tag] for r in read_metrics(out / "pretrain" / "metrics.jsonl")
            if tag in r}


def _check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, assets) -> Path:
    """The uninterrupted reference: 2 ranks, ZeRO-2, 2 loader workers per rank."""
    out = tmp_path_factory.mktemp("zero2")
    recipe = write_recipe(out / "recipe.yaml", assets, out, num_workers=2, save_every=4)
    _check_ok(run(torchrun_cmd(recipe, "train.zero_stage=2")))
    return out


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, assets) -> Path:
    out = tmp_path_factory.mktemp("zero3")
    recipe = write_recipe(out / "recipe.yaml", assets, out, objective=MINILM_STYLE,
                          init="random")
    _check_ok(run(torchrun_cmd(recipe, "train.zero_stage=3")))
    return out


def _assert_trained(out: Path, mlm_scored: bool = True) -> None:
    """``mlm_scored``: the student's MLM head is trained (or the teacher's), so evaluation
    scores it; a fresh head that no term trains is not scored."""
    losses = curve(out)
    assert sorted(losses) == list(range(1, 17))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (14, 15, 16)) / 3
    assert last < 0.97 * first, losses
    evals = curve(out, "eval/mlm_accuracy")
    assert set(evals) == ({8, 16} if mlm_scored else set())
    records = curve(out, "eval/agreement")
    assert set(records) == {8, 16} and all(0.0 <= v <= 1.0 for v in records.values())
    ckpts = sorted(p.name for p in (out / "pretrain" / "checkpoints").glob("step-*"))
    assert ckpts[-1] == "step-00000016"
    assert (out / "pretrain" / "checkpoints" / ckpts[-1] / "complete.json").is_file()
    assert (out / "student" / "model.safetensors").is_file()


@pytest.mark.slow
def test_zero2_two_ranks_lowers_the_loss(zero2_run):
    _assert_trained(zero2_run)
    assert len(curve(zero2_run, "train/part/logit_kl")) == 16
    ckpts = sorted(p.name for p in (zero2_run / "pretrain" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000012", "step-00000016"]  # keep_last=2 of 4, 8, 12, 16
    # Each rank draws its own dropout (and any other randomness) from a stream of its own:
    # the saved generator states differ between the ranks (their reproducibility across a
    # kill is the resume test's equal curves, with dropout on).
    import torch

    ckpt = zero2_run / "pretrain" / "checkpoints" / "step-00000016"
    states = [torch.load(ckpt / f"rank-0000{r}.pt", weights_only=True)["rng"]["torch"]
              for r in (0, 1)]
    assert not torch.equal(states[0], states[1])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(zero2_run / "pretrain" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/total", "train/part/logit_kl", "train/part/mlm", "train/part/hidden_cosine",
                "train/lr", "train/grad_norm", "throughput/tokens_per_s",
                "throughput/samples_per_s", "time/data_ms", "time/teacher_ms",
                "time/student_ms", "time/optimizer_ms", "memory/host_peak_mb",
                "eval/mlm_accuracy", "eval/mlm_loss", "eval/agreement", "eval/part/logit_kl"):
        assert tag in tags, tag
    assert len(events.Scalars("train/total")) == 16


@pytest.mark.slow
def test_zero3_two_ranks_lowers_the_loss_and_exports_consolidated(zero3_run, assets):
    from test_export import check_exported

    _assert_trained(zero3_run, mlm_scored=False)  # random init, no term on the MLM head
    # The partitions of both ranks are consolidated: the exported folder scores the
    # validation shards exactly as the trained module did.
    check_exported(zero3_run / "student", zero3_run, assets["shards"], world_size=2)


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, assets, zero2_run):
    out = tmp_path / "killed"
    recipe = write_recipe(tmp_path / "recipe.yaml", assets, out, num_workers=2, save_every=4)
    kill_after = random.Random().randint(5, 10)
    proc = subprocess.Popen(torchrun_cmd(recipe, "train.zero_stage=2"), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = out / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and any(
                    json.loads(line)["step"] >= kill_after
                    for line in metrics.read_text().splitlines() if line.strip()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"run ended before the kill: {proc.stderr.read()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job, without warning
    finally:
        proc.wait(timeout=60)
    killed_at = max(curve(out))
    assert killed_at < 16
    resumed = run(torchrun_cmd(recipe, "train.zero_stage=2"))
    _check_ok(resumed)
    assert "resumed from" in resumed.stderr
    want, got = curve(zero2_run), curve(out)
    assert sorted(got) == list(range(1, 17))
    for step in range(1, 17):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), (step, killed_at)
    assert curve(out, "eval/mlm_accuracy") == pytest.approx(curve(zero2_run, "eval/mlm_accuracy"))


@pytest.mark.slow
def test_nan_on_one_rank_is_skipped_by_both_then_stops_both(tmp_path, assets):
    """Rank 1 sees NaN on its micro-batches 3 and 4 (both ranks skip those steps and go
    on: the NaN gradients never reach the weights), then on every one from the 9th: after
    max_bad_steps=3 in a row both ranks save a checkpoint and exit with the same error;
    nobody hangs."""
    out = tmp_path / "nan"
    recipe = write_recipe(tmp_path / "recipe.yaml", assets, out, max_steps=12, eval_every=0,
                          save_every=0, max_bad_steps=3, export=False)
    started = time.time()
    proc = run(torchrun_cmd(recipe), timeout=180, DISTILL_TEST_NAN_LOSS="1:3,4,9-")
    assert time.time() - started < 170
    assert proc.returncode != 0
    for rank in (0, 1):  # rank 0 saw rank 1's NaN, and both stopped together
        lines = [line for line in proc.stderr.splitlines()
                 if f"[rank {rank}]" in line and "non-finite loss or gradients on at least one rank" in line]
        assert len(lines) == 5, proc.stderr[-3000:]
    assert proc.stderr.count("error: 3 non-finite steps in a row at step 7") == 2
    skipped = curve(out, "train/skipped_steps")
    assert sorted(skipped) == list(range(1, 7))  # 6 good steps (draws 1,2,5,6,7,8)
    assert skipped[2] == 0 and skipped[3] == 2 and skipped[6] == 2
    ckpt = out / "pretrain" / "checkpoints" / "step-00000006"
    assert (ckpt / "complete.json").is_file()
    assert json.loads((ckpt / "hf" / "run_info.json").read_text())["skipped_steps"] == 5


def test_tokenizer_mismatch_between_shards_and_teacher_is_refused(tmp_path, assets):
    bad_shards = write_shards(tmp_path / "shards", assets["tokenizer"], seq_len=32,
                              vocab_hash="f" * 64)
    recipe = write_recipe(tmp_path / "recipe.yaml", assets, tmp_path / "run",
                          data_dir=str(bad_shards))
    proc = run([sys.executable, "-m", "distill_cli", "pretrain", str(recipe)], timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error:" in proc.stderr and "different vocabulary" in proc.stderr
    assert str(bad_shards / "manifest.json") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
