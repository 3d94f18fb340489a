"""What the teacher and student forwards record, and what the objective returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from distill_pretrain.capture import Captured


@dataclass
class TeacherSide:
    """What one teacher forward recorded, from which each term derives its target."""
    captured: Captured
    mlm_logits: Optional[torch.Tensor] = None
    """(N, vocab) at the objective's logit rows (masked positions, or all real tokens)."""


@dataclass
class TeacherOutputs:
    """The teacher's part of one batch, computed under no_grad (plain tensors): each
    term's target (teacher distributions, hidden states, ...), so the training step
    only computes the student side."""
    targets: dict[str, object] = field(default_factory=dict)
    """Term name -> its target (see the term builders in DistillationObjective)."""
    deepest_hidden: Optional[torch.Tensor] = None
    """(batch, seq, hidden) output of the deepest teacher layer that ran."""
    mlm_top1: Optional[torch.Tensor] = None
    """(N,) teacher's top-1 token at the logit rows, when its head ran."""


@dataclass
class StudentOutputs:
    captured: Captured
    last_hidden: torch.Tensor
    """(batch, seq, hidden)."""
    mlm_logits: Optional[torch.Tensor] = None
    """(N, vocab) at the objective's logit rows, or None when not computed."""
    logit_labels: Optional[torch.Tensor] = None
    """(N,) the labels at the logit rows (-100 where a row is not masked)."""


@dataclass
class ObjectiveOutput:
    total: torch.Tensor
    """Scalar fp32 with grad: sum of weight * part."""
    parts: dict[str, torch.Tensor]
    """Unweighted value of each term (detached scalars), for logging."""
    stats: dict[str, torch.Tensor]
    """Evaluation only (empty in training, where nobody reads them and each costs a
    boolean index, i.e. a host sync on a GPU). Detached fp32 scalars, summed over the
    batch (all-reduce with SUM):
    mlm_correct / mlm_count: student top-1 on masked positions (count 0 when no student
    logits were computed: MLM terms off and module in train mode);
    agreement_sum / agreement_count: teacher/student top-1 agreement on masked positions
    when both have logits, else cosine of the student's last hidden states with the
    deepest teacher layer run, over real tokens (widths differ: cosine of each token's
    row of token-token similarities)."""
