"""Export a checkpoint as a plain Hugging Face folder: ``config.json``,
``model.safetensors``, the tokenizer files and a model card ``README.md``.

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


def export_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    """Write the HF folder for the checkpoint at ``path`` to ``out_dir`` (atomically)."""
    from distill_common.fsio import atomic_dir

    folder = resolve_checkpoint(path)
    bad = ckpt.verify(folder)
    if bad:  # DeepSpeed's files are pickles: never load one this system did not write
        raise ExportUserError(f"{folder}: {len(bad)} file(s) missing or changed since the "
                              f"checkpoint was saved ({', '.join(bad[:3])}); it is not "
                              f"loaded. Export another checkpoint of the run")
    model = load_student(folder)
    run_info = _read_json(folder / "hf" / "run_info.json")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for item in (folder / "hf").iterdir():
            if item.name not in ("config.json", "run_info.json") and item.is_file():
                shutil.copy2(item, tmp / item.name)
        (tmp / "README.md").write_text(model_card(model, run_info, folder))
        if run_info:
            (tmp / "distill_run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    log.info("exported %s -> %s", folder, out_dir)
    return out_dir


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def model_card(model, run_info: dict, folder: Path) -> str:
    cfg = model.config
    params = sum(p.numel() for p in model.base_model.parameters())
    recipe = run_info.get("recipe", {})
    teacher = run_info.get("teacher", {})
    manifest = run_info.get("manifest", {})
    objective = {k: v for k, v in (recipe.get("objective") or {}).items() if v is not None}
    final = run_info.get("final_eval", {})
    lines = [
        "---", "library_name: transformers", "pipeline_tag: fill-mask",
        "tags: [distillation, task-agnostic]", "---", "",
        f"# {recipe.get('name', 'student')}: a task-agnostic distilled encoder", "",
        f"A {getattr(cfg, 'num_hidden_layers', '?')}-layer, "
        f"{getattr(cfg, 'hidden_size', '?')}-wide `{type(model).__name__}` "
        f"({params / 1e6:.1f}M parameters without the MLM head) distilled from "
        f"`{teacher.get('path', '?')}` ({teacher.get('layers', '?')} layers x "
        f"{teacher.get('hidden_size', '?')}, MLM head: {teacher.get('has_mlm_head', '?')}) "
        f"with `distill pretrain`. Load it with `AutoModel` or `AutoModelForMaskedLM`; "
        f"fine-tune with `distill finetune`.", "",
        "## Recipe", "",
        f"- objective: `{json.dumps(objective)}`",
        f"- student: `{json.dumps(recipe.get('student', {}))}`",
        f"- steps: {run_info.get('step', '?')} (skipped non-finite: "
        f"{run_info.get('skipped_steps', 0)}), sequences seen: {run_info.get('samples', '?')}, "
        f"tokens: {run_info.get('tokens', '?')}",
        f"- precision: {run_info.get('precision', '?')}, ranks: {run_info.get('world_size', '?')}, "
        f"seed: {recipe.get('seed', '?')}",
        f"- train: `{json.dumps(recipe.get('train', {}))}`", "",
        "## Data", "",
        f"- tokenizer: `{manifest.get('tokenizer', '?')}`, sequence length "
        f"{manifest.get('seq_len', '?')}",
        f"- sources: {manifest.get('sources', '?')}",
    ]
    for split, s in (manifest.get("splits") or {}).items():
        lines.append(f"- {split}: {s.get('samples')} sequences, {s.get('tokens')} tokens, "
                     f"{s.get('shards')} shards")
    lines += ["", "## Final evaluation (validation shards)", ""]
    if final:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(final.items())]
    else:
        lines.append("(not recorded)")
    lines += ["", f"Exported from `{folder}`.", ""]
    return "\n".join(lines)
