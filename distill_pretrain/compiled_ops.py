"""DeepSpeed's compiled ops, built before DeepSpeed needs them: in our cache, visibly, and
never waited on forever (the machinery is distill_common/build_cache.py; DeepSpeed, which
only pretraining may import, is handled here).

On a CPU accelerator DeepSpeed JIT-compiles its shared-memory collective
(``deepspeed_shm_comm``) inside ``deepspeed.init_distributed``. ``prepare_compiled_ops()``,
called first thing in pretraining, builds it in a child process beforehand: torch
remembers within a process that it waited for a build and then imports a library the
killed builder never linked, so a build whose lock had to be cleared is simply run
again in a fresh child.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from distill_common.build_cache import (announce_wait, clear_stale_locks, describe_build,
                                        use_extensions_dir)
from distill_common.errors import DistillUserError
from distill_common.lifeline import die_with_parent

log = logging.getLogger(__name__)


class OpBuildUserError(DistillUserError, RuntimeError):
    """A compiled op failed to build; the message has the compiler's last words."""


def _shm_builder_class() -> str | None:
    """The class of DeepSpeed's CPU shared-memory collective builder, or None where it is
    not used (a GPU accelerator, or a CPU without the instructions the op needs)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return None
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return "ShareMemCommBuilder"


def build_deepspeed_op(builder_class: str, root: Path) -> str:
    """Build one DeepSpeed op in a child process, announcing the wait; if the build it
    waited on turns out to have been killed, build it again. Returns the op's name."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().create_op_builder(builder_class).NAME
    build_dir = root / name
    if (build_dir / f"{name}.so").is_file() and not (build_dir / "lock").exists():
        return name  # built; DeepSpeed's own load re-checks it is current (ninja)
    for attempt in (1, 2):
        with announce_wait(f"DeepSpeed's {name} op (compiled once per machine and Python, "
                           f"a minute or two)", lambda: describe_build(build_dir),
                           build_dir=build_dir) as cleared:
            done = subprocess.run([sys.executable, "-m", __name__, builder_class],
                                  capture_output=True, text=True, preexec_fn=die_with_parent)
        if done.returncode == 0:
            return name
        if attempt == 1 and cleared:
            log.warning("the build of %s this run waited for had been killed: building it "
                        "again", name)
            continue
        raise OpBuildUserError(f"DeepSpeed's {name} op did not build in {build_dir}: "
                               f"{(done.stderr or done.stdout).strip()[-1500:]}")
    raise AssertionError("unreachable")


def prepare_compiled_ops(builder_classes: Sequence[str] = ()) -> list[str]:
    """Before DeepSpeed is used: our extension cache, stale locks cleared, and the ops
    DeepSpeed would build on first use built now, visibly: its CPU collective (CPU
    accelerator), plus ``builder_classes`` (e.g. ``"CPUAdamBuilder"`` for a recipe that
    uses DeepSpeed's own optimizer). Returns the names of the ops built or found built."""
    root = use_extensions_dir()
    clear_stale_locks(root)
    shm = _shm_builder_class()
    wanted = ([shm] if shm else []) + [c for c in builder_classes if c != shm]
    return [build_deepspeed_op(builder_class, root) for builder_class in wanted]


def _build_in_this_process(builder_class: str) -> None:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder(builder_class).load(verbose=False)


if __name__ == "__main__":  # the child of build_deepspeed_op
    _build_in_this_process(sys.argv[1])
