"""`distill pretrain`: set up, resume, run the loop (loop.py), export.

    checks     the models fit (validate.py), the shards exist and use the teacher's
               vocabulary: on every rank, before any process group or model
    world      device, backend and process group (distill_common.distributed); the
               output folder must be shared by every rank; per-rank random streams
    models     frozen teacher, student (same on every rank), objective, DeepSpeed engine
    resume     the newest sound checkpoint made from these shards and this recipe:
               model, optimizer, schedule, data position, RNG (checkpoint.py, resume.py)
    loop       loop.py
    end        export of the student to train.export_dir (rank 0)
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import AutoTokenizer

from distill_common import manifest as shards
from distill_common.assets import resolve_model_dir
from distill_common.distributed import World, check_shared_folder, init_world, shutdown
from distill_common.folder_lock import FolderInUseUserError, FolderLock
from distill_common.fsio import atomic_write_json
from distill_common.seeding import capture_rng, restore_rng, seed_rank_streams
from distill_common.tracking import Metrics
from distill_pretrain import checkpoint as ckpt
from distill_pretrain import resume
from distill_pretrain.calibration import calibration_for
from distill_pretrain.compiled_ops import prepare_compiled_ops
from distill_pretrain.config import PretrainJob
from distill_pretrain.data import check_tokenizer, load_token_counts
from distill_pretrain.engine import (COMPUTE_DTYPES, EngineModule, adopt_process_group,
                                     build_engine, resolve_precision)
from distill_pretrain.export_heads import mlm_head_state
from distill_pretrain.loop import LoopOutcome, TrainLoop, TrainState
from distill_pretrain.masking import build_masker
from distill_pretrain.objective import build_objective
from distill_pretrain.stream import (StreamPosition, TrainStream, train_loader,
                                     validation_batches)
from distill_pretrain.student import initialise_student
from distill_pretrain.teacher import load_teacher
from distill_pretrain.validate import validate_models

log = logging.getLogger(__name__)

EVAL_TAGS = ("train/total", "eval/total", "eval/mlm_accuracy", "eval/agreement")
"""What TensorBoard's HParams tab sets against the recipe's values."""


@dataclass
class TrainResult:
    rank: int
    step: int
    output_dir: Path
    checkpoint: Path
    export_dir: Path | None
    final_eval: dict[str, float]
    stopped: bool = False
    """Stopped by SIGTERM before max_steps (a checkpoint was saved; not exported)."""


def run_pretrain(job: PretrainJob) -> TrainResult:
    """``pretrain`` then leave the process group (an entry point's whole job)."""
    try:
        return pretrain(job)
    finally:
        shutdown()


def pretrain(job: PretrainJob) -> TrainResult:
    """Run (or resume) the distillation of ``job``; every rank calls this."""
    cfg = job.train
    prepare_compiled_ops()  # own build cache, stale build locks cleared, no silent compile
    # Checks first, before any process group or model: every rank reads the same files,
    # so every rank fails the same way (no rank is left waiting for the others).
    validate_models(job.teacher, job.student, job.objective)
    manifest = shards.load_manifest(cfg.data_dir)
    teacher_dir = resolve_model_dir(job.teacher.path)
    check_tokenizer(manifest, AutoTokenizer.from_pretrained(teacher_dir), cfg.data_dir,
                    str(teacher_dir))

    world = init_world(cfg.device, timeout_min=cfg.dist_timeout_min, always_group=True)
    lock = _lock_output(world, cfg.output_dir)
    try:
        return _pretrain(job, world, manifest)
    finally:
        if lock is not None:
            lock.release()


def _pretrain(job: PretrainJob, world: World, manifest: dict) -> TrainResult:
    cfg = job.train
    check_shared_folder(world, cfg.output_dir, "train.output_dir")
    seed_rank_streams(job.seed, world.rank)
    precision = resolve_precision(cfg.precision, world.device)
    teacher = load_teacher(job.teacher, device=world.device, dtype=COMPUTE_DTYPES[precision])
    start = _resume_point(job, world, manifest, precision)
    student, student_init = initialise_student(
        job.student, teacher, seed=job.seed, world=world,
        calibration=calibration_for(job.student, cfg.data_dir, job.seed))
    adopt_process_group(world, cfg.dist_timeout_min)
    objective = build_objective(job.objective, teacher, student.config)
    # A fresh MLM head that no term trains has no accuracy worth measuring.
    eval_mlm = mlm_head_state(objective.needs_mlm_logits, student_init) != "none"
    engine, scheduler = build_engine(EngineModule(student, objective, eval_mlm=eval_mlm),
                                     cfg, world, precision, load_universal=start.universal)
    checkpoints = ckpt.Checkpointer(
        engine, world, cfg.output_dir, cfg.keep_last,
        record={"data_fingerprint": start.data_fingerprint, "run_settings": start.settings,
                "train_settings": resume.train_settings(cfg)},
        write_extra=_hf_writer(job, engine, teacher, manifest, precision, world,
                               student_init))
    state, position = start.load(checkpoints, engine, scheduler, cfg, world)

    masker = _masker(cfg, teacher, manifest)
    stream = TrainStream(shards.shard_urls(cfg.data_dir, manifest, "train"),
                         sample_counts=shards.shard_sample_counts(manifest, "train"),
                         seq_len=manifest["seq_len"], batch_size=cfg.micro_batch_size,
                         masker=masker, seed=job.seed, rank=world.rank,
                         world_size=world.world_size, num_workers=start.num_workers,
                         data_slots=start.data_slots, shuffle_buffer=cfg.shuffle_buffer,
                         position=position)
    loader = train_loader(stream, start.num_workers, pin_memory=world.device.type == "cuda")
    val_batches = validation_batches(
        shards.shard_urls(cfg.data_dir, manifest, "validation"), seq_len=manifest["seq_len"],
        batch_size=cfg.micro_batch_size, masker=masker, seed=job.seed, rank=world.rank,
        world_size=world.world_size, max_samples=cfg.eval_samples)
    metrics = Metrics(cfg.output_dir, enabled=world.is_main, max_steps=cfg.max_steps,
                      tensorboard=cfg.tensorboard, start_step=state.step)
    metrics.record_config(job.recipe, metrics=EVAL_TAGS)
    saver = _Saver(checkpoints, state, position, world)
    loop = TrainLoop(cfg=cfg, world=world, engine=engine, objective=objective, teacher=teacher,
                     loader=loader, position=position, state=state, metrics=metrics,
                     checkpoints=saver, val_batches=val_batches, precision=precision)
    try:
        outcome = loop.run(start.folder)
    finally:
        metrics.close()
    return _finish(outcome, saver, state, cfg, world)


def _lock_output(world: World, folder: str) -> FolderLock | None:
    """One run per output folder (a second one would delete the first's checkpoints):
    rank 0 holds the lock, and every rank fails alike when another run has it."""
    lock, error = None, None
    if world.is_main:
        try:
            lock = FolderLock(folder, "pretrain").acquire()
        except FolderInUseUserError as err:
            error = str(err)
    error = world.broadcast_object(error)
    if error:
        raise FolderInUseUserError(error)
    return lock


# --- resume ---------------------------------------------------------------------------------


@dataclass
class _Start:
    """Where the run starts: a checkpoint (or none) and the data layout it fixes."""
    folder: Path | None
    data_fingerprint: str
    settings: dict
    data_slots: int
    num_workers: int
    universal: bool = False
    """The checkpoint's optimizer state is partitioned for another number of ranks."""

    def load(self, checkpoints: ckpt.Checkpointer, engine, scheduler, cfg,
             world: World) -> tuple[TrainState, StreamPosition]:
        if self.folder is None:
            return TrainState(), StreamPosition(num_workers=max(1, self.num_workers))
        converted = resume.universal_copy(self.folder, world) if self.universal else None
        client_state, rank_states = checkpoints.load(self.folder, converted)
        if converted is not None:
            world.barrier()
            if world.is_main:
                shutil.rmtree(converted.parent, ignore_errors=True)
        state = TrainState(**client_state["train_state"])
        state.bad_in_row = 0
        for key, (old, new) in resume.changed_settings(self.folder, cfg).items():
            log.info("resume: train.%s %s -> %s takes effect", key, old, new)
        resume.apply_optimizer_settings(engine, scheduler, cfg, state.step)
        workers = max(1, self.num_workers)
        saved = [r["data"] for r in rank_states]
        if len(rank_states) == 1 and saved[0]["num_workers"] == workers:
            position = StreamPosition.from_dict(saved[0])
            restore_rng(rank_states[0]["rng"])
        else:  # another layout: every slot keeps its place, RNG streams are fresh
            position = StreamPosition.merged(saved, workers)
            log.warning("%s was written by %d rank(s) x %d loader worker(s), this run has "
                        "%d x %d: data slots keep their positions (no sample skipped or "
                        "repeated), random streams are fresh", self.folder,
                        ckpt.read_complete(self.folder)["world_size"],
                        saved[0]["num_workers"], world.world_size, workers)
        log.info("resumed from %s at step %d", self.folder, state.step)
        return state, position


def _resume_point(job: PretrainJob, world: World, manifest: dict, precision: str) -> _Start:
    cfg = job.train
    workers = cfg.num_workers if cfg.num_workers is not None else \
        (2 if world.device.type == "cuda" else 1)
    if cfg.resume == "never":
        resume.clear_for_fresh_start(cfg.output_dir, world.is_main)
        world.barrier()
    folder, skipped = ckpt.newest_sound(ckpt.candidates(cfg.output_dir, cfg.resume), world)
    for warning in skipped:
        log.warning(warning)
    if skipped and folder is None and cfg.resume not in ("auto", "never"):
        raise ckpt.CheckpointUserError(f"train.resume: {skipped[0]}")
    slots = cfg.data_slots or world.world_size * max(1, workers)
    if folder is not None:
        slots = int((ckpt.read_complete(folder).get("run_settings") or {})
                    .get("train.data_slots", slots))
    settings = resume.run_settings(job, precision, slots)
    fingerprint = shards.fingerprint(manifest)
    if folder is not None:
        resume.check_compatible(folder, fingerprint, settings)
    universal = folder is not None and resume.needs_universal(folder, world.world_size)
    return _Start(folder, fingerprint, settings, slots, workers, universal)


# --- saving and the end ---------------------------------------------------------------------


class _Saver:
    """What the loop calls to checkpoint: the state, the data position and the RNG."""

    def __init__(self, checkpoints: ckpt.Checkpointer, state: TrainState,
                 position: StreamPosition, world: World):
        self.checkpoints, self.state, self.position, self.world = \
            checkpoints, state, position, world

    def save(self, final_eval: dict | None = None) -> Path:
        state = self.state
        client_state = {"train_state": asdict(state), "world_size": self.world.world_size}
        rank_state = {"data": self.position.to_dict(), "rng": capture_rng()}
        return self.checkpoints.save(state.step, client_state, rank_state,
                                     {"final_eval": final_eval or {}, **asdict(state)})


def _hf_writer(job: PretrainJob, engine, teacher, manifest: dict, precision: str,
               world: World, student_init: dict):
    run_info = {"recipe": job.recipe, "manifest": _manifest_summary(manifest),
                "teacher": {"path": str(teacher.path), "layers": teacher.total_layers,
                            "hidden_size": teacher.hidden_size,
                            "has_mlm_head": teacher.has_mlm_head},
                "student_init": student_init, "precision": precision,
                "world_size": world.world_size}

    def write(folder: Path, extra: dict) -> None:
        hf = folder / "hf"
        engine.module.student.config.save_pretrained(hf)
        teacher.tokenizer.save_pretrained(hf)
        atomic_write_json(hf / "run_info.json", {
            **run_info, "step": extra.get("step"), "skipped_steps": extra.get("skipped"),
            "samples": extra.get("samples"), "tokens": extra.get("tokens"),
            "final_eval": extra.get("final_eval", {})})
    return write


def _finish(outcome: LoopOutcome, saver: _Saver, state: TrainState, cfg,
            world: World) -> TrainResult:
    last = outcome.last_saved
    if last is None or last.name != ckpt.tag_for(state.step):
        last = saver.save(outcome.final_eval)  # resumed at or past max_steps
    export_dir = None
    if cfg.export and not outcome.stopped:
        from distill_pretrain.export import export_checkpoint

        if world.is_main:
            export_checkpoint(last, cfg.export_dir, onnx=cfg.export_onnx,
                              onnx_int8=cfg.export_onnx_int8)
        world.barrier()
        export_dir = Path(cfg.export_dir)
    return TrainResult(rank=world.rank, step=state.step, output_dir=Path(cfg.output_dir),
                       checkpoint=last, export_dir=export_dir, final_eval=outcome.final_eval,
                       stopped=outcome.stopped)


def _masker(cfg, teacher, manifest: dict):
    counts = load_token_counts(cfg.data_dir, manifest) \
        if cfg.mask_selection == "frequency" else None
    return build_masker(teacher.tokenizer, manifest, mask_prob=cfg.mask_prob,
                        replace_prob=cfg.mask_replace_prob, random_prob=cfg.mask_random_prob,
                        whole_word=cfg.whole_word_mask, token_counts=counts,
                        smoothing=cfg.mask_smoothing)


def _manifest_summary(manifest: dict) -> dict:
    return {"tokenizer": manifest["tokenizer"].get("name_or_path"),
            "seq_len": manifest["seq_len"],
            "splits": {name: {"samples": s.get("samples"), "tokens": s.get("tokens"),
                              "shards": len(s.get("shards", []))}
                       for name, s in manifest["splits"].items()},
            "sources": manifest.get("sources"), "dropped": manifest.get("dropped")}
