"""Fused CPU kernels for the MiniLMv2 relation losses, built from ``relation.c`` on first use.

Eager PyTorch needs five passes over every (seq, seq) relation matrix (scores, log-softmax,
the dot with the target, exp, minus the target) plus two matmuls for the gradient; the
kernel does all of it one row at a time, in L1, with the gradient accumulated as it goes.

The library is compiled with the machine's C compiler (``$CC``, else ``cc``/``gcc``) for
this CPU (``-march=native``) into ``$DISTILL_CACHE/kernels/`` under a name that hashes the
source, the flags and the CPU's feature flags, so nodes with different CPUs sharing a
cache never load each other's build; its SHA-256 is recorded beside it and checked
before each load (a mismatch is rebuilt). Without a compiler, or with ``DISTILL_KERNELS=0``,
``library()`` returns None and the losses use their PyTorch path (logged once). Work is
split over ``torch.get_num_threads()`` threads; ctypes releases the GIL during each call.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("relation.c")
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fPIC",
         "-std=c11")
"""Compile flags. -ffast-math lets the row sums vectorise; the library is linked in a
second step without it, since linking with it adds crtfastmath.o, whose loading would
turn on flush-to-zero for the whole process and change PyTorch's results elsewhere."""
ENV_SWITCH = "DISTILL_KERNELS"
"""Set to 0 to use the PyTorch path everywhere."""
MAX_WIDTH = 16
"""Widest relation head (d = width / R) the kernel takes. Its cost per score grows with d
(d multiply-adds for the score, 2d for the gradient, not register-blocked), while the
PyTorch path spends those in BLAS: measured on one core at seq 128, the kernel is 1.7x
faster at d=8 (MiniLMv2, 384 wide, R=48) and 1.4x at d=16 (768 wide), 2.2x slower at
d=32 (value relations of 12 heads of 32), so wider heads stay on the PyTorch path."""

_lock = threading.Lock()
_state: dict = {}


class KernelUnavailable(RuntimeError):
    pass


def _cpu_identity() -> bytes:
    """What -march=native depends on: the architecture and, on Linux, the CPU flags."""
    ident = platform.machine().encode()
    try:
        with open("/proc/cpuinfo", "rb") as f:
            for line in f:
                if line.startswith((b"flags", b"Features")):
                    return ident + line
    except OSError:
        pass
    return ident + platform.processor().encode()


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise KernelUnavailable("no C compiler (cc, gcc or clang) on PATH; set CC")


def _compile(cc: str, out: Path) -> None:
    obj = out.with_suffix(".o")
    try:
        for step in ([cc, *FLAGS, "-c", "-o", str(obj), str(SOURCE)],
                     [cc, "-shared", "-o", str(out), str(obj), "-lm"]):
            done = subprocess.run(step, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise KernelUnavailable(f"{cc} failed to build {SOURCE.name}: "
                                        f"{done.stderr.strip()[-500:]}")
    finally:
        obj.unlink(missing_ok=True)


def _build() -> ctypes.CDLL:
    from distill_common.assets import cache_dir
    from distill_common.build_cache import cached_build

    cc = _compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), cc.encode(),
                                     _cpu_identity()])).hexdigest()[:16]
    # One builder at a time; the .so's SHA-256 is recorded and checked before each load.
    target = cached_build(cache_dir() / "kernels" / f"relation-{key}.so",
                          lambda out: _compile(cc, out), "the fused relation kernel")
    lib = ctypes.CDLL(str(target))
    ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.relation_target.argtypes = [ptr, ptr, i32, i32, i32, f32, ptr, ptr]
    lib.relation_target.restype = None
    lib.relation_kl.argtypes = [ptr, ptr, ptr, ptr, i32, i32, i32, f32, ptr, ptr]
    lib.relation_kl.restype = None
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The built kernels, or None when they cannot be used here (said once, in the log)."""
    with _lock:
        if "lib" not in _state:
            _state["lib"] = None
            if os.environ.get(ENV_SWITCH, "1") == "0":
                log.info("fused CPU kernels off (%s=0): PyTorch path", ENV_SWITCH)
            else:
                try:
                    _state["lib"] = _build()
                except (KernelUnavailable, OSError, subprocess.SubprocessError) as err:
                    log.warning("fused CPU kernels unavailable, using the PyTorch path "
                                "(slower): %s", err)
        return _state["lib"]


def usable(width: int, *tensors: torch.Tensor) -> bool:
    """Whether the kernels take relation heads of ``width`` on these tensors' device (CPU
    only; fp32 copies are made by the caller). The switch is read on every call."""
    return (os.environ.get(ENV_SWITCH, "1") != "0" and width <= MAX_WIDTH
            and all(t.device.type == "cpu" for t in tensors) and library() is not None)


def _ranges(n: int) -> list[tuple[int, int]]:
    parts = max(1, min(n, torch.get_num_threads()))
    step = -(-n // parts)
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of at least ``workers`` threads, kept across calls (grown when torch's
    thread count grows)."""
    with _lock:
        if _state.get("pool_size", 0) < workers:
            _state["pool"] = ThreadPoolExecutor(workers, "distill-kernel")
            _state["pool_size"] = workers
        return _state["pool"]


def _run(call, n: int) -> None:
    """call(start, stop) over ranges of the n matrices, on torch's thread count."""
    ranges = _ranges(n)
    if len(ranges) == 1:
        call(*ranges[0])
        return
    for future in [_pool(len(ranges)).submit(call, i, j) for i, j in ranges]:
        future.result()


def _ptr(t: Optional[torch.Tensor], offset: int = 0) -> Optional[int]:
    return None if t is None else t.data_ptr() + offset * t.element_size()


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"kernel inputs must be contiguous fp32 CPU tensors, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")


def relation_target(xt: torch.Tensor, bias: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """xt (n, d, L), bias (n, L) -> probs (n, L, L) = softmax(bias + scale X X^T) rows and
    neg_entropy (n, L) = sum_k p log p."""
    lib = library()
    _check(xt, bias)
    n, d, L = xt.shape
    probs = xt.new_empty(n, L, L)
    neg_entropy = xt.new_empty(n, L)

    def call(i, j):
        lib.relation_target(_ptr(xt, i * d * L), _ptr(bias, i * L), j - i, L, d, scale,
                            _ptr(probs, i * L * L), _ptr(neg_entropy, i * L))

    _run(call, n)
    return probs, neg_entropy


def relation_kl(xt: torch.Tensor, bias: torch.Tensor, weights: torch.Tensor,
                target: torch.Tensor, scale: float,
                want_grad: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """sum over matrices and rows of w * sum_k p log softmax(s), s = bias + scale X X^T,
    as a 0-d tensor; and, with ``want_grad``, the gradient of minus that w.r.t. xt, divided
    by ``scale``: (n, d, L)."""
    lib = library()
    _check(xt, bias, weights, target)
    n, d, L = xt.shape
    dxt = xt.new_empty(n, d, L) if want_grad else None
    cross = torch.empty(n, dtype=torch.float64)

    def call(i, j):
        lib.relation_kl(_ptr(xt, i * d * L), _ptr(bias, i * L), _ptr(weights, i * L),
                        _ptr(target, i * L * L), j - i, L, d, scale,
                        _ptr(dxt, i * d * L), _ptr(cross, i))

    _run(call, n)
    return cross.sum().to(torch.float32), dxt
