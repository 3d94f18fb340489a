"""The fused CPU relation kernels (distill_pretrain/kernels) against the PyTorch path and
autograd: values, gradients and the teacher target, on the specialised head widths
(8, 16) and a generic one, with sequence lengths that leave vector tails, padding and an
all-padding sequence; the switch and the fallback when no compiler is there."""

from __future__ import annotations

import logging

import pytest
import torch

from distill_pretrain import kernels, losses


@pytest.fixture
def built():
    if kernels.library() is None:
        pytest.skip("no C compiler here: the kernels cannot be built")
    return kernels.library()


def _case(seq: int, d: int, relation_heads: int = 3, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, d * relation_heads, generator=g) * 1.5
    teacher = torch.randn(batch, seq, 2 * d * relation_heads, generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - seq // 3:] = 0  # padded tail
    mask[2] = 0  # all padding
    return student, teacher, mask


def _both(monkeypatch, fn):
    """fn() with the kernels, then with the PyTorch path."""
    with_kernel = fn()
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    without = fn()
    monkeypatch.delenv(kernels.ENV_SWITCH)
    return with_kernel, without


@pytest.mark.parametrize("seq,d", [(37, 8), (128, 8), (20, 16), (33, 5)])
def test_kernel_matches_pytorch_path(built, monkeypatch, seq, d):
    student, teacher, mask = _case(seq, d)
    heads = 3

    def run():
        x = student.clone().requires_grad_(True)
        target = losses.relation_target(teacher, heads, mask)
        value = losses.relation_kl_to_target(x, heads, *target, mask)
        (grad,) = torch.autograd.grad(value * 2.5, x)
        return target, value, grad

    (t_k, v_k, g_k), (t_t, v_t, g_t) = _both(monkeypatch, run)
    torch.testing.assert_close(t_k[0], t_t[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t_k[1], t_t[1], rtol=1e-5, atol=1e-5)
    assert v_k.item() == pytest.approx(v_t.item(), rel=1e-5)
    torch.testing.assert_close(g_k, g_t, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(g_k).all() and g_k.abs().sum() > 0
    # padding: exactly zero target probability on padded keys, no gradient to padded tokens
    assert (t_k[0][1, :, :, seq - seq // 3:] == 0).all()
    assert (g_k[1, seq - seq // 3:] == 0).all() and (g_k[2] == 0).all()


def test_kernel_matches_autograd_reference(built):
    """Against autograd through the unfused formula (relation_scores + kl_to_target)."""
    student, teacher, mask = _case(64, 8)
    x = student.clone().requires_grad_(True)
    reference_target = losses.target_distribution(losses.relation_scores(teacher, 3), mask)
    fused = losses.relation_kl_to_target(x, 3, *losses.relation_target(teacher, 3, mask), mask)
    plain = losses.kl_to_target(losses.relation_scores(x, 3), *reference_target, mask)
    (g_fused,) = torch.autograd.grad(fused, x)
    (g_plain,) = torch.autograd.grad(plain, x)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)


def test_kernel_zero_at_equality_and_threads_agree(built):
    student, _, mask = _case(50, 8)
    target = losses.relation_target(student, 3, mask)
    assert losses.relation_kl_to_target(student, 3, *target, mask).item() == \
        pytest.approx(0.0, abs=1e-5)
    teacher = torch.randn_like(student)
    target = losses.relation_target(teacher, 3, mask)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = losses.relation_kl_to_target(student, 3, *target, mask)
        torch.set_num_threads(3)  # split over 3 threads: same sum, in the same order
        three = losses.relation_kl_to_target(student, 3, *target, mask)
    finally:
        torch.set_num_threads(threads)
    assert one.item() == three.item()


def test_wide_heads_and_other_devices_stay_on_pytorch(built):
    assert kernels.usable(kernels.MAX_WIDTH, torch.zeros(1))
    assert not kernels.usable(kernels.MAX_WIDTH + 1, torch.zeros(1))
    assert not kernels.usable(8, torch.zeros(1, device="meta"))


def test_kernel_rejects_bad_inputs(built):
    xt = torch.randn(2, 8, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="contiguous fp32 CPU"):
        kernels.relation_target(xt, torch.zeros(2, 5), 0.3)


def test_switch_and_fallback_without_compiler(monkeypatch, caplog):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert not kernels.usable(8, torch.zeros(1))
    monkeypatch.delenv(kernels.ENV_SWITCH)

    def no_compiler():
        raise kernels.KernelUnavailable("no C compiler (cc, gcc or clang) on PATH; set CC")

    monkeypatch.setattr(kernels, "_compiler", no_compiler)
    monkeypatch.setattr(kernels, "_state", {})
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        assert kernels.library() is None
        assert not kernels.usable(8, torch.zeros(1))
    assert "PyTorch path" in caplog.text and "no C compiler" in caplog.text
    student, teacher, mask = _case(20, 8)
    value = losses.relation_kl(student, teacher, 3, mask)  # still works, eagerly
    assert torch.isfinite(value)


def test_build_is_cached_per_source_and_cpu(isolated_cache, monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})
    if kernels.library() is None:
        pytest.skip("no C compiler here")
    built = sorted((isolated_cache / "kernels").glob("relation-*.so"))
    assert len(built) == 1
    monkeypatch.setattr(kernels, "_cpu_identity", lambda: b"another cpu")
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.library() is not None
    assert len(sorted((isolated_cache / "kernels").glob("relation-*.so"))) == 2
    assert not list((isolated_cache / "kernels").glob(".relation-*"))  # no temp files left
