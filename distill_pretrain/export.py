"""Export a checkpoint as a plain Hugging Face folder: ``config.json``,
``model.safetensors``, the tokenizer files, a model card ``README.md`` (export_card) and
``distill_run.json`` (the run's record, with what the export did under ``export``);
beside them the teacher's pooler and the MLM head when it was trained (export_heads), a
sentence-transformers layout when the teacher is one (export_st), and on request the
encoder in ONNX (``onnx/model.onnx``, ``onnx/model_int8.onnx``).

ZeRO partitions (stages 1-3) are consolidated from the checkpoint's fp32 master weights
with DeepSpeed's ``zero_to_fp32``; a stage-0 checkpoint already holds the whole module.
The module DeepSpeed trained is ``DistillModule``: keys ``student.*`` are the student,
``objective.*`` (projections) are training-only and left out.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from distill_common.errors import DistillUserError
from distill_pretrain import checkpoint as ckpt
from distill_pretrain.architectures import architecture_of, dims
from distill_pretrain.export_card import CardFacts, model_card, report_speed, teacher_license
from distill_pretrain.export_heads import (TeacherParts, export_model, plan_heads,
                                           read_teacher_parts, student_pooler)
from distill_pretrain.export_st import is_sentence_transformer, write_sentence_transformers
from distill_pretrain.prune import TEACHER_CHANNELS_KEY

log = logging.getLogger(__name__)

STUDENT_PREFIX = "student."


class ExportUserError(DistillUserError, RuntimeError):
    """Not a checkpoint that can be exported; names the folder and the fix."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a ``checkpoints/`` folder or a train.output_dir -> the
    (newest complete) checkpoint folder."""
    path = Path(path)
    if ckpt.is_complete(path):
        return path
    for root in (path, ckpt.checkpoints_root(path)):
        found = ckpt.list_checkpoints(root)
        if found:
            return found[-1]
    raise ExportUserError(f"{path}: no complete checkpoint (a folder step-NNNNNNNN with "
                          f"{ckpt.COMPLETE}); pass a checkpoint folder or the run's "
                          f"train.output_dir")


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the trained DistillModule."""
    if any(folder.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    states = folder / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise ExportUserError(f"{folder}: no DeepSpeed model states; is it a checkpoint of "
                              f"`distill pretrain`?")
    saved = torch.load(states, map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in saved["module"].items()}


def student_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}


def load_student(folder: Path):
    """The trained student as a transformers masked-LM model (fp32, eval mode)."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    hf = folder / "hf"
    if not (hf / "config.json").is_file():
        raise ExportUserError(f"{folder}: no hf/config.json (written with every checkpoint "
                              f"by `distill pretrain`)")
    config = AutoConfig.from_pretrained(hf)
    model = AutoModelForMaskedLM.from_config(config)
    weights = student_state_dict(consolidated_state_dict(folder))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if k.endswith("decoder.weight") or "lm_head" in k
            or k.endswith("predictions.decoder.bias")}
    if set(missing) - tied or unexpected:
        raise ExportUserError(f"{folder}: checkpoint does not match the student config "
                              f"(missing {sorted(set(missing) - tied)[:5]}, unexpected "
                              f"{sorted(unexpected)[:5]})")
    model.tie_weights()
    # Training may run in bf16; the exported student is fp32 like any released checkpoint,
    # so downstream fine-tuning keeps fp32 master weights and latency comparisons are fair.
    model = model.float()
    model.config.dtype = torch.float32
    return model.eval()


def export_checkpoint(path: str | Path, out_dir: str | Path, *, teacher: str | None = None,
                      onnx: bool = False, onnx_int8: bool = False,
                      report: str | Path | None = None) -> Path:
    """Write the HF folder for the checkpoint at ``path`` to ``out_dir`` (atomically).
    ``teacher``: the teacher folder or id when the recorded one is not reachable here;
    ``onnx``/``onnx_int8``: also write the encoder in ONNX (fp32 / and dynamic int8);
    ``report``: a `distill report` report.json whose speed-ups the card quotes."""
    from distill_common.fsio import atomic_dir
    from distill_common.onnx_export import export_encoder, require_onnx

    if onnx or onnx_int8:
        require_onnx()  # before any work
    folder = resolve_checkpoint(path)
    bad = ckpt.verify(folder)
    if bad:  # DeepSpeed's files are pickles: never load one this system did not write
        raise ExportUserError(f"{folder}: {len(bad)} file(s) missing or changed since the "
                              f"checkpoint was saved ({', '.join(bad[:3])}); it is not "
                              f"loaded. Export another checkpoint of the run")
    mlm_model = load_student(folder)
    run_info = _read_json(folder / "hf" / "run_info.json")
    arch = architecture_of(mlm_model.config)
    parts = _teacher_parts(run_info, teacher)
    plan = plan_heads(_objective(run_info), _student_init(run_info), arch, parts)
    width = dims(mlm_model.config, arch)[1]
    kept = getattr(mlm_model.config, TEACHER_CHANNELS_KEY, None)
    model = export_model(mlm_model, arch, plan, student_pooler(plan, parts, width, kept)
                         if parts else None)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for item in (folder / "hf").iterdir():
            if item.name not in ("config.json", "run_info.json") and item.is_file():
                shutil.copy2(item, tmp / item.name)
        st = {"written": False}
        if parts and is_sentence_transformer(parts.folder):
            st = write_sentence_transformers(
                tmp, parts.folder, width, mlm_model.config.max_position_embeddings)
        onnx_files = [str(p.relative_to(tmp)) for p in
                      export_encoder(tmp, tmp / "onnx", int8=onnx_int8)] \
            if onnx or onnx_int8 else []
        facts = _card_facts(model, tmp, run_info, plan, st, parts, onnx_files,
                            report_speed(report, out_dir))
        (tmp / "README.md").write_text(model_card(facts))
        record = {**_publishable(run_info), "export": {
            **plan.record(), "sentence_transformers": st, "onnx": onnx_files}}
        (tmp / "distill_run.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("exported %s -> %s (MLM head: %s; pooler: %s; sentence-transformers: %s%s)",
             folder, out_dir, plan.mlm_head, plan.pooler, st["written"],
             f"; ONNX: {', '.join(onnx_files)}" if onnx_files else "")
    return out_dir


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _objective(run_info: dict) -> dict:
    return {k: v for k, v in (run_info.get("recipe", {}).get("objective") or {}).items()
            if v is not None}


def _teacher_parts(run_info: dict, override: str | None) -> TeacherParts | None:
    """The teacher as recorded by the run (its folder, else its recipe spec resolved
    here), or ``override``; None with a warning when none can be read."""
    from distill_common.assets import AssetError, resolve_model_dir
    from distill_pretrain.engine import COMPUTE_DTYPES
    from distill_pretrain.teacher import TORCH_DTYPES

    recorded = run_info.get("teacher", {}).get("path")
    spec = override or run_info.get("recipe", {}).get("teacher", {}).get("path")
    try:
        folder = Path(recorded) if not override and recorded and Path(recorded).is_dir() \
            else resolve_model_dir(spec) if spec else None
    except AssetError as err:
        log.warning("export: teacher not found (%s); pass --teacher DIR_OR_ID to carry "
                    "its pooler and sentence-transformers layout over", err)
        return None
    if folder is None:
        return None
    dtype_name = run_info.get("recipe", {}).get("teacher", {}).get("dtype")
    dtype = TORCH_DTYPES[dtype_name] if dtype_name else \
        COMPUTE_DTYPES.get(run_info.get("precision", "fp32"), torch.float32)
    return read_teacher_parts(folder, dtype)


def _student_init(run_info: dict) -> dict | None:
    """How the student was initialised, as the run recorded it (student.initialise_student:
    which parts started from the teacher)."""
    return run_info.get("student_init")


def _publishable(run_info: dict) -> dict:
    """The run record without the corpus file lists (thousands of local paths)."""
    manifest = dict(run_info.get("manifest") or {})
    manifest["sources"] = [
        {k: v for k, v in s.items() if k != "files"} | {"n_files": len(s.get("files") or [])}
        if isinstance(s, dict) else s for s in manifest.get("sources") or []]
    return {**run_info, "manifest": manifest} if run_info else {}


def _card_facts(model, folder: Path, run_info: dict, plan, st: dict,
                parts: TeacherParts | None, onnx_files: list[str], speed: dict) -> CardFacts:
    from distill_common.assets import REGISTRY
    from distill_common.hub import hub_id_of_folder, parse_hub_spec

    cfg, arch = model.config, architecture_of(model.config)
    layers, hidden, heads = dims(cfg, arch)
    spec = run_info.get("recipe", {}).get("teacher", {}).get("path") or "teacher"
    asset = REGISTRY.get(spec)
    hub = hub_id_of_folder(parts.folder) if parts else None
    if hub is None and asset is None and parse_hub_spec(spec) and not Path(spec).exists():
        hub = parse_hub_spec(spec)
    name = hub.repo_id if hub else (asset.hub_id if asset and asset.hub_id
                                    else Path(spec).name)
    recorded = run_info.get("teacher", {})
    return CardFacts(
        name=f"{run_info.get('recipe', {}).get('name', 'student')}: a distilled "
             f"{arch.model_type} encoder",
        model_class=type(model).__name__, layers=layers, hidden=hidden, heads=heads,
        parameters=sum(p.numel() for p in model.base_model.parameters()),
        size_bytes=sum(p.stat().st_size for p in folder.glob("*.safetensors")),
        teacher_name=name, teacher_on_hub=bool(hub or (asset and asset.hub_id)),
        teacher_revision=hub.revision if hub else None,
        teacher_layers=recorded.get("layers"), teacher_hidden=recorded.get("hidden_size"),
        teacher_parameters=parts.parameters if parts else None,
        license=teacher_license(parts.folder if parts else None,
                                asset.license if asset else None),
        heads_plan=plan.record(), sentence_transformers=st, run_info=run_info,
        onnx_files=onnx_files, speed=speed)
