"""Checkpoints that a resume can trust.

Layout: ``<train.output_dir>/checkpoints/step-00000050/`` holds DeepSpeed's state (model,
optimizer, LR scheduler; ZeRO partitions), ``rank-00000.pt``... (each rank's data position
and RNG states, loaded with ``weights_only=True``), ``hf/`` (the student's Hugging Face
config and the tokenizer, for `distill export`) and, written last and atomically,
``complete.json``. A crash during a save leaves a folder without ``complete.json``: resume
ignores it and the previous checkpoint is used; the next save of that step replaces it.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from distill_common.fsio import atomic_write_json
from distill_pretrain.distributed import barrier

log = logging.getLogger(__name__)

COMPLETE = "complete.json"
_TAG = re.compile(r"^step-(\d{8})$")


class CheckpointUserError(RuntimeError):
    """A resume target that cannot be used; names the folder and the fix."""


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def list_checkpoints(root: Path, complete_only: bool = True) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)]
    if complete_only:
        found = [p for p in found if is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def find_resume(output_dir: str | Path, resume: str) -> Path | None:
    """``never`` -> None; ``auto`` -> the newest complete checkpoint (None if none);
    anything else is a checkpoint folder that must be complete."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(checkpoints_root(output_dir))
        return found[-1] if found else None
    folder = Path(resume)
    if not folder.is_dir():
        raise CheckpointUserError(f"train.resume={resume}: no such checkpoint folder; use "
                                  f"auto, never or a folder under "
                                  f"{checkpoints_root(output_dir)}")
    if not is_complete(folder):
        raise CheckpointUserError(f"train.resume={resume}: {folder} has no {COMPLETE} (the "
                                  f"save was interrupted); pick an older checkpoint or use "
                                  f"train.resume=auto")
    return folder


# --- RNG states ---------------------------------------------------------------------------------


def capture_rng() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as plain types and tensors."""
    np_state = np.random.get_state(legacy=False)
    version, py_state, gauss = random.getstate()
    state = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": npy["key"].numpy().astype(np.uint32),
                                   "pos": npy["pos"]},
                         "has_gauss": npy["has_gauss"], "gauss": npy["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- save / load --------------------------------------------------------------------------------


def save(engine, output_dir: str | Path, step: int, *, rank: int, client_state: dict,
         rank_state: dict, keep_last: int,
         write_extra: Callable[[Path], None] | None = None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    root = checkpoints_root(output_dir)
    folder = root / tag_for(step)
    if rank == 0 and folder.exists():  # left by a crashed save of this step, or re-saved
        shutil.rmtree(folder)
    barrier()
    engine.save_checkpoint(str(root), tag=folder.name, client_state=client_state,
                           save_latest=False)
    _save_rank_state(folder / f"rank-{rank:05d}.pt", rank_state)
    if rank == 0 and write_extra is not None:
        write_extra(folder)
    barrier()
    if rank == 0:
        atomic_write_json(folder / COMPLETE, {"step": step,
                                               "world_size": client_state.get("world_size")})
        _prune(root, keep_last)
        log.info("checkpoint %s", folder)
    barrier()
    return folder


def _save_rank_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _prune(root: Path, keep_last: int) -> None:
    complete = list_checkpoints(root)
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    newest = complete[-1].name if complete else ""
    for folder in list_checkpoints(root, complete_only=False):
        if not is_complete(folder) and folder.name < newest:
            shutil.rmtree(folder, ignore_errors=True)  # an interrupted older save


def load(engine, folder: Path, rank: int) -> tuple[dict, dict | None]:
    """Collective. Restores DeepSpeed state; returns (client_state, this rank's state, or
    None when the checkpoint was written by a different number of ranks)."""
    _, client_state = engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                             load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise CheckpointUserError(f"{folder}: DeepSpeed could not load this checkpoint; "
                                  f"pick another with train.resume=<folder> or "
                                  f"train.resume=never")
    rank_file = folder / f"rank-{rank:05d}.pt"
    saved_world = client_state.get("world_size")
    if not rank_file.is_file() or saved_world != _world_size():
        return client_state, None
    return client_state, torch.load(rank_file, map_location="cpu", weights_only=True)


def _world_size() -> int:
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1
