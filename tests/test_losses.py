"""Each loss against a naive implementation written from the paper's formula (explicit
loops over rows, heads and positions), plus the shared properties: zero at equality,
padding invariance, no NaN on all-padding rows, fp32 for bf16 inputs."""

from __future__ import annotations

import math

import pytest
import torch

from distill_pretrain import losses

B, S = 2, 5


def _mask():
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 3:] = 0  # second sequence: 3 real tokens, 2 padding
    return mask


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def _real(mask, b):
    return [i for i in range(mask.shape[1]) if mask[b, i]]


# ------------------------------------------------------------------ naive references


def naive_soft_target_kl(s, t, T):
    rows = [_kl(_softmax((t[n] / T).tolist()), _softmax((s[n] / T).tolist()))
            for n in range(s.shape[0])]
    return sum(rows) / len(rows) * T * T


def naive_mlm(s, labels):
    vals = [-math.log(_softmax(s[n].tolist())[int(labels[n])])
            for n in range(s.shape[0]) if labels[n] != -100]
    return sum(vals) / len(vals)


def naive_cosine(hs, ht, mask):
    vals = []
    for b in range(B):
        for i in _real(mask, b):
            a, c = hs[b, i].tolist(), ht[b, i].tolist()
            dot = sum(x * y for x, y in zip(a, c))
            na, nc = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in c))
            vals.append(1 - dot / (na * nc))
    return sum(vals) / len(vals)


def naive_token_mse(hs, ht, mask):
    vals = []
    for b in range(B):
        for i in _real(mask, b):
            d = hs.shape[-1]
            vals.append(sum((hs[b, i, f] - ht[b, i, f]).item() ** 2 for f in range(d)) / d)
    return sum(vals) / len(vals)


def naive_scores(q, k, heads, b, h):
    d = q.shape[-1] // heads
    cols = slice(h * d, (h + 1) * d)
    n = q.shape[1]
    return [[float(q[b, i, cols] @ k[b, j, cols]) / math.sqrt(d) for j in range(n)]
            for i in range(n)]


def naive_score_mse(qs, ks, qt, kt, heads, mask):
    vals = []
    for b in range(B):
        real = _real(mask, b)
        for h in range(heads):
            ss, st = naive_scores(qs, ks, heads, b, h), naive_scores(qt, kt, heads, b, h)
            vals += [(ss[i][j] - st[i][j]) ** 2 for i in real for j in real]
    return sum(vals) / len(vals)


def naive_distribution_kl(xs_s, xs_t, heads_s, heads_t, mask, y_s=None, y_t=None):
    """Per (batch, head, real query): KL over real keys of softmax(x_i . y_j / sqrt d)."""
    y_s = xs_s if y_s is None else y_s
    y_t = xs_t if y_t is None else y_t
    vals = []
    for b in range(B):
        real = _real(mask, b)
        for h in range(heads_s):
            ss, st = naive_scores(xs_s, y_s, heads_s, b, h), naive_scores(xs_t, y_t, heads_t, b, h)
            for i in real:
                vals.append(_kl(_softmax([st[i][j] for j in real]),
                                _softmax([ss[i][j] for j in real])))
    return sum(vals) / len(vals)


def naive_span_embeddings(h, mask, span):
    """[(b, k, mean vector)] of every span of ``span`` positions holding a real token."""
    span = span or h.shape[1]
    out = []
    for b in range(h.shape[0]):
        for k in range(math.ceil(h.shape[1] / span)):
            real = [i for i in range(k * span, min((k + 1) * span, h.shape[1])) if mask[b, i]]
            if real:
                out.append((b, k, [sum(float(h[b, i, f]) for i in real) / len(real)
                                   for f in range(h.shape[-1])]))
    return out


def _cos(a, c):
    dot = sum(x * y for x, y in zip(a, c))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in c)))


def naive_pooled_cosine(hs, ht, mask, span):
    es, et = naive_span_embeddings(hs, mask, span), naive_span_embeddings(ht, mask, span)
    return sum(1 - _cos(a[2], c[2]) for a, c in zip(es, et)) / len(es)


def naive_pooled_relation(hs, ht, mask, span):
    es, et = naive_span_embeddings(hs, mask, span), naive_span_embeddings(ht, mask, span)
    vals = [(_cos(es[i][2], es[j][2]) - _cos(et[i][2], et[j][2])) ** 2
            for i in range(len(es)) for j in range(len(es)) if i != j]
    return sum(vals) / len(vals)


# ------------------------------------------------------------------ inputs


def _inputs(seed=0, width_s=8, width_t=12):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return {"logits_s": r(4, 7), "logits_t": r(4, 7),
            "hs": r(B, S, width_s), "ht": r(B, S, width_s), "ht_wide": r(B, S, width_t),
            "qs": r(B, S, width_s), "ks": r(B, S, width_s), "vs": r(B, S, width_s),
            "qt": r(B, S, width_s), "kt": r(B, S, width_s),
            "xt_wide": r(B, S, width_t)}


def test_soft_target_kl_matches_formula():
    x = _inputs()
    got = losses.soft_target_kl(x["logits_s"], x["logits_t"], 2.0)
    assert got.item() == pytest.approx(naive_soft_target_kl(x["logits_s"], x["logits_t"], 2.0),
                                       rel=1e-5)
    assert got.dtype == torch.float32


def test_mlm_cross_entropy_matches_formula():
    x = _inputs()
    labels = torch.tensor([3, -100, 0, 6])
    got = losses.mlm_cross_entropy(x["logits_s"], labels)
    assert got.item() == pytest.approx(naive_mlm(x["logits_s"], labels), rel=1e-5)


def test_hidden_cosine_and_mse_match_formula():
    x, mask = _inputs(), _mask()
    assert losses.hidden_cosine(x["hs"], x["ht"], mask).item() == pytest.approx(
        naive_cosine(x["hs"], x["ht"], mask), rel=1e-5)
    assert losses.hidden_mse(x["hs"], x["ht"], mask).item() == pytest.approx(
        naive_token_mse(x["hs"], x["ht"], mask), rel=1e-5)
    assert losses.embedding_mse(x["hs"], x["ht"], mask).item() == pytest.approx(
        naive_token_mse(x["hs"], x["ht"], mask), rel=1e-5)


@pytest.mark.parametrize("span", [0, 2, 3])
def test_pooled_embedding_losses_match_formula(span):
    """Spans of 2 and 3 positions over 5 (the last one short) and the whole sequence;
    the second sequence's padding leaves a span with no real token, which does not count.
    The relation compares a width-8 student with a width-12 teacher."""
    x, mask = _inputs(), _mask()
    pooled, weights = losses.span_pool(x["hs"], mask, span)
    naive = naive_span_embeddings(x["hs"], mask, span)
    spans = math.ceil(S / (span or S))
    assert pooled.shape == (B * spans, 8) and weights.sum().item() == len(naive)
    for b, k, vector in naive:
        assert pooled[b * spans + k].tolist() == pytest.approx(vector, rel=1e-5)
    teacher = losses.span_pool(x["ht"], mask, span)
    assert losses.pooled_cosine(pooled, *teacher).item() == pytest.approx(
        naive_pooled_cosine(x["hs"], x["ht"], mask, span), rel=1e-5)
    wide, wide_weights = losses.span_pool(x["ht_wide"], mask, span)
    got = losses.pooled_relation_mse(pooled, losses.similarity_matrix(wide), wide_weights)
    assert got.item() == pytest.approx(naive_pooled_relation(x["hs"], x["ht_wide"], mask, span),
                                       rel=1e-5)


def test_attention_losses_match_formula():
    x, mask, heads = _inputs(), _mask(), 2
    s_scores = losses.attention_scores(x["qs"], x["ks"], heads)
    t_scores = losses.attention_scores(x["qt"], x["kt"], heads)
    assert losses.attention_score_mse(s_scores, t_scores, mask).item() == pytest.approx(
        naive_score_mse(x["qs"], x["ks"], x["qt"], x["kt"], heads, mask), rel=1e-5)
    assert losses.attention_score_mse_qk(x["qs"], x["ks"], heads, t_scores,
                                         mask).item() == pytest.approx(
        naive_score_mse(x["qs"], x["ks"], x["qt"], x["kt"], heads, mask), rel=1e-5)
    assert losses.attention_kl(s_scores, t_scores, mask).item() == pytest.approx(
        naive_distribution_kl(x["qs"], x["qt"], heads, heads, mask, x["ks"], x["kt"]),
        rel=1e-4)


def test_value_relation_kl_matches_formula():
    x, mask, heads = _inputs(), _mask(), 4
    got = losses.value_relation_kl(x["vs"], x["qt"], heads, mask)
    assert got.item() == pytest.approx(naive_distribution_kl(x["vs"], x["qt"], heads, heads,
                                                             mask), rel=1e-4)


def test_relation_kl_across_widths_matches_formula():
    """MiniLMv2: student width 8, teacher width 12, R=4 relation heads of 2 and 3."""
    x, mask = _inputs(), _mask()
    got = losses.relation_kl(x["qs"], x["xt_wide"], 4, mask)
    assert got.item() == pytest.approx(naive_distribution_kl(x["qs"], x["xt_wide"], 4, 4, mask),
                                       rel=1e-4)


def _all_losses(x, mask):
    """name -> loss(student tensors) for the properties shared by every loss."""
    heads = 2
    t_scores = losses.attention_scores(x["qt"], x["kt"], heads)
    teacher_similarity = losses.similarity_matrix(losses.span_pool(x["ht_wide"], mask, 2)[0])
    return {
        "hidden_cosine": lambda s: losses.hidden_cosine(s["hs"], x["ht"], mask),
        "hidden_mse": lambda s: losses.hidden_mse(s["hs"], x["ht"], mask),
        "embedding_mse": lambda s: losses.embedding_mse(s["hs"], x["ht"], mask),
        "attention_score_mse": lambda s: losses.attention_score_mse(
            losses.attention_scores(s["qs"], s["ks"], heads), t_scores, mask),
        "attention_score_mse_qk": lambda s: losses.attention_score_mse_qk(
            s["qs"], s["ks"], heads, t_scores, mask),
        "attention_kl": lambda s: losses.attention_kl(
            losses.attention_scores(s["qs"], s["ks"], heads), t_scores, mask),
        "value_relation_kl": lambda s: losses.value_relation_kl(s["vs"], x["qt"], heads, mask),
        "relation_kl": lambda s: losses.relation_kl(s["qs"], x["xt_wide"], 4, mask),
        "pooled_cosine": lambda s: losses.pooled_cosine(
            losses.span_pool(s["hs"], mask, 2)[0], *losses.span_pool(x["ht"], mask, 2)),
        "pooled_relation": lambda s: losses.pooled_relation_mse(
            losses.span_pool(s["hs"], mask, 2)[0], teacher_similarity,
            losses.span_pool(x["ht_wide"], mask, 2)[1]),
    }


def test_zero_when_student_equals_teacher():
    x, mask = _inputs(), _mask()
    same = dict(x, hs=x["ht"], qs=x["qt"], ks=x["kt"], vs=x["qt"])
    for name, fn in _all_losses(x, mask).items():
        if name == "relation_kl":
            value = losses.relation_kl(x["xt_wide"], x["xt_wide"], 4, mask)
        elif name == "pooled_relation":
            value = fn(dict(same, hs=x["ht_wide"]))
        else:
            value = fn(same)
        assert abs(value.item()) < 1e-6, name
    assert losses.soft_target_kl(x["logits_t"], x["logits_t"], 2.0).item() == \
        pytest.approx(0.0, abs=1e-6)


def _pad(t, extra=3, seed=7):
    """Append ``extra`` junk positions on the sequence axis."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([t, torch.randn(t.shape[0], extra, *t.shape[2:], generator=g,
                                     dtype=t.dtype) * 50], dim=1)


def test_padding_never_counts():
    x, mask = _inputs(), _mask()
    reference = {name: fn(x).item() for name, fn in _all_losses(x, mask).items()}
    padded = {k: (_pad(v) if v.dim() == 3 else v) for k, v in x.items()}
    padded_mask = torch.cat([mask, torch.zeros(B, 3, dtype=torch.long)], dim=1)
    for name, fn in _all_losses(padded, padded_mask).items():
        assert fn(padded).item() == pytest.approx(reference[name], rel=1e-6, abs=1e-9), name


def test_all_padding_row_and_empty_batch_give_no_nan():
    x = _inputs()
    mask = _mask()
    mask[0] = 0  # the first sequence is all padding
    for name, fn in _all_losses(x, mask).items():
        assert torch.isfinite(fn(x)), name
    nothing = torch.zeros(B, S, dtype=torch.long)
    for name, fn in _all_losses(x, nothing).items():
        value = fn(x)
        assert value.item() == 0.0, name
    empty = torch.zeros(0, 7, requires_grad=True)
    assert losses.soft_target_kl(empty, empty.detach(), 2.0).item() == 0.0
    assert losses.mlm_cross_entropy(x["logits_s"], torch.full((4,), -100)).item() == 0.0


def test_bf16_inputs_are_computed_in_fp32():
    x, mask = _inputs(), _mask()
    low = {k: v.to(torch.bfloat16) for k, v in x.items()}
    as32 = {k: v.to(torch.float32) for k, v in low.items()}
    for name, fn in _all_losses(low, mask).items():
        value = fn(low)
        assert value.dtype == torch.float32, name
    s = losses.relation_kl(low["qs"], low["xt_wide"], 4, mask)
    assert s.item() == pytest.approx(
        losses.relation_kl(as32["qs"], as32["xt_wide"], 4, mask).item(), rel=1e-5)


def test_gradients_flow_to_student_inputs_only():
    x, mask = _inputs(), _mask()
    student = {k: v.clone().requires_grad_(True) for k, v in x.items()
               if k in ("hs", "qs", "ks", "vs")}
    inputs = dict(x, **student)
    total = sum(fn(inputs) for fn in _all_losses(x, mask).values())
    total.backward()
    for k, v in student.items():
        assert v.grad is not None and v.grad.abs().sum() > 0, k
        # padding positions receive no gradient
        assert v.grad[1, 3:].abs().sum() == 0, k


def test_relation_kl_memory_saving_backward_matches_autograd():
    """The recomputing backward of relation_kl gives autograd's gradient."""
    x, mask = _inputs(), _mask()
    mask[0] = 0  # include an all-padding row
    student = x["qs"].float().clone().requires_grad_(True)
    target = losses.target_distribution(losses.relation_scores(x["xt_wide"], 4), mask)
    fused = losses.relation_kl_to_target(student, 4, *target, mask)
    (grad_fused,) = torch.autograd.grad(fused, student)
    plain = losses.kl_to_target(losses.relation_scores(student, 4), *target, mask)
    (grad_plain,) = torch.autograd.grad(plain, student)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
    torch.testing.assert_close(grad_fused, grad_plain, rtol=1e-4, atol=1e-7)
    assert grad_fused.abs().sum() > 0


def test_fp32_inside_autocast():
    x, mask = _inputs(), _mask()
    student = x["qs"].float()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        scores = losses.attention_scores(student, student, 2)
        value = losses.relation_kl(student, x["xt_wide"].float(), 4, mask)
    assert scores.dtype == torch.float32
    assert value.item() == pytest.approx(
        losses.relation_kl(student, x["xt_wide"].float(), 4, mask).item(), rel=1e-6)


@pytest.fixture(params=[1, 3, 1000], ids=["tile1", "tile3", "one-tile"])
def tile_matrices(request, monkeypatch):
    """Fused losses working on tiles of 1 or 3 (seq, seq) matrices, or all at once: the
    tile boundaries must not change any value or gradient."""
    monkeypatch.setattr(losses, "TILE_BYTES", request.param * S * S * 4)
    return request.param


def test_fused_relation_kl_tiles_match_autograd(tile_matrices):
    x, mask = _inputs(), _mask()
    student = x["qs"].float().clone().requires_grad_(True)
    teacher = x["xt_wide"].float()
    reference_target = losses.target_distribution(losses.relation_scores(teacher, 4), mask)
    target = losses.relation_target(teacher, 4, mask)
    for got, want in zip(target, reference_target):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    fused = losses.relation_kl_to_target(student, 4, *target, mask)
    (grad_fused,) = torch.autograd.grad(fused * 3.0, student)  # a scaled upstream grad
    plain = losses.kl_to_target(losses.relation_scores(student, 4), *reference_target, mask)
    (grad_plain,) = torch.autograd.grad(plain * 3.0, student)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
    torch.testing.assert_close(grad_fused, grad_plain, rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # evaluation: same value, no gradient work
        assert losses.relation_kl_to_target(student, 4, *target, mask).item() == \
            pytest.approx(fused.item(), rel=1e-6)


def test_fused_score_mse_tiles_match_autograd(tile_matrices):
    x, mask, heads = _inputs(), _mask(), 2
    q = x["qs"].float().clone().requires_grad_(True)
    k = x["ks"].float().clone().requires_grad_(True)
    t_scores = losses.attention_scores(x["qt"].float(), x["kt"].float(), heads)
    fused = losses.attention_score_mse_qk(q, k, heads, t_scores, mask)
    grads_fused = torch.autograd.grad(fused * 3.0, (q, k))
    plain = losses.attention_score_mse(losses.attention_scores(q, k, heads), t_scores, mask)
    grads_plain = torch.autograd.grad(plain * 3.0, (q, k))
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
    for got, want in zip(grads_fused, grads_plain):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        assert got[1, 3:].abs().sum() == 0  # padding gets no gradient


def test_fused_score_mse_with_position_bias_matches_plain():
    """MPNet: a student position bias with its own gradient takes the autograd path."""
    x, mask, heads = _inputs(), _mask(), 2
    bias = torch.randn(1, heads, S, S, dtype=torch.float64, requires_grad=True)
    t_scores = losses.attention_scores(x["qt"], x["kt"], heads)
    fused = losses.attention_score_mse_qk(x["qs"], x["ks"], heads, t_scores, mask, bias)
    plain = losses.attention_score_mse(losses.attention_scores(x["qs"], x["ks"], heads, bias),
                                       t_scores, mask)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    fused.backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def test_fused_soft_target_kl_tiles_match_autograd(monkeypatch):
    x = _inputs()
    for rows_per_tile in (1, 3, 1000):
        monkeypatch.setattr(losses, "TILE_BYTES", rows_per_tile * 7 * 4)
        student = x["logits_s"].float().clone().requires_grad_(True)
        fused = losses.soft_target_kl(student, x["logits_t"].float(), 2.0)
        (grad_fused,) = torch.autograd.grad(fused * 3.0, student)
        teacher_log_p = torch.log_softmax(x["logits_t"].float() / 2.0, -1)
        plain = torch.nn.functional.kl_div(torch.log_softmax(student / 2.0, -1), teacher_log_p,
                                           log_target=True, reduction="batchmean") * 4.0
        (grad_plain,) = torch.autograd.grad(plain * 3.0, student)
        assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
        torch.testing.assert_close(grad_fused, grad_plain, rtol=1e-4, atol=1e-7)
    low = x["logits_s"].to(torch.bfloat16).requires_grad_(True)
    losses.soft_target_kl(low, x["logits_t"], 2.0).backward()
    assert low.grad.dtype == torch.bfloat16


def test_fused_losses_under_bf16_autocast_match_fp32():
    """The trainer's bf16 path: inputs in bf16 inside an autocast region; the fused losses
    still compute in fp32 and hand back gradients in the inputs' dtype."""
    x, mask = _inputs(), _mask()
    heads = 2
    t_scores = losses.attention_scores(x["qt"].float(), x["kt"].float(), heads)
    relation_target = losses.relation_target(x["xt_wide"].float(), 4, mask)
    soft = losses.soft_targets(x["logits_t"].float(), 2.0)
    cases = {
        "relation": lambda v: losses.relation_kl_to_target(v["qs"], 4, *relation_target, mask),
        "score_mse": lambda v: losses.attention_score_mse_qk(v["qs"], v["ks"], heads, t_scores,
                                                             mask),
        "soft_target": lambda v: losses.soft_target_kl_to(v["logits_s"], *soft, 2.0),
    }
    for name, fn in cases.items():
        low = {k: x[k].to(torch.bfloat16).requires_grad_(True) for k in ("qs", "ks", "logits_s")}
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            value = fn(low)
        value.backward()
        reference = fn({k: v.detach().float() for k, v in low.items()})
        assert value.dtype == torch.float32, name
        assert value.item() == pytest.approx(reference.item(), rel=1e-5), name
        assert low["qs" if name != "soft_target" else "logits_s"].grad.dtype == torch.bfloat16


def test_tiles_are_cache_sized_on_cpu_and_large_on_accelerators():
    matrix = 128 * 128 * 4
    cpu = losses._tiles(1536, matrix, torch.device("cpu"))
    gpu = losses._tiles(1536, matrix, torch.device("cuda"))
    assert cpu[0] == (0, losses.TILE_BYTES // matrix) and cpu[-1][1] == 1536
    assert gpu[0] == (0, losses.ACCELERATOR_TILE_BYTES // matrix) and gpu[-1][1] == 1536
    assert losses._tiles(0, matrix, torch.device("cpu")) == []
    assert losses._tiles(3, 10 * losses.TILE_BYTES, torch.device("cpu")) == [(0, 1), (1, 2), (2, 3)]
