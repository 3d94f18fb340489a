"""Faults lose nothing, shown with real processes, real signals and real files.

* SIGKILL and SIGTERM at chosen instants around a save (its files written but not yet
  vouched for; right after the rename): the newest complete checkpoint survives and the
  resumed run's curve equals an uninterrupted one.
* A resume with gradient accumulation equals an uninterrupted run.
* 2 ranks -> 1 rank -> 2 ranks under ZeRO-2 and ZeRO-3 give the losses of an
  uninterrupted 2-rank run.
* Stale checkpoints (other shards, another recipe) are refused; resume=never starts over;
  a changed learning rate takes effect; a tampered checkpoint is never loaded; a second
  run on a used folder is refused; a finite loss with an infinite gradient is skipped; a
  torn metrics line does not break a resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_data_loader import write_shards
from test_train import (REPO, _check_ok, _env, assets, curve, run, torchrun_cmd,  # noqa: F401
                        write_recipe)

pytestmark = pytest.mark.slow

SINGLE = [sys.executable, "-m", "distill_cli", "pretrain"]
STEADY = dict(lr_decay="constant", warmup_steps=0, eval_every=0, export=False)


def _single(recipe: Path, *overrides: str) -> list[str]:
    return [*SINGLE, str(recipe), *overrides]


def _start(cmd: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=_env(**env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended early: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _steps_logged(out: Path) -> int:
    path = out / "pretrain" / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines()
                if line.strip().endswith("}")), default=0)


def _checkpoints(out: Path) -> list[str]:
    """Folders under checkpoints/ (DeepSpeed also drops its zero_to_fp32.py there)."""
    root = out / "pretrain" / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _same_curve(got: Path, want: Path, steps: int, rel: float = 1e-5) -> None:
    a, b = curve(got), curve(want)
    assert sorted(a) == list(range(1, steps + 1)), sorted(a)
    for step in range(1, steps + 1):
        assert a[step] == pytest.approx(b[step], rel=rel, abs=1e-6), step


@pytest.fixture(scope="module")
def reference(tmp_path_factory, assets) -> Path:
    """The uninterrupted run every single-process fault is compared with."""
    out = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(out / "recipe.yaml", assets, out, max_steps=12, save_every=4,
                          keep_last=3, **STEADY)
    _check_ok(run(_single(recipe)))
    return out


# --- around a save -------------------------------------------------------------------------


@pytest.mark.parametrize("signal_name,point", [("SIGKILL", "written"),
                                               ("SIGKILL", "renamed"),
                                               ("SIGTERM", "written"),
                                               ("SIGTERM", "renamed")])
def test_a_signal_around_a_save_loses_nothing(tmp_path, assets, reference, signal_name, point):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", assets, out, max_steps=12, save_every=4,
                          keep_last=3, **STEADY)
    proc = _start(_single(recipe), DISTILL_TEST_PAUSE_SAVE=f"{point}:8")
    try:
        marker = out / "pretrain" / "checkpoints" / f".paused-{point}"
        _wait_for(marker, proc)
        os.killpg(proc.pid, getattr(signal, signal_name))
        time.sleep(0.5)  # the handler has run before the pause ends
        marker.unlink()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    kept = _checkpoints(out)
    assert "step-00000004" in kept  # never deleted before its successor was complete
    if signal_name == "SIGKILL":
        assert code == -signal.SIGKILL
        assert ("step-00000008" in kept) == (point == "renamed")
    else:  # SIGTERM: the save finishes, the stop saves step 8 again and keeps it
        assert code == 143, proc.stderr.read()[-3000:]
        assert "checkpoint" in proc.stderr.read() and "step-00000008" in _checkpoints(out)
    resumed = run(_single(recipe))
    _check_ok(resumed)
    want_from = "step-00000008" if point == "renamed" or signal_name == "SIGTERM" \
        else "step-00000004"
    assert f"resumed from {out / 'pretrain' / 'checkpoints' / want_from}" in resumed.stderr
    assert not [n for n in _checkpoints(out) if n.startswith(".tmp")]  # cleaned up
    _same_curve(out, reference, 12)


def test_a_sigterm_during_setup_stops_at_step_0_with_a_checkpoint(tmp_path, assets,
                                                                  reference):
    """SIGTERM after the output folder is locked and before the first step (teacher,
    student and engine still being built: where Slurm's early signal lands when setup is
    slow) is remembered: setup finishes, step 0 is saved, the exit is 143, and the same
    command resumes to the uninterrupted run's curve."""
    from distill_common.folder_lock import LOCK_NAME

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", assets, out, max_steps=12, save_every=4,
                          keep_last=3, **STEADY)
    proc = _start(_single(recipe))
    try:
        _wait_for(out / "pretrain" / LOCK_NAME, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = proc.stderr.read()
    assert code == 143, log[-3000:]
    assert "stopped by SIGTERM at step 0" in log, log[-3000:]
    assert _checkpoints(out) == ["step-00000000"] and _steps_logged(out) == 0
    resumed = run(_single(recipe))
    _check_ok(resumed)
    assert "resumed from" in resumed.stderr
    _same_curve(out, reference, 12)


def test_a_resume_with_gradient_accumulation_is_exact(tmp_path, assets):
    settings = dict(max_steps=8, save_every=0, grad_accum_steps=2, **STEADY)
    whole = tmp_path / "whole"
    _check_ok(run(_single(write_recipe(tmp_path / "whole.yaml", assets, whole, **settings))))
    out = tmp_path / "cut"
    recipe = write_recipe(tmp_path / "cut.yaml", assets, out, **settings)
    proc = _start(_single(recipe))
    try:
        deadline = time.time() + 240
        while _steps_logged(out) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)  # lands mid-accumulation as often as not
        assert proc.wait(timeout=120) == 143, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert _steps_logged(out) < 8
    _check_ok(run(_single(recipe)))
    _same_curve(out, whole, 8)


# --- another number of ranks ---------------------------------------------------------------


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_then_one_then_two_give_the_same_losses(tmp_path, assets, zero_stage):
    """Global batch kept (1 rank accumulates 2 micro-batches); the data slots of the two
    ranks are served by the one, so every step sees the same samples."""
    settings = dict(save_every=4, hidden_dropout=0.0, **STEADY)
    stage = f"train.zero_stage={zero_stage}"
    whole = tmp_path / "whole"
    recipe = write_recipe(tmp_path / "whole.yaml", assets, whole, max_steps=12, **settings)
    _check_ok(run(torchrun_cmd(recipe, stage)))
    out = tmp_path / "elastic"
    recipe = write_recipe(tmp_path / "elastic.yaml", assets, out, max_steps=12, **settings)
    _check_ok(run(torchrun_cmd(recipe, stage, "train.max_steps=4")))
    one = run(torchrun_cmd(recipe, stage, "train.max_steps=8", "train.grad_accum_steps=2",
                           nproc=1))
    _check_ok(one)
    assert "converting it for 1 rank(s)" in one.stderr and "keep their positions" in one.stderr
    two = run(torchrun_cmd(recipe, stage))
    _check_ok(two)
    assert "converting it for 2 rank(s)" in two.stderr
    # summed in another order (1 rank accumulating, 2 reducing): equal to float precision
    _same_curve(out, whole, 12, rel=1e-3)
    assert curve(out, "train/lr") == curve(whole, "train/lr")


# --- what a resume must refuse, and what it must let change -------------------------------


def test_resume_guards(tmp_path, assets):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", assets, out, max_steps=8, save_every=4,
                          keep_last=3, lr=2.0e-3, **STEADY)
    _check_ok(run(_single(recipe)))
    step8 = out / "pretrain" / "checkpoints" / "step-00000008"

    # Someone changes a file of the newest checkpoint: it is never unpickled.
    states = step8 / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:-16] + b"\x00" * 16)
    exported = run([sys.executable, "-m", "distill_cli", "export", str(step8),
                    str(tmp_path / "export")])
    assert exported.returncode == 2 and "changed since the checkpoint was saved" in \
        exported.stderr and "Traceback" not in exported.stderr
    explicit = run(_single(recipe, f"train.resume={step8}"))
    assert explicit.returncode == 2 and "not loaded" in explicit.stderr

    # resume=auto falls back to step 4; a new learning rate takes effect from there.
    resumed = run(_single(recipe, "train.max_steps=10", "train.lr=1.0e-3"))
    _check_ok(resumed)
    assert "step-00000008: 1 file(s) missing or changed" in resumed.stderr
    assert "resumed from" in resumed.stderr and "step-00000004" in resumed.stderr
    assert "train.lr 0.002 -> 0.001 takes effect" in resumed.stderr
    lrs = curve(out, "train/lr")
    assert lrs[4] == pytest.approx(2e-3) and lrs[5] == lrs[10] == pytest.approx(1e-3)

    # A torn last metrics line (a kill mid-write) does not break the next resume.
    metrics = out / "pretrain" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 11, "train/tot')
    _check_ok(run(_single(recipe, "train.max_steps=11", "train.lr=1.0e-3")))
    assert sorted(curve(out)) == list(range(1, 12))

    # Prep redone: the checkpoints were trained on other shards.
    write_shards(assets["shards"].parent / "other", assets["tokenizer"], seq_len=32,
                 train_shards=4, samples_per_shard=24, validation_samples=20, seed=5)
    stale = run(_single(recipe, f"train.data_dir={assets['shards'].parent / 'other'}",
                        "train.max_steps=12"))
    assert stale.returncode == 2 and "trained on other shards" in stale.stderr
    assert "train.resume=never" in stale.stderr
    # Another student: refused, naming the setting.
    changed = run(_single(recipe, "student.num_layers=1", "train.max_steps=12"))
    assert changed.returncode == 2 and "student" in changed.stderr and \
        "cannot change on resume" in changed.stderr
    # resume=never clears the old checkpoints and starts over.
    fresh = run(_single(recipe, "train.resume=never", "train.max_steps=4"))
    _check_ok(fresh)
    assert "removing the old checkpoints" in fresh.stderr and "resumed from" not in fresh.stderr
    assert _checkpoints(out) == ["step-00000004"]


def test_a_second_run_on_the_same_folder_is_refused(tmp_path, assets):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", assets, out, max_steps=10 ** 6,
                          save_every=0, **STEADY)
    first = _start(_single(recipe))
    try:
        deadline = time.time() + 240
        while _steps_logged(out) < 2 and time.time() < deadline:
            assert first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.05)
        second = run(_single(recipe), timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"pid {first.pid}" in second.stderr.lower() or str(first.pid) in second.stderr
        assert first.poll() is None  # the first run goes on
        os.killpg(first.pid, signal.SIGTERM)
        assert first.wait(timeout=120) == 143
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)


def test_a_finite_loss_with_an_infinite_gradient_is_skipped(tmp_path, assets):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", assets, out, max_steps=5, save_every=0,
                          **STEADY)
    proc = run(_single(recipe, "train.zero_stage=0"), DISTILL_TEST_INF_GRAD="0:3")
    _check_ok(proc)
    assert "non-finite loss or gradients" in proc.stderr
    assert curve(out, "train/skipped_steps")[5] == 1
    assert all(v == v for v in curve(out).values())  # no NaN reached the weights
