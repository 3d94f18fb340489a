"""`distill doctor`: is this machine ready to distil, and build now what runs would compile.

One line per check (ok / warn / FAIL): Python; torch (build, GPUs visible); DeepSpeed
(version, accelerator and where that choice came from); the cache and the folder torch
builds extensions in (writable, free space); stale build locks (cleared). Then, unless
``--no-build``, it builds the compiled ops a run needs on first use: DeepSpeed's CPU
shared-memory collective (CPU accelerator only) and our fused relation kernel, so no
training run waits on a compiler. Exit status 1 when a check failed. `make venv` runs it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable

LOW_SPACE_GB = 5.0


@dataclass
class Check:
    name: str
    status: str
    """ok | warn | FAIL"""
    detail: str


def register(sub) -> None:
    p = sub.add_parser("doctor", help="check this machine (torch, DeepSpeed, GPUs, caches, "
                                      "stale build locks) and build the compiled ops ahead "
                                      "of time",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--no-build", action="store_true",
                   help="only check; build nothing")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    checks = run_checks(build=not args.no_build)
    for c in checks:
        print(f"{c.status:<4}  {c.name:<17} {c.detail}", flush=True)
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def run_checks(build: bool = True) -> list[Check]:
    steps: list[Callable[[], Check]] = [_python, _torch, _deepspeed, _cache, _extensions,
                                        _locks]
    if build:
        steps += [_deepspeed_ops, _relation_kernel]
    return [_guarded(step) for step in steps]


def _guarded(step: Callable[[], Check]) -> Check:
    try:
        return step()
    except Exception as err:  # a check must report, never crash the others
        return Check(step.__name__.strip("_").replace("_", " "), "FAIL",
                     f"{type(err).__name__}: {err}")


def _python() -> Check:
    return Check("python", "ok", f"{platform.python_version()} ({sys.executable})")


def _torch() -> Check:
    import torch

    if torch.version.cuda is None:
        return Check("torch", "ok", f"{torch.__version__}, CPU build (no GPU use)")
    count = torch.cuda.device_count()
    names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
    detail = f"{torch.__version__}, CUDA {torch.version.cuda}, {count} GPU(s) visible"
    return Check("torch", "ok" if count else "warn",
                 detail + (f": {', '.join(names)}" if names else
                           " (CUDA_VISIBLE_DEVICES? driver?)"))


def _deepspeed() -> Check:
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator().device_name()
    chosen = os.environ.get("DS_ACCELERATOR")
    source = f"DS_ACCELERATOR={chosen}" if chosen else "auto-detected"
    detail = f"{deepspeed.__version__}, accelerator {accel} ({source})"
    if accel == "cpu" and torch.cuda.is_available():
        return Check("deepspeed", "warn", detail + ": GPUs are visible but runs will use "
                                                   "the CPU; unset DS_ACCELERATOR")
    return Check("deepspeed", "ok", detail)


def _writable_folder(name: str, path, note: str = "") -> Check:
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK):
        return Check(name, "FAIL", f"{path} is not writable")
    free = shutil.disk_usage(path).free / 2**30
    status = "warn" if free < LOW_SPACE_GB else "ok"
    return Check(name, status, f"{path} ({free:.1f} GiB free){note}")


def _cache() -> Check:
    from distill_common.assets import cache_dir

    return _writable_folder("cache", cache_dir(), "; DISTILL_CACHE moves it")


def _extensions() -> Check:
    from distill_common.build_cache import use_extensions_dir

    whose = " (your TORCH_EXTENSIONS_DIR)" if os.environ.get("TORCH_EXTENSIONS_DIR") \
        else " (distill's; TORCH_EXTENSIONS_DIR overrides)"
    return _writable_folder("torch extensions", use_extensions_dir(), whose)


def _locks() -> Check:
    from distill_common.build_cache import clear_stale_locks, extensions_dir

    cleared = clear_stale_locks(extensions_dir())
    if not cleared:
        return Check("build locks", "ok", "no stale lock")
    return Check("build locks", "warn", f"removed {len(cleared)} stale lock(s) left by "
                                        f"killed builds: {', '.join(map(str, cleared))}")


def _deepspeed_ops() -> Check:
    from distill_pretrain.compiled_ops import prepare_compiled_ops

    started = time.monotonic()
    built = prepare_compiled_ops()
    if not built:
        return Check("deepspeed ops", "ok", "nothing to build for this accelerator")
    return Check("deepspeed ops", "ok", f"{', '.join(built)} ready "
                                        f"({time.monotonic() - started:.1f} s)")


def _relation_kernel() -> Check:
    from distill_pretrain import kernels

    if os.environ.get(kernels.ENV_SWITCH, "1") == "0":
        return Check("relation kernel", "ok", f"off ({kernels.ENV_SWITCH}=0)")
    lib = kernels.library()
    if lib is None:
        return Check("relation kernel", "warn", "cannot be built here (the log above says "
                                                "why); the losses use the slower PyTorch "
                                                "path")
    return Check("relation kernel", "ok", f"{lib._name} (SHA-256 recorded beside it)")
