"""The distillation losses: pure functions on tensors, one per objective.

Shared conventions:
- ``mask`` is the batch's attention mask (batch, seq), 1 on real tokens, 0 on padding;
  padding never counts, as a query or as a key, and an all-padding row adds nothing
  (no NaN: denominators are clamped, masked scores use a large finite negative).
- Everything is computed in float32, whatever the inputs' dtype (bf16/fp16 models).
- Each returns a scalar; with nothing to average over it returns 0 (still differentiable).
- KL terms are KL(teacher || student): sum over the distribution, mean over the rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MASKED_SCORE = -1e9
"""Added to padded keys' scores: exp underflows to exactly 0 in fp32, unlike -inf it
never makes 0 * inf = NaN, and a row of only padding stays a (uniform) distribution."""


def _fp32_matmuls(like: torch.Tensor):
    """Keep our matmuls in fp32 even inside a caller's torch.autocast region."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def _mean_over(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(values * weights) / sum(weights), 0 when the weights are all 0."""
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def _token_weights(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.float32)


# ------------------------------------------------------------ masked-LM logits

def soft_targets(teacher_logits: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher side of the soft-target KL, computed once without grad: probabilities
    softmax(t/T) (N, vocab) and sum_v p log p per row (N,)."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    p = log_p.exp()
    return p, (p * log_p).sum(-1)


def soft_target_kl_to(student_logits: torch.Tensor, target_probs: torch.Tensor,
                      target_neg_entropy: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p || softmax(s/T)) * T^2 from precomputed ``soft_targets``; mean over rows.
    Written as sum p log p - sum p s/T + logsumexp(s/T): no (N, vocab) log-softmax of
    the student is materialised, and its gradient is softmax(s/T) - p."""
    if student_logits.shape[0] == 0:
        return student_logits.float().sum() * 0.0
    scaled = student_logits.float() / temperature
    with _fp32_matmuls(scaled):
        cross = torch.einsum("nv,nv->n", target_probs, scaled)
    kl = target_neg_entropy - cross + torch.logsumexp(scaled, dim=-1)
    return kl.mean() * temperature ** 2


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """DistilBERT soft targets. Logits (N, vocab) at the N selected positions (masked
    ones, or all real tokens); KL(softmax(t/T) || softmax(s/T)) * T^2, mean over N."""
    return soft_target_kl_to(student_logits, *soft_targets(teacher_logits, temperature),
                             temperature)


def mlm_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked-LM loss. ``student_logits`` (N, vocab) and ``labels`` (N,) with -100 on the
    rows that do not count; mean over the rest."""
    weights = (labels != -100).to(torch.float32)
    per_row = F.cross_entropy(student_logits.float(), labels.clamp(min=0), reduction="none")
    return _mean_over(per_row, weights)


# ------------------------------------------------------------ hidden states

def hidden_cosine(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """DistilBERT: mean over real tokens of 1 - cos(h_s, h_t); (batch, seq, hidden) each,
    equal widths."""
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1,
                              eps=1e-8)  # (batch, seq)
    return _mean_over(1.0 - cos, _token_weights(mask))


def _token_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor):
    per_token = (student.float() - teacher.float()).pow(2).mean(-1)  # (batch, seq)
    return _mean_over(per_token, _token_weights(mask))


def hidden_mse(student_hidden_projected: torch.Tensor, teacher_hidden: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """TinyBERT: MSE(H_s W_h, H_t), mean over real tokens and features. The caller
    applies the learned projection W_h (student width -> teacher width)."""
    return _token_mse(student_hidden_projected, teacher_hidden, mask)


def embedding_mse(student_embeddings_projected: torch.Tensor,
                  teacher_embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TinyBERT: MSE(E_s W_e, E_t) of the embedding-layer outputs, over real tokens."""
    return _token_mse(student_embeddings_projected, teacher_embeddings, mask)


# ------------------------------------------------------------ attention

def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, seq, heads * d) -> (batch, heads, seq, d)."""
    b, s, width = x.shape
    return x.reshape(b, s, heads, width // heads).transpose(1, 2)


def attention_scores(query: torch.Tensor, key: torch.Tensor, heads: int,
                     position_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pre-softmax scores Q K^T / sqrt(d_head) (+ MPNet's position bias), fp32, without
    the padding mask: (batch, seq, heads*d) x2 -> (batch, heads, seq, seq)."""
    q = split_heads(query.float(), heads)
    k = split_heads(key.float(), heads)
    with _fp32_matmuls(q):
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # scale the small side
    if position_bias is not None:
        scores = scores + position_bias.float()
    return scores


def _pair_weights(mask: torch.Tensor) -> torch.Tensor:
    m = _token_weights(mask)
    return m[:, None, :, None] * m[:, None, None, :]  # (batch, 1, seq, seq)


def attention_score_mse(student_scores: torch.Tensor, teacher_scores: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """TinyBERT: MSE of pre-softmax scores (batch, heads, seq, seq), equal head counts;
    mean over heads and (query, key) pairs of real tokens."""
    sq = (student_scores.float() - teacher_scores.float()).pow(2)
    weights = _pair_weights(mask).expand_as(sq)
    return _mean_over(sq, weights)


def _key_bias(mask: torch.Tensor) -> torch.Tensor:
    """(batch, 1, 1, seq): 0 on real keys, MASKED_SCORE on padding."""
    return (1.0 - _token_weights(mask))[:, None, None, :] * MASKED_SCORE


def target_distribution(teacher_scores: torch.Tensor,
                        mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher side of a distribution KL, computed once without grad: softmax over real
    keys (batch, heads, seq, seq; exactly 0 on padded keys) and sum_k p log p per row
    (batch, heads, seq)."""
    log_p = F.log_softmax(teacher_scores.float() + _key_bias(mask), dim=-1)
    p = log_p.exp()
    neg_entropy = torch.where(mask.bool()[:, None, None, :], p * log_p, 0.0).sum(-1)
    return p, neg_entropy


def kl_to_target(student_scores: torch.Tensor, target_probs: torch.Tensor,
                 target_neg_entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(student scores)) over real keys, mean over heads and real
    queries; = sum p log p - sum p s + logsumexp(s) per row, so the student's
    log-softmax (a full batch x heads x seq x seq tensor) is never materialised."""
    scores = student_scores.float() + _key_bias(mask)
    with _fp32_matmuls(scores):
        cross = torch.einsum("bhqk,bhqk->bhq", target_probs, scores)
    kl = target_neg_entropy - cross + torch.logsumexp(scores, dim=-1)  # (batch, heads, seq)
    query_weights = _token_weights(mask)[:, None, :].expand_as(kl)
    return _mean_over(kl, query_weights)


def distribution_kl(student_scores: torch.Tensor, teacher_scores: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) of score tensors (batch, heads, seq, seq)
    over real keys; mean over heads and real queries."""
    return kl_to_target(student_scores, *target_distribution(teacher_scores, mask), mask)


def attention_kl(student_scores: torch.Tensor, teacher_scores: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """MiniLM: KL of the self-attention distributions, per head (equal head counts)."""
    return distribution_kl(student_scores, teacher_scores, mask)


def relation_scores(x: torch.Tensor, relation_heads: int) -> torch.Tensor:
    """MiniLMv2 relation logits: X (batch, seq, width) re-split into R heads of width/R,
    X_r X_r^T / sqrt(width/R) -> (batch, R, seq, seq)."""
    return attention_scores(x, x, relation_heads)


class _RelationKL(torch.autograd.Function):
    """sum over rows of w * KL(p || softmax(X X^T + bias)) for X (batch, R, seq, d), already
    scaled by d^-1/4. Backward recomputes the (batch, R, seq, seq) scores instead of
    keeping them: autograd would hold two such tensors per relation for the backward
    pass, the largest activations of a MiniLMv2 step."""

    @staticmethod
    def forward(ctx, x, target_probs, target_neg_entropy, key_bias, row_weights):
        with _fp32_matmuls(x):
            scores = x @ x.transpose(-1, -2)
            scores += key_bias
            lse = torch.logsumexp(scores, dim=-1)  # (batch, R, seq)
            cross = torch.einsum("bhqk,bhqk->bhq", target_probs, scores)
        ctx.save_for_backward(x, target_probs, key_bias, lse, row_weights)
        return ((target_neg_entropy - cross + lse) * row_weights).sum()

    @staticmethod
    def backward(ctx, grad):
        x, target_probs, key_bias, lse, row_weights = ctx.saved_tensors
        # d KL_row / d scores = softmax(scores) - p; scores = X X^T is symmetric in X.
        with _fp32_matmuls(x):
            g = x @ x.transpose(-1, -2)
            g += key_bias
            g -= lse[..., None]
            g.exp_()
            g -= target_probs
            g *= (row_weights * grad)[..., None]
            return g @ x + g.transpose(-1, -2) @ x, None, None, None, None


def relation_kl_to_target(student_x: torch.Tensor, relation_heads: int,
                          target_probs: torch.Tensor, target_neg_entropy: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(relation_scores(student_x))), mean over R heads and real
    queries; equal to ``kl_to_target(relation_scores(x), ...)`` with less memory."""
    x = split_heads(student_x.float(), relation_heads)
    x = x * x.shape[-1] ** -0.25  # both factors of X X^T: 1/sqrt(d) overall
    row_weights = _token_weights(mask)[:, None, :].expand(-1, relation_heads, -1)
    total = _RelationKL.apply(x, target_probs, target_neg_entropy, _key_bias(mask),
                              row_weights.contiguous())
    return total / row_weights.sum().clamp(min=1.0)


def relation_kl(student_x: torch.Tensor, teacher_x: torch.Tensor, relation_heads: int,
                mask: torch.Tensor) -> torch.Tensor:
    """MiniLMv2: X is Q, K or V of one layer, (batch, seq, width), all heads concatenated;
    each side is re-split into R relation heads of width/R, relation =
    softmax(X_r X_r^T / sqrt(width/R)); KL(teacher || student). Widths may differ."""
    target = target_distribution(relation_scores(teacher_x, relation_heads), mask)
    return relation_kl_to_target(student_x, relation_heads, *target, mask)


def value_relation_kl(student_value: torch.Tensor, teacher_value: torch.Tensor,
                      heads: int, mask: torch.Tensor) -> torch.Tensor:
    """MiniLM: KL of softmax(V_h V_h^T / sqrt(d_head)) per attention head (equal head
    counts: head h of both models is columns h*d..(h+1)*d of V)."""
    return relation_kl(student_value, teacher_value, heads, mask)
