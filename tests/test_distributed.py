"""The distributed world (distill_common.distributed): device and backend decided in one
place, collectives on the world's device, the shared-folder check, per-rank random
streams. Multi-process cases run for real under torchrun with 2 gloo ranks."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill_common import distributed as D
from distill_common.seeding import rank_seed, seed_rank_streams, shared_seed

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def gpu_machine(monkeypatch):
    """This CPU machine made to look like a node with 2 GPUs (device choice only)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delenv("DISTILL_DIST_BACKEND", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")


def test_collective_tensors_live_where_the_backend_wants_them():
    gpu = D.World(device=torch.device("cuda", 1), backend="nccl")
    assert gpu.collective_device == torch.device("cuda", 1)  # NCCL has no CPU backend
    assert D.World(device=torch.device("cpu"), backend="gloo").collective_device.type == "cpu"
    # gloo on a GPU rank (an explicit override) reduces CPU tensors
    assert D.World(device=torch.device("cuda", 0), backend="gloo").collective_device.type == "cpu"


def test_no_collective_is_issued_outside_the_world():
    """Every collective goes through World, which picks its device: a caller cannot
    build a CPU tensor for NCCL again."""
    calls = {"all_reduce", "barrier", "all_gather_object", "broadcast_object_list",
             "all_gather", "broadcast", "reduce", "gather_object"}
    offenders = []
    for package in ("distill_common", "distill_pretrain", "finetune", "launcher", "data_prep"):
        for path in (REPO / package).rglob("*.py"):
            if path == REPO / "distill_common" / "distributed.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in calls and \
                        ast.unparse(node.value) in ("dist", "torch.distributed"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_device_choice_on_a_gpu_machine(gpu_machine, monkeypatch):
    assert D.pick_device("auto") == torch.device("cuda", 1)
    assert D.pick_backend(torch.device("cuda", 1)) == "nccl"
    assert D.pick_device("cpu").type == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # what the CPU profiles set
    assert D.pick_device("auto").type == "cpu"
    with pytest.raises(D.DistributedUserError, match="DS_ACCELERATOR=cpu"):
        D.pick_device("cuda")


def test_fine_tuning_follows_ds_accelerator_on_a_gpu_machine(gpu_machine, monkeypatch):
    """Fine-tuning joins the same world: DS_ACCELERATOR=cpu keeps it on the CPU too."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = D.init_world("auto")  # what finetune.train.run_task calls
    assert world.device.type == "cpu" and world.backend == "gloo"
    assert not world.communicates


def test_a_rank_without_its_own_gpu_is_refused(gpu_machine, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(D.DistributedUserError, match="LOCAL_RANK=2 but this process sees 2"):
        D.pick_device("auto")


def test_backend_override_is_checked(monkeypatch):
    monkeypatch.setenv("DISTILL_DIST_BACKEND", "nccl")
    with pytest.raises(D.DistributedUserError, match="NCCL backend needs CUDA"):
        D.pick_backend(torch.device("cpu"))
    monkeypatch.setenv("DISTILL_DIST_BACKEND", "mpi")
    with pytest.raises(D.DistributedUserError, match="DISTILL_DIST_BACKEND"):
        D.pick_backend(torch.device("cpu"))


def test_rank_streams_differ_per_rank_and_repeat_per_seed():
    assert len({rank_seed(0, r) for r in range(8)} | {rank_seed(1, r) for r in range(8)}) == 16
    masks = []
    for rank in (0, 1, 0):
        seed_rank_streams(7, rank)
        masks.append(torch.nn.functional.dropout(torch.ones(64), 0.5))
    assert not torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])


def test_shared_seed_leaves_the_rank_stream_alone():
    seed_rank_streams(3, 1)
    want = torch.rand(4)
    seed_rank_streams(3, 1)
    with shared_seed(0):
        built = torch.rand(2)
    assert torch.equal(torch.rand(4), want)
    with shared_seed(0):
        assert torch.equal(torch.rand(2), built)  # the same model on every rank


WORKER = r'''
import json, os, sys, torch
from distill_common import distributed as D
world = D.init_world("cpu", always_group=True)
out = {"rank": world.rank, "size": world.world_size, "backend": world.backend}
out["sum"] = world.all_reduce([world.rank + 1.0, 2.0]).tolist()
out["device_sum"] = world.all_reduce(torch.tensor([1.0, world.rank])).tolist()
out["any"] = world.any(world.rank == 1)
out["gathered"] = world.gather_objects(f"r{world.rank}")
out["broadcast"] = world.broadcast_object("from-rank-0" if world.is_main else None)
folder = sys.argv[1] if world.is_main else sys.argv[2]
try:
    D.check_shared_folder(world, folder, "train.output_dir")
    out["shared"] = "ok"
except D.DistributedUserError as err:
    out["shared"] = str(err)
with open(f"{sys.argv[3]}/rank-{world.rank}.json", "w") as f:  # not stdout: lines interleave
    json.dump(out, f)
D.shutdown()
'''


def _torchrun(tmp_path: Path, *args: str, nproc: int = 2, **env) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    results = tmp_path / "results"
    results.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(nproc), str(script), *args, str(results)], cwd=REPO, capture_output=True,
        text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO),
                                     "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((results / f"rank-{r}.json").read_text()) for r in range(nproc)]


def test_two_ranks_reduce_gather_broadcast_and_check_the_shared_folder(tmp_path):
    shared = tmp_path / "out"
    ranks = _torchrun(tmp_path, str(shared), str(shared))
    assert [r["backend"] for r in ranks] == ["gloo", "gloo"]
    assert all(r["sum"] == [3.0, 4.0] and r["device_sum"] == [2.0, 1.0] for r in ranks)
    assert all(r["any"] is True and r["gathered"] == ["r0", "r1"] for r in ranks)
    assert all(r["broadcast"] == "from-rank-0" and r["shared"] == "ok" for r in ranks)
    assert not list(shared.glob(".shared-*"))  # the token file is cleaned up


def test_a_folder_that_differs_between_ranks_is_refused_on_every_rank(tmp_path):
    """Rank 1 sees another folder at the path (as a node with a local disk would)."""
    ranks = _torchrun(tmp_path, str(tmp_path / "node0"), str(tmp_path / "node1"))
    for r in ranks:
        assert "train.output_dir" in r["shared"] and "is not shared" in r["shared"]
        assert "rank 1 on" in r["shared"] and "rank 0 on" not in r["shared"]


def test_forced_collectives_run_in_a_world_of_one(tmp_path):
    ranks = _torchrun(tmp_path, str(tmp_path / "a"), str(tmp_path / "a"), nproc=1,
                      DISTILL_FORCE_COLLECTIVES="1")
    assert ranks[0]["size"] == 1 and ranks[0]["sum"] == [1.0, 2.0]
    assert ranks[0]["shared"] == "ok"


def test_the_gpu_check_script_plans_every_step():
    """bench/gpu_check.sh is the one command for a lent GPU; its dry run shows the steps
    (install the carried wheels, the gpu tests, the throughput and loader benchmarks)."""
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    steps = [line for line in proc.stderr.splitlines() if line.startswith("+ ")]
    assert "--no-index" in steps[0] and ".whl" in steps[0]
    assert any("-m gpu tests/test_gpu.py" in s for s in steps)
    assert any("train_throughput.py --device cuda --shape real" in s for s in steps)
    assert any("loader_throughput.py" in s for s in steps)
