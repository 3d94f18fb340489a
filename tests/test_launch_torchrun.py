"""Multi-node torchrun on loopback: two `distill launch --cluster torchrun/2node` agents,
the same command line each, meet at a c10d rendezvous on 127.0.0.1 and train a tiny
student as 2 ranks (the way two machines would)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch_fixtures import prepared_shards, write_tiny_recipe

pytestmark = pytest.mark.slow


def test_two_torchrun_agents_train_together(tmp_path, tmp_path_factory, tiny_teacher_dir,
                                            tiny_corpus_dir, free_port):
    recipe = write_tiny_recipe(tmp_path / "recipe", tiny_teacher_dir, tiny_corpus_dir,
                               max_steps=3)
    shards = prepared_shards(tmp_path_factory.getbasetemp(), recipe)
    out = tmp_path / "pretrain"
    argv = [sys.executable, "-m", "distill_cli", "launch", str(recipe),
            f"train.data_dir={shards}", f"train.output_dir={out}",
            "--cluster", "torchrun/2node", "--stage", "pretrain",
            "--set", f"rdzv_endpoint=127.0.0.1:{free_port}", "--set", "rdzv_id=loopback"]
    agents = [subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outputs = [a.communicate(timeout=240)[0] for a in agents]
    finally:
        for a in agents:  # stop our agents (and their workers' group) also on failure
            if a.poll() is None:
                a.kill()
                a.wait()
    for a, text in zip(agents, outputs):
        assert a.returncode == 0, text[-4000:]
    (ckpt,) = sorted((out / "checkpoints").glob("step-*"))
    complete = json.loads((ckpt / "complete.json").read_text())
    assert complete["step"] == 3 and complete["world_size"] == 2
    # Same command line on both "nodes" (the launcher logs what it runs).
    ran = [[ln.split("running: ", 1)[1] for ln in text.splitlines() if "running: " in ln]
           for text in outputs]
    assert ran[0] == ran[1] and len(ran[0]) == 1
    assert "--nnodes=2" in ran[0][0] and f"--rdzv_endpoint=127.0.0.1:{free_port}" in ran[0][0]
