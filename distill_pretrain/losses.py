"""The distillation losses: pure functions on tensors, one per objective.

Shared conventions:
- ``mask`` is the batch's attention mask (batch, seq), 1 on real tokens, 0 on padding;
  padding never counts, as a query or as a key, and an all-padding row adds nothing
  (no NaN: denominators are clamped, masked scores use a large finite negative).
- Everything is computed in float32, whatever the inputs' dtype (bf16/fp16 models).
- Each returns a scalar; with nothing to average over it returns 0 (still differentiable).
- KL terms are KL(teacher || student): sum over the distribution, mean over the rows.

Length: every objective's loss is here, each pure function beside the fused autograd
function that computes it tile by tile (the two are tested against each other), so that
a loss is read in one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill_pretrain import kernels

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


class _SoftTargetCross(torch.autograd.Function):
    """-sum over rows of sum_v p log softmax(s / T) for logits s (N, vocab): rows in tiles
    of about TILE_BYTES, gradient (softmax(s/T) - p) / T computed in the same pass while
    the tile is in cache (the loss is a scalar, always followed by its backward)."""

    @staticmethod
    def forward(ctx, logits, target_probs, temperature, want_grad):
        n, vocab = logits.shape
        cross = torch.zeros((), dtype=torch.float32, device=logits.device)
        grad_logits = (torch.empty(n, vocab, dtype=torch.float32, device=logits.device)
                       if want_grad else None)
        with _fp32_matmuls(logits):
            for i, j in _tiles(n, vocab * 4, logits.device):
                log_q = torch.log_softmax(logits[i:j].float() * (1.0 / temperature), dim=-1)
                cross -= torch.dot(target_probs[i:j].reshape(-1), log_q.view(-1))
                if want_grad:
                    torch.sub(log_q.exp_(), target_probs[i:j], out=grad_logits[i:j])
        if want_grad:
            grad_logits *= 1.0 / temperature
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(grad_logits)
        return cross

    @staticmethod
    def backward(ctx, grad):
        grad_logits, = ctx.saved_tensors
        return (grad_logits * grad).to(ctx.logits_dtype), None, None, None


def soft_target_kl_to(student_logits: torch.Tensor, target_probs: torch.Tensor,
                      target_neg_entropy: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p || softmax(s/T)) * T^2 from precomputed ``soft_targets``; mean over rows.
    Fused and tiled (see _SoftTargetCross): no (N, vocab) log-softmax of the student is
    stored."""
    if student_logits.shape[0] == 0:
        return student_logits.float().sum() * 0.0
    cross = _SoftTargetCross.apply(student_logits, target_probs.float(), temperature,
                                   torch.is_grad_enabled() and student_logits.requires_grad)
    kl_sum = target_neg_entropy.float().sum() + cross
    return kl_sum / student_logits.shape[0] * temperature ** 2


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


# ------------------------------------------------------------ pooled (sentence) embeddings

def span_pool(hidden: torch.Tensor, mask: torch.Tensor,
              span: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the real tokens of each span of ``span`` consecutive positions (0: the
    whole sequence): (batch * spans, width) embeddings, row b * spans + k for span k of
    sequence b, and (batch * spans,) weights, 1 for a span with a real token, else 0."""
    hidden, weights = hidden.float(), mask.to(torch.float32)
    batch, seq, width = hidden.shape
    span = span or max(seq, 1)
    spans = -(-seq // span)
    if spans * span > seq:  # the last span is short: pad it with non-tokens
        hidden = F.pad(hidden, (0, 0, 0, spans * span - seq))
        weights = F.pad(weights, (0, spans * span - seq))
    weights = weights.reshape(batch, spans, span)
    counts = weights.sum(-1)
    summed = (hidden.reshape(batch, spans, span, width) * weights.unsqueeze(-1)).sum(2)
    pooled = summed / counts.clamp(min=1.0).unsqueeze(-1)
    return pooled.reshape(batch * spans, width), (counts > 0).to(torch.float32).reshape(-1)


def pooled_cosine(student_pooled: torch.Tensor, teacher_pooled: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """Mean over the counted spans of 1 - cos(e_s, e_t); (spans, width) each, equal widths
    (the caller projects the student's)."""
    cos = F.cosine_similarity(student_pooled.float(), teacher_pooled.float(), dim=-1,
                              eps=1e-8)
    return _mean_over(1.0 - cos, weights)


def similarity_matrix(pooled: torch.Tensor) -> torch.Tensor:
    """(spans, spans) cosine similarities of every pair of span embeddings."""
    unit = F.normalize(pooled.float(), dim=-1, eps=1e-8)
    with _fp32_matmuls(unit):
        return unit @ unit.transpose(0, 1)


def pooled_relation_mse(student_pooled: torch.Tensor, teacher_similarity: torch.Tensor,
                        weights: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of distinct counted spans of (cos_s(i, j) - cos_t(i, j))^2: the
    in-batch similarity structure, whatever the two widths."""
    pairs = weights[:, None] * weights[None, :]
    pairs = pairs * (1.0 - torch.eye(pairs.shape[0], device=pairs.device))
    diff = similarity_matrix(student_pooled) - teacher_similarity.float()
    return _mean_over(diff * diff, pairs)


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


class _ScoreMSE(torch.autograd.Function):
    """sum over (query, key) pairs of w_q w_k (Q K^T - T)^2 for Q (n, seq, d) already
    scaled by d^-1/2, K (n, seq, d) and teacher scores T (n, seq, seq); tiled, with the
    gradient computed in the same pass (see _RelationKL)."""

    @staticmethod
    def forward(ctx, q, k, teacher_scores, row_weights, want_grad):
        n, seq, _ = q.shape
        total = q.new_zeros(())
        want_q, want_k = want_grad and q.requires_grad, want_grad and k.requires_grad
        dq = torch.empty_like(q) if want_q else None
        dk = torch.empty_like(k) if want_k else None
        padded = _padded(row_weights)
        with _fp32_matmuls(q):
            for i, j in _tiles(n, seq * seq * 4, q.device):
                qi, ki = q[i:j], k[i:j]
                diff = torch.baddbmm(teacher_scores[i:j], qi, ki.transpose(1, 2), beta=-1)
                weighted = diff
                if any(padded[i:j]):  # padding counts neither as query nor as key
                    wi = row_weights[i:j]
                    weighted = diff * wi[:, :, None]
                    weighted.mul_(wi[:, None, :])
                total += torch.dot(diff.view(-1), weighted.view(-1))
                if want_q:  # d/dS of the sum: 2 * weighted, the 2 applied in backward
                    torch.bmm(weighted, ki, out=dq[i:j])
                if want_k:
                    torch.bmm(weighted.transpose(1, 2), qi, out=dk[i:j])
        ctx.save_for_backward(dq, dk)
        return total

    @staticmethod
    def backward(ctx, grad):
        dq, dk = ctx.saved_tensors
        scale = 2.0 * grad
        return (None if dq is None else dq * scale, None if dk is None else dk * scale,
                None, None, None)


def attention_score_mse_qk(query: torch.Tensor, key: torch.Tensor, heads: int,
                           teacher_scores: torch.Tensor, mask: torch.Tensor,
                           position_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``attention_score_mse(attention_scores(query, key, heads, position_bias), ...)``
    from the student's Q and K (batch, seq, heads * d): fused and tiled, so the student's
    (batch, heads, seq, seq) scores are never stored. With a position bias (MPNet),
    which has its own gradient, the plain autograd form is used."""
    if position_bias is not None:
        return attention_score_mse(attention_scores(query, key, heads, position_bias),
                                   teacher_scores, mask)
    b, seq, width = query.shape
    q = _matrices(query, heads) * (width // heads) ** -0.5
    k = _matrices(key, heads)
    row_weights = _per_matrix(_token_weights(mask), heads)  # (n, seq)
    total = _ScoreMSE.apply(q, k, teacher_scores.reshape(-1, seq, seq).float(), row_weights,
                            torch.is_grad_enabled())
    pairs = (_token_weights(mask).sum(-1) ** 2).sum() * heads
    return total / pairs.clamp(min=1.0)


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


TILE_BYTES = 1 << 20
"""Size of the fp32 score tiles the fused losses work on. A MiniLMv2 relation at batch 32,
R=48, seq 128 is a 100 MB (batch, R, seq, seq) tensor; every elementwise pass over it
goes through memory. The fused losses compute the scores of a few (seq, seq) matrices,
use them and drop them while they are still in a core's cache (L2 is 1-2 MB)."""


ACCELERATOR_TILE_BYTES = 64 << 20
"""On a GPU the win of cache-sized tiles is small and each tile costs kernel launches:
large tiles there, which still bound the temporaries' memory."""


def _tiles(count: int, bytes_each: int, device: torch.device) -> list[tuple[int, int]]:
    """[start, stop) ranges over ``count`` items, about TILE_BYTES per range on CPU."""
    budget = TILE_BYTES if device.type == "cpu" else ACCELERATOR_TILE_BYTES
    step = max(1, budget // max(1, bytes_each))
    return [(i, min(count, i + step)) for i in range(0, count, step)]


def _matrices(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, seq, heads * d) -> (batch * heads, seq, d), fp32, contiguous."""
    b, s, width = x.shape
    return split_heads(x.float(), heads).reshape(b * heads, s, width // heads).contiguous()


def _per_matrix(values: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, 1 | seq...) per sequence -> repeated for each head: (batch * heads, ...)."""
    return values.unsqueeze(1).expand(-1, heads, *values.shape[1:]).reshape(
        -1, *values.shape[1:]).contiguous()


def _padded(row_weights: torch.Tensor) -> list[bool]:
    """Per matrix: has it a padded row? Tiles without one skip the weighting passes. On
    an accelerator every tile is weighted instead: reading the answer would make the
    host wait for the GPU (a sync per loss call), and there the weighting is cheap."""
    if row_weights.device.type != "cpu":
        return [True] * row_weights.shape[0]
    return (row_weights == 0).any(dim=-1).tolist()


def _relation_inputs(x: torch.Tensor, relation_heads: int, mask: torch.Tensor):
    """X (batch, seq, width) -> its R relation matrices (n, seq, d) and the key bias of
    each (n, 1, seq), n = batch * R."""
    return (_matrices(x, relation_heads),
            _per_matrix(_key_bias(mask)[:, 0], relation_heads))


def _log_relation(x: torch.Tensor, x_t: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
    """log softmax(X X^T / sqrt(d) + key bias) of a tile of relation matrices."""
    return torch.log_softmax(
        torch.baddbmm(key_bias, x, x_t, alpha=x.shape[-1] ** -0.5), dim=-1)


class _RelationKL(torch.autograd.Function):
    """sum over rows of w * (-sum_k p log softmax(s)) with s = X X^T / sqrt(d) + key bias,
    for X (n, seq, d); the constant sum p log p is added by the caller. Works tile by
    tile (see TILE_BYTES) and computes the gradient in the same pass, while each tile's
    softmax is in cache: a scalar loss is always followed by its backward, which then
    only scales the saved gradient (the size of X)."""

    @staticmethod
    def forward(ctx, x, target_probs, key_bias, row_weights, want_grad):
        n, seq, d = x.shape
        cross = x.new_zeros(())
        x_t = x.transpose(1, 2)
        # the gradient is computed transposed, (n, d, seq): X^T G has wide rows, which
        # the matmul kernels handle ~1.7x faster than G X's rows of d = width / R
        dx_t = x.new_empty(n, d, seq) if want_grad else None
        padded = _padded(row_weights)
        with _fp32_matmuls(x):
            for i, j in _tiles(n, seq * seq * 4, x.device):
                pi = target_probs[i:j]
                log_q = _log_relation(x[i:j], x_t[i:j], key_bias[i:j])
                wi = row_weights[i:j, :, None] if any(padded[i:j]) else None
                if wi is not None:
                    log_q.mul_(wi)  # padded queries count nowhere
                cross += torch.dot(pi.reshape(-1), log_q.view(-1))
                if want_grad:
                    # d/ds of a row's KL = softmax(s) - p; s = X X^T is symmetric in X.
                    g = log_q.exp_().sub_(pi)
                    if wi is not None:
                        g.mul_(wi)
                    torch.bmm(x_t[i:j], g, out=dx_t[i:j])
                    dx_t[i:j].baddbmm_(x_t[i:j], g.transpose(1, 2))
        ctx.scale = d ** -0.5  # of the gradient too: d s / d X = scale (G X + G^T X)
        ctx.save_for_backward(None if dx_t is None else dx_t.transpose(1, 2))
        return -cross

    @staticmethod
    def backward(ctx, grad):
        dx, = ctx.saved_tensors
        return dx * (grad * ctx.scale), None, None, None, None


def _kernel_inputs(x: torch.Tensor, relation_heads: int, mask: torch.Tensor):
    """For the fused CPU kernels: X^T of each relation matrix (n, d, seq), fp32,
    contiguous, and the key bias (n, seq)."""
    b, s, width = x.shape
    d = width // relation_heads
    xt = x.float().view(b, s, relation_heads, d).permute(0, 2, 3, 1).reshape(
        b * relation_heads, d, s).contiguous()
    return xt, _per_matrix(_key_bias(mask)[:, 0, 0], relation_heads)


class _RelationKernelKL(_RelationKL):
    """``_RelationKL`` on the fused CPU kernel (kernels/relation.c), taking X^T (n, d, seq):
    the same loss and saved gradient (so the same backward), one row at a time in L1
    instead of tiles of (seq, seq) matrices."""

    @staticmethod
    def forward(ctx, xt, target_probs, key_bias, row_weights, want_grad):
        ctx.scale = xt.shape[1] ** -0.5
        cross, dxt = kernels.relation_kl(xt, key_bias, row_weights, target_probs, ctx.scale,
                                         want_grad)
        ctx.save_for_backward(dxt)
        return -cross


def relation_target(teacher_x: torch.Tensor, relation_heads: int,
                    mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher side of a relation KL, without grad: ``target_distribution`` of
    ``relation_scores(teacher_x, relation_heads)``, computed tile by tile (or row by row
    in the fused CPU kernel)."""
    b, seq, _ = teacher_x.shape
    with torch.no_grad(), _fp32_matmuls(teacher_x):
        if kernels.usable(teacher_x.shape[-1] // relation_heads, teacher_x):
            xt, key_bias = _kernel_inputs(teacher_x, relation_heads, mask)
            probs, neg_entropy = kernels.relation_target(xt, key_bias, xt.shape[1] ** -0.5)
            return (probs.view(b, relation_heads, seq, seq),
                    neg_entropy.view(b, relation_heads, seq))
        x, key_bias = _relation_inputs(teacher_x, relation_heads, mask)
        n = x.shape[0]
        x_t = x.transpose(1, 2)
        probs = x.new_empty(n, seq, seq)
        neg_entropy = x.new_empty(n, seq)
        for i, j in _tiles(n, seq * seq * 4, x.device):
            log_p = _log_relation(x[i:j], x_t[i:j], key_bias[i:j])
            torch.exp(log_p, out=probs[i:j])
            # padded keys: p is exactly 0 and log p finite, so they add nothing
            torch.sum(log_p.mul_(probs[i:j]), dim=-1, out=neg_entropy[i:j])
    return (probs.view(b, relation_heads, seq, seq),
            neg_entropy.view(b, relation_heads, seq))


def relation_kl_to_target(student_x: torch.Tensor, relation_heads: int,
                          target_probs: torch.Tensor, target_neg_entropy: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(relation_scores(student_x))), mean over R heads and real
    queries; equal to ``kl_to_target(relation_scores(x), ...)``, fused and tiled."""
    b, seq, _ = student_x.shape
    row_weights = _per_matrix(_token_weights(mask), relation_heads)  # (n, seq)
    probs = target_probs.reshape(-1, seq, seq)
    if kernels.usable(student_x.shape[-1] // relation_heads, student_x, probs):
        xt, key_bias = _kernel_inputs(student_x, relation_heads, mask)
        total = _RelationKernelKL.apply(xt, probs.float().contiguous(), key_bias,
                                        row_weights, torch.is_grad_enabled()
                                        and xt.requires_grad)
    else:
        x, key_bias = _relation_inputs(student_x, relation_heads, mask)
        total = _RelationKL.apply(x, probs, key_bias, row_weights,
                                  torch.is_grad_enabled() and x.requires_grad)
    total = total + (target_neg_entropy.reshape(-1, seq).float() * row_weights).sum()
    return total / row_weights.sum().clamp(min=1.0)


def relation_kl(student_x: torch.Tensor, teacher_x: torch.Tensor, relation_heads: int,
                mask: torch.Tensor) -> torch.Tensor:
    """MiniLMv2: X is Q, K or V of one layer, (batch, seq, width), all heads concatenated;
    each side is re-split into R relation heads of width/R, relation =
    softmax(X_r X_r^T / sqrt(width/R)); KL(teacher || student). Widths may differ."""
    target = relation_target(teacher_x, relation_heads, mask)
    return relation_kl_to_target(student_x, relation_heads, *target, mask)


def value_relation_kl(student_value: torch.Tensor, teacher_value: torch.Tensor,
                      heads: int, mask: torch.Tensor) -> torch.Tensor:
    """MiniLM: KL of softmax(V_h V_h^T / sqrt(d_head)) per attention head (equal head
    counts: head h of both models is columns h*d..(h+1)*d of V)."""
    return relation_kl(student_value, teacher_value, heads, mask)
