"""The module DeepSpeed wraps: the student and the objective in one ``nn.Module``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from distill_pretrain.architectures import apply_mlm_head
from distill_pretrain.capture import capture
from distill_pretrain.objective import DistillationObjective, rows_at
from distill_pretrain.objective_outputs import ObjectiveOutput, StudentOutputs, TeacherOutputs


class DistillModule(nn.Module):
    """Student + objective in one module, so the objective's projections are trained by
    the same (DeepSpeed) optimizer. ``state_dict`` keys: ``student.*``, ``objective.*``."""

    def __init__(self, student: nn.Module, objective: DistillationObjective,
                 eval_mlm: bool = True):
        """``eval_mlm``: measure the student's MLM accuracy at evaluation when no term
        needs its logits (a head copied from the teacher); False for a fresh head that
        no term trains, whose accuracy says nothing."""
        super().__init__()
        self.student = student
        self.objective = objective
        self.eval_mlm = eval_mlm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, teacher_out: TeacherOutputs,
                logit_index: Optional[torch.Tensor] = None) -> ObjectiveOutput:
        """``logit_index``: flat positions of the logit rows (DistillationObjective.
        logit_index), computed here when not given. Evaluation statistics only in eval
        mode."""
        objective = self.objective
        base, arch = self.student.base_model, objective.student_arch
        with capture(base, arch, objective.student_plan) as captured:
            out = base(input_ids=input_ids, attention_mask=attention_mask)
        last = out.last_hidden_state
        captured.hidden.setdefault(objective.student_shape.num_layers, last)
        logits = row_labels = None
        if objective.needs_mlm_logits:
            if logit_index is None:
                logit_index = objective.logit_index(attention_mask, labels)
            logits = apply_mlm_head(self.student, arch, rows_at(last, logit_index))
            row_labels = labels.reshape(-1).index_select(0, logit_index)
        elif not self.training and self.eval_mlm:  # evaluation: a copied head's accuracy
            with torch.no_grad():
                masked = labels != -100
                logits = apply_mlm_head(self.student, arch, last[masked])
                row_labels = labels[masked]
        student = StudentOutputs(captured, last, logits, row_labels)
        return objective(student, teacher_out, attention_mask, labels,
                         with_stats=not self.training)
