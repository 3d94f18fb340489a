"""What the exported student carries besides its encoder: the MLM head only when it was
trained (or copied from the teacher), and the teacher's pooler.

MLM head: the student is trained as ``*ForMaskedLM``, but the minilm, minilmv2 and
tinybert recipes never train its head, and a fresh head is noise. So the folder holds the
head when an objective trained it (``mlm``, ``logit_kl``) or when it was copied from a
teacher that has one; otherwise it is saved as the base model class (``BertModel``), and
``AutoModelForMaskedLM`` on it says, as transformers does for any headless checkpoint,
that the head is newly initialised.

Pooler (dense + tanh on the first token, what BERT's sequence classifier reads): the
masked-LM student has none, so without it ``AutoModelForSequenceClassification`` starts
the student with a random pooler and the teacher with its trained one. It is carried over
when the student's hidden space starts from the teacher's: copied when the embeddings
were copied (same width), and projected with the embeddings' SVD basis P (teacher width x
student width) when they were projected: W_s = P^T W P, b_s = P^T b, the teacher's pooler
read in the student's coordinates; sliced to the kept hidden channels when the student was
pruned out of the teacher (W_s = W[kept][:, kept], b_s = b[kept]). Otherwise (random embeddings, a teacher checkpoint
without pooler weights, no teacher folder at export) the student has no pooler, and
``distill_run.json``'s ``export.pooler`` says so for the fine-tuning report.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from distill_pretrain.architectures import Architecture

log = logging.getLogger(__name__)


@dataclass
class TeacherParts:
    """What the export reads from the teacher folder."""
    folder: Path
    config: object
    arch: Architecture
    has_mlm_head: bool
    parameters: int
    """Of the base model (``AutoModel``: encoder and pooler), for the compression figure."""
    pooler: Optional[dict[str, torch.Tensor]]
    """The trained pooler's state (fp32); None when the checkpoint holds none."""
    word_embeddings: torch.Tensor
    """In the dtype the student was built from (its SVD init is recomputed from it)."""


@dataclass
class HeadPlan:
    mlm_head: str
    """trained (an objective trained it) | teacher (copied, not trained) | none (not saved)."""
    pooler: str
    """teacher (copied) | teacher_svd (projected on the embeddings' SVD basis) |
    teacher_pruned (cut to a pruned student's hidden channels) | fresh (not
    saved: fine-tuning starts it at random) | none (the family has no pooler)."""
    teacher_has_pooler: Optional[bool]
    """Whether the teacher checkpoint holds trained pooler weights (None: not known)."""
    note: str
    """One sentence for the model card and the fine-tuning report."""

    def record(self) -> dict:
        """``distill_run.json``'s ``export`` entry. ``fresh_pooler_only_in_student``: the
        student starts fine-tuning with a random pooler while the teacher has a trained
        one, so a fair comparison resets the teacher's too."""
        return asdict(self) | {"fresh_pooler_only_in_student":
                               self.pooler == "fresh" and self.teacher_has_pooler is not False}


def read_teacher_parts(folder: Path, dtype: torch.dtype) -> TeacherParts:
    """Load the teacher's base model once (fp32) and keep the parts the export needs."""
    from transformers import AutoModel

    from distill_common.hf_quiet import quiet_hf_loading
    from distill_pretrain.teacher import has_mlm_head, read_teacher_config

    folder, hf_config, arch = read_teacher_config(str(folder))
    with quiet_hf_loading():  # a missing pooler is reported by us, not as a warning
        model, info = AutoModel.from_pretrained(folder, dtype=torch.float32,
                                                output_loading_info=True)
    pooler = None
    module = getattr(model, arch.pooler, None) if arch.pooler else None
    if module is not None and not any(k.startswith(f"{arch.pooler}.")
                                      for k in info["missing_keys"]):
        pooler = {k: v.detach().clone() for k, v in module.state_dict().items()}
    word = model.get_submodule(arch.embeddings).get_submodule(arch.word_embeddings).weight
    return TeacherParts(folder=folder, config=hf_config, arch=arch,
                        has_mlm_head=has_mlm_head(folder, arch),
                        parameters=sum(p.numel() for p in model.parameters()),
                        pooler=pooler, word_embeddings=word.detach().to(dtype))


def mlm_head_state(trained: bool, student_init: Optional[dict]) -> str:
    """What the student's MLM head is worth: "trained" (a term trains it), "teacher"
    (copied from the teacher, untouched) or "none" (fresh and untrained: noise, neither
    scored at evaluation nor exported). ``trained``: an objective term uses its logits."""
    copied = bool(student_init) and student_init.get("mlm_head") == "teacher"
    return "trained" if trained else "teacher" if copied else "none"


def plan_heads(objective: dict, student_init: Optional[dict], arch: Architecture,
               teacher: Optional[TeacherParts]) -> HeadPlan:
    mlm_head = mlm_head_state(bool(objective.get("mlm") or objective.get("logit_kl")),
                              student_init)
    embeddings = (student_init or {}).get("embeddings")
    if arch.pooler is None:
        return HeadPlan(mlm_head, "none", None, f"{arch.model_type} models have no pooler")
    if teacher is None:
        return HeadPlan(mlm_head, "fresh", None, "the teacher folder was not found at "
                        "export: the student has no pooler and starts fine-tuning with a "
                        "fresh one")
    if teacher.pooler is None:
        return HeadPlan(mlm_head, "fresh", False, "the teacher checkpoint has no trained "
                        "pooler: teacher and student both start fine-tuning with a fresh one")
    if embeddings == "copy":
        return HeadPlan(mlm_head, "teacher", True, "the teacher's pooler, copied")
    if embeddings == "svd":
        return HeadPlan(mlm_head, "teacher_svd", True, "the teacher's pooler, projected on the "
                        "SVD basis the student's embeddings were initialised with")
    if embeddings == "pruned":
        return HeadPlan(mlm_head, "teacher_pruned", True, "the teacher's pooler, cut to the "
                        "hidden channels the student was pruned to")
    return HeadPlan(mlm_head, "fresh", True, "the student's embeddings started at random, so "
                    "the teacher's pooler does not fit it: the student starts fine-tuning "
                    "with a fresh pooler, the teacher with its trained one")


def student_pooler(plan: HeadPlan, teacher: TeacherParts, width: int,
                   kept_channels: Optional[list[int]] = None
                   ) -> Optional[dict[str, torch.Tensor]]:
    """The pooler state the student is saved with, or None. ``kept_channels``: the
    teacher channel of each student channel (a width-pruned student)."""
    if plan.pooler == "teacher":
        return dict(teacher.pooler)
    if plan.pooler == "teacher_pruned":
        if kept_channels is None:  # same width: nothing was cut
            return dict(teacher.pooler)
        kept = torch.tensor(kept_channels)
        weight, bias = teacher.pooler["dense.weight"], teacher.pooler["dense.bias"]
        return {"dense.weight": weight[kept][:, kept], "dense.bias": bias[kept]}
    if plan.pooler != "teacher_svd":
        return None
    from distill_pretrain.student import svd_projection

    p = svd_projection(teacher.word_embeddings, width)  # (teacher width, width)
    weight, bias = teacher.pooler["dense.weight"], teacher.pooler["dense.bias"]
    return {"dense.weight": p.T @ weight @ p, "dense.bias": bias @ p}


def export_model(mlm_model: nn.Module, arch: Architecture, plan: HeadPlan,
                 pooler: Optional[dict[str, torch.Tensor]]) -> nn.Module:
    """The module to save: the masked-LM model or its base model class, with the pooler
    (or explicitly none, so that no random pooler is saved as if it were trained)."""
    from transformers import AutoModel

    if plan.mlm_head == "none":
        model = AutoModel.from_config(mlm_model.config)
        missing, unexpected = model.load_state_dict(mlm_model.base_model.state_dict(),
                                                    strict=False)
        stray = [k for k in missing if not k.startswith(f"{arch.pooler}.")] + unexpected
        if stray:
            raise RuntimeError(f"base model and masked-LM model differ: {stray[:5]}")
        base = model
    else:
        model, base = mlm_model, mlm_model.base_model
    if arch.pooler is not None:
        if pooler is None:
            setattr(base, arch.pooler, None)
        else:
            if getattr(base, arch.pooler, None) is None:
                fresh = AutoModel.from_config(mlm_model.config)
                setattr(base, arch.pooler, fresh.get_submodule(arch.pooler))
            base.get_submodule(arch.pooler).load_state_dict(pooler)
    return model.float().eval()
