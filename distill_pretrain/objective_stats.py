"""Evaluation statistics of one batch: the student's MLM accuracy and its agreement with
the teacher (top-1 on masked positions when both have logits, else a cosine of the last
hidden states). Computed only in eval mode: each costs a boolean index."""

from __future__ import annotations

import torch

from distill_pretrain.objective_outputs import StudentOutputs, TeacherOutputs


@torch.no_grad()
def evaluation_stats(student: StudentOutputs, teacher: TeacherOutputs,
                     attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached fp32 sums over the batch (see ObjectiveOutput.stats)."""
    device = attention_mask.device
    zero = torch.zeros((), dtype=torch.float32, device=device)
    out = {"mlm_correct": zero, "mlm_count": zero, "agreement_sum": zero,
           "agreement_count": zero}
    if student.mlm_logits is not None:
        logits = student.mlm_logits
        row_labels = student.logit_labels
        masked = row_labels != -100
        # "token x is the student's top-1" as logit[x] >= max: amax is several times
        # cheaper than argmax over a (rows, vocab) tensor on CPU.
        best = logits.amax(-1)

        def is_top1(tokens: torch.Tensor) -> torch.Tensor:
            return logits.gather(-1, tokens.clamp(min=0)[:, None])[:, 0] >= best

        out["mlm_correct"] = is_top1(row_labels)[masked].sum().float()
        out["mlm_count"] = masked.sum().float()
        if teacher.mlm_top1 is not None:
            out["agreement_sum"] = is_top1(teacher.mlm_top1)[masked].sum().float()
            out["agreement_count"] = masked.sum().float()
            return out
    if teacher.deepest_hidden is not None:
        total, count = hidden_agreement(student.last_hidden, teacher.deepest_hidden,
                                        attention_mask)
        out["agreement_sum"], out["agreement_count"] = total, count
    return out


def hidden_agreement(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                     mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over real tokens of a cosine, number of real tokens). Equal widths: cosine of
    the two hidden states; else cosine of each token's row of token-token cosine
    similarities (real keys only), which needs no common width."""
    s, t = student_hidden.float(), teacher_hidden.float()
    weights = mask.to(torch.float32)
    if s.shape[-1] != t.shape[-1]:
        s_unit = torch.nn.functional.normalize(s, dim=-1)
        t_unit = torch.nn.functional.normalize(t, dim=-1)
        key_weights = weights[:, None, :]
        s = (s_unit @ s_unit.transpose(1, 2)) * key_weights  # (batch, seq, seq)
        t = (t_unit @ t_unit.transpose(1, 2)) * key_weights
    cos = torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)  # (batch, seq)
    return (cos * weights).sum(), weights.sum()
