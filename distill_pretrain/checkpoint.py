"""Checkpoints that a resume can trust, whatever happens during a save.

Layout: ``<train.output_dir>/checkpoints/step-00000050/`` holds DeepSpeed's state (model,
optimizer, LR scheduler; ZeRO partitions), ``rank-00000.pt``... (each rank's data
position and RNG states, loaded with ``weights_only=True``), ``hf/`` (the student's
Hugging Face config and the tokenizer, for `distill export`) and ``complete.json``.

The lifecycle, so that no signal, kill or crash at any instant loses the newest complete
checkpoint:

1. every rank writes into ``.tmp-step-00000050-<nonce>/`` (never into a final folder);
2. each rank fsyncs and hashes its share of the files; rank 0 writes ``complete.json``
   (the SHA-256 of every file, the step, the world size, the run's fingerprints),
   fsynced, then renames the folder to ``step-00000050`` and fsyncs ``checkpoints/``;
3. only then are older checkpoints beyond ``keep_last`` and stale temporary folders
   deleted. A complete checkpoint of the same step is never replaced (a save requested
   again right after one, e.g. by SIGTERM, reuses it).

Test hook (test-only): ``DISTILL_TEST_PAUSE_SAVE="written:8"`` (or ``renamed:8``) makes
rank 0 touch ``checkpoints/.paused-written`` and wait (at most 60 s, until the test
deletes that file) once the files of step 8 are written (before complete.json), or once
the folder is renamed (before pruning), so a test can kill or signal the run at that
instant.

Loading verifies every file against ``complete.json`` first (split over the ranks) and
refuses a folder whose files differ: only what this system wrote is ever unpickled. A
damaged newest checkpoint falls back to the next older complete one, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from distill_common.distributed import World
from distill_common.errors import DistillUserError
from distill_common.fsio import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

COMPLETE = "complete.json"
FORMAT = 2
_TAG = re.compile(r"^step-(\d{8})$")


class CheckpointUserError(DistillUserError, RuntimeError):
    """A resume target that cannot be used; names the folder and the fix."""


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file()


def read_complete(folder: Path) -> dict:
    try:
        return json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointUserError(f"{folder / COMPLETE}: unreadable ({err})") from None


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _TAG.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def candidates(output_dir: str | Path, resume: str) -> list[Path]:
    """Checkpoints to try, newest first: ``never`` -> none; ``auto`` -> every complete
    one under output_dir; a folder -> that one, which must be complete."""
    if resume == "never":
        return []
    if resume == "auto":
        return list_checkpoints(checkpoints_root(output_dir))[::-1]
    folder = Path(resume)
    if not folder.is_dir():
        raise CheckpointUserError(f"train.resume={resume}: no such checkpoint folder; use "
                                  f"auto, never or a folder under "
                                  f"{checkpoints_root(output_dir)}")
    if not is_complete(folder):
        raise CheckpointUserError(f"train.resume={resume}: {folder} has no {COMPLETE} (the "
                                  f"save was interrupted); pick an older checkpoint or use "
                                  f"train.resume=auto")
    return [folder]


# --- integrity ------------------------------------------------------------------------------


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name != COMPLETE)


def _hash_and_sync(folder: Path, rel: str) -> str:
    path = folder / rel
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # what complete.json vouches for is on disk before it is written
    finally:
        os.close(fd)
    return sha256_file(path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(folder: Path, world: World | None = None) -> list[str]:
    """Files of ``folder`` that are missing, extra or differ from ``complete.json``
    (every rank checks its share; all ranks get the full list)."""
    rank, size = (world.rank, world.world_size) if world else (0, 1)
    recorded = read_complete(folder).get("files")
    if not isinstance(recorded, dict):
        return [f"{COMPLETE} records no file hashes (written by an older version)"]
    present = set(_files(folder))
    bad = sorted(set(recorded) ^ present) if rank == 0 else []
    for rel in sorted(set(recorded) & present)[rank::size]:
        if sha256_file(folder / rel) != recorded[rel]:
            bad.append(rel)
    if world is not None:
        bad = sorted({b for part in world.gather_objects(bad) for b in part})
    return bad


# --- save -----------------------------------------------------------------------------------


class Checkpointer:
    """Saves and loads the checkpoints of one run (collective: every rank calls)."""

    def __init__(self, engine, world: World, output_dir: str | Path, keep_last: int,
                 record: dict, write_extra: Callable[[Path, dict], None] | None = None):
        self.engine, self.world = engine, world
        self.root = checkpoints_root(output_dir)
        self.keep_last = keep_last
        self.record = record
        """Written into complete.json (fingerprints, settings); read back on resume."""
        self.write_extra = write_extra

    def save(self, step: int, client_state: dict, rank_state: dict,
             extra: dict | None = None) -> Path:
        final = self.root / tag_for(step)
        if self._keep_existing(final):
            log.info("checkpoint %s exists; kept", final)
            return final
        nonce = self.world.broadcast_object(secrets.token_hex(4) if self.world.is_main else None)
        tmp = self.root / f".tmp-{final.name}-{nonce}"
        if self.world.is_main:
            tmp.mkdir(parents=True)
        self.world.barrier()
        self.engine.save_checkpoint(str(self.root), tag=tmp.name, client_state=client_state,
                                    save_latest=False)
        rank_file = tmp / f"rank-{self.world.rank:05d}.pt"
        torch.save(rank_state, rank_file)
        if self.world.is_main and self.write_extra is not None:
            self.write_extra(tmp, extra or {})
        self.world.barrier()
        self._test_pause("written", step)
        files = _files(tmp)
        hashes = dict(pair for part in self.world.gather_objects(
            [(rel, _hash_and_sync(tmp, rel)) for rel in files[self.world.rank::
                                                                  self.world.world_size]])
            for pair in part)
        if self.world.is_main:
            atomic_write_json(tmp / COMPLETE, {
                "format": FORMAT, "step": step, "world_size": self.world.world_size,
                **self.record, "files": hashes})
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._test_pause("renamed", step)
            self._prune(final)
            log.info("checkpoint %s", final)
        self.world.barrier()
        return final

    def _keep_existing(self, final: Path) -> bool:
        """A sound complete checkpoint of this step is kept (a stop right after a save
        asks for it again); a damaged one is moved aside, to be replaced."""
        if not self.world.all_reduce([is_complete(final)], "max")[0]:
            return False
        bad = verify(final, self.world)
        if not bad:
            return True
        if self.world.is_main:
            aside = self.root / f".tmp-damaged-{final.name}-{secrets.token_hex(4)}"
            log.warning("%s: %d file(s) changed since it was saved (%s); saving it anew",
                        final, len(bad), ", ".join(bad[:3]))
            os.replace(final, aside)
        self.world.barrier()
        return False

    def _test_pause(self, point: str, step: int) -> None:
        if self.world.is_main and os.environ.get("DISTILL_TEST_PAUSE_SAVE") == f"{point}:{step}":
            marker = self.root / f".paused-{point}"
            marker.touch()
            deadline = time.monotonic() + 60
            while marker.exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    def _prune(self, newest: Path) -> None:
        older = [p for p in list_checkpoints(self.root) if p.name < newest.name]
        for old in older[:max(0, len(older) - (self.keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)  # interrupted saves

    # --- load -----------------------------------------------------------------------------

    def load(self, folder: Path, engine_state: Path | None = None) -> tuple[dict, list[dict]]:
        """Restore DeepSpeed's state from ``folder`` (verified), or from its universal
        copy ``engine_state`` when the world size changed; returns (client_state, the rank
        states: this rank's alone when the world size is unchanged, else every saved
        rank's, for the caller to redistribute)."""
        source = engine_state or folder
        _, client_state = self.engine.load_checkpoint(
            str(source.parent), tag=source.name, load_optimizer_states=True,
            load_lr_scheduler_states=True)
        if client_state is None:
            raise CheckpointUserError(f"{folder}: DeepSpeed could not load this checkpoint; "
                                      f"pick another with train.resume=<folder> or "
                                      f"train.resume=never")
        saved_world = int(read_complete(folder)["world_size"])
        ranks = [self.world.rank] if saved_world == self.world.world_size \
            else list(range(saved_world))
        return client_state, [torch.load(folder / f"rank-{r:05d}.pt", map_location="cpu",
                                         weights_only=True) for r in ranks]


def newest_sound(folders: list[Path], world: World) -> tuple[Path | None, list[str]]:
    """The first of ``folders`` (newest first) whose files match its complete.json;
    warnings for those skipped."""
    skipped = []
    for folder in folders:
        bad = verify(folder, world)
        if not bad:
            return folder, skipped
        skipped.append(f"{folder}: {len(bad)} file(s) missing or changed since it was "
                       f"saved ({', '.join(bad[:3])}); not loaded")
    return None, skipped
