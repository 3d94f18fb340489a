"""Ranks die with their launcher (distill_common/lifeline.py): `distill launch --cluster
local/2proc` is killed with SIGKILL while both ranks train, and within 15 s neither rank
nor torchrun is left. The launcher is not reaped meanwhile (a zombie is still dead)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch_fixtures import prepared_shards, write_tiny_recipe

pytestmark = pytest.mark.slow


def _ranks_of(launcher_pid: int) -> list[psutil.Process]:
    """Training processes started for this launcher: they carry its PID in their
    environment (DISTILL_LAUNCHER_PID) and a RANK."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            env = proc.environ()
            if env.get("DISTILL_LAUNCHER_PID") == str(launcher_pid) and "RANK" in env:
                found.append(proc)
    return found


def _steps(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    return max((json.loads(line)["step"] for line in metrics.read_text().splitlines()
                if line.strip().endswith("}")), default=0)


def test_sigkilled_launcher_leaves_no_rank(tmp_path, tmp_path_factory, tiny_teacher_dir,
                                           tiny_corpus_dir):
    recipe = write_tiny_recipe(tmp_path / "recipe", tiny_teacher_dir, tiny_corpus_dir,
                               max_steps=100000)
    shards = prepared_shards(tmp_path_factory.getbasetemp(), recipe)
    out = tmp_path / "pretrain"
    env = {**os.environ, "DISTILL_CACHE": str(tmp_path / "cache")}
    with open(tmp_path / "launcher.log", "w") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "distill_cli", "launch", str(recipe),
             f"train.data_dir={shards}", f"train.output_dir={out}", "--cluster",
             "local/2proc", "--stage", "pretrain"], env=env, cwd=tmp_path, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
    agent_and_ranks: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while _steps(out / "metrics.jsonl") < 2:  # both ranks are past their start-up
            assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no training step within 240 s"
            time.sleep(0.5)
        ranks = _ranks_of(launcher.pid)
        assert len(ranks) == 2, ranks
        agent_and_ranks = psutil.Process(launcher.pid).children(recursive=True)
        assert {r.pid for r in ranks} <= {p.pid for p in agent_and_ranks}

        os.kill(launcher.pid, signal.SIGKILL)  # the launcher only, not its group
        killed = time.monotonic()
        gone, alive = psutil.wait_procs(agent_and_ranks, timeout=15)
        assert not alive, f"still running 15 s after the launcher died: {alive}"
        print(f"all {len(gone)} processes gone {time.monotonic() - killed:.1f} s after "
              f"the launcher was killed")
    finally:
        for proc in agent_and_ranks:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
