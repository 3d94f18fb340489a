"""Compiled ops (distill_common/build_cache.py), with real processes and signals: a run
killed during DeepSpeed's first op compile leaves a lock the next run clears (and that
run completes); a wait on someone else's build says what it waits for and ends when the
holder dies; `distill doctor` checks and builds; a tampered relation kernel is rebuilt,
never loaded."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from distill_common.build_cache import extensions_dir, hash_matches
from launch_fixtures import prepared_shards, write_tiny_recipe

REPO = Path(__file__).resolve().parent.parent


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    return {**env, "DISTILL_CACHE": str(cache), "PYTHONPATH": str(REPO), **extra}


def _python(code: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_extension_cache_is_ours_unless_the_user_set_one(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_cpu"
    assert extensions_dir() == tmp_path / "cache" / "torch_extensions" / tag
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert extensions_dir() == tmp_path / "mine"


@pytest.mark.slow
def test_run_killed_during_the_op_compile_then_next_run_completes(
        tmp_path, tmp_path_factory, tiny_teacher_dir, tiny_corpus_dir):
    recipe = write_tiny_recipe(tmp_path / "recipe", tiny_teacher_dir, tiny_corpus_dir,
                               max_steps=1)
    shards = prepared_shards(tmp_path_factory.getbasetemp(), recipe)
    env = _env(tmp_path / "cache")  # an empty extension cache: the op must compile
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_cpu"
    build_dir = tmp_path / "cache" / "torch_extensions" / tag / "deepspeed_shm_comm"

    def pretrain(out: str, **kw):
        return subprocess.Popen([sys.executable, "-m", "distill_cli", "pretrain", str(recipe),
                                 f"train.data_dir={shards}", f"train.output_dir={out}"],
                                env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                **kw)

    first = pretrain(str(tmp_path / "first"))
    try:
        _kill_during_compile(first, build_dir)
        assert (build_dir / "lock").exists()
        assert not (build_dir / "deepspeed_shm_comm.so").exists()
        second = pretrain(str(tmp_path / "second"))
        out, _ = second.communicate(timeout=900)
    finally:  # our runs, and ninja's compilers (process groups of their own)
        for proc in _working_in(tmp_path):
            with contextlib.suppress(Exception):
                proc.kill()
    assert second.returncode == 0, out[-4000:]
    assert f"removed a stale build lock {build_dir / 'lock'}" in out
    assert (build_dir / "deepspeed_shm_comm.so").is_file() and not (build_dir / "lock").exists()
    assert list((tmp_path / "second" / "checkpoints").glob("step-*/complete.json"))


def _working_in(folder: Path) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(folder) in arg for arg in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def _kill_during_compile(run: subprocess.Popen, build_dir: Path) -> None:
    """SIGKILL the run and its process group once its op build has started, as a time
    limit would. The compilers ninja started (in their own process groups) live on,
    writing into the build folder, as they do after a real kill."""
    deadline = time.monotonic() + 180
    try:
        # The lock is taken, ninja's build file written: the compilers are starting.
        while not ((build_dir / "lock").exists() and (build_dir / "build.ninja").exists()):
            assert run.poll() is None, run.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the op build never started"
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        run.wait()


HOLDER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL)  # what torch's FileBaton does
print("holding", flush=True)
time.sleep(600)
"""

WAITER = """
import logging, sys, time
from pathlib import Path
from torch.utils.file_baton import FileBaton
from distill_common import build_cache
from distill_common.logs import setup_logging

setup_logging()
build_cache.ANNOUNCE_EVERY_S = 2.0
build_dir = Path(sys.argv[1])
started = time.monotonic()
with build_cache.announce_wait("a test op", lambda: build_cache.describe_build(build_dir),
                               build_dir=build_dir):
    FileBaton(str(build_dir / "lock")).wait()  # what a second torch build does
print(f"waited {time.monotonic() - started:.1f} s")
"""


@pytest.mark.slow
def test_wait_on_a_build_says_what_it_waits_for_and_ends_when_the_holder_dies(tmp_path):
    build_dir = tmp_path / "ext" / "test_op"
    build_dir.mkdir(parents=True)
    env = _env(tmp_path / "cache")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(build_dir / "lock")],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    waiter = None
    try:
        assert holder.stdout.readline().strip() == "holding"
        waiter = subprocess.Popen([sys.executable, "-c", WAITER, str(build_dir)], env=env,
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)
        guard = threading.Timer(120, waiter.kill)  # a wait that never ends fails the test
        guard.start()
        announced = []
        while not any("still waiting" in line for line in announced):
            announced.append(waiter.stderr.readline())
            assert announced[-1], "".join(announced)  # EOF: the waiter ended first
        time.sleep(3)  # two more rounds of the watcher
        assert waiter.poll() is None  # a live holder is waited for, not robbed
        holder.kill()  # the build dies holding the lock
        holder.wait()
        out, err = waiter.communicate(timeout=60)
        guard.cancel()
    finally:
        for proc in (holder, waiter):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert waiter.returncode == 0, err
    assert re.search(rf"still waiting after \d+ s for a test op: another process builds "
                     rf"in {re.escape(str(build_dir))}: pid {holder.pid} \(python",
                     announced[-1]), announced
    assert f"removed a stale build lock {build_dir / 'lock'}" in err
    assert out.startswith("waited")


@pytest.mark.slow
def test_doctor_checks_clears_and_builds(tmp_path):
    # The shared extension cache (tests/conftest.py): DeepSpeed's op is built once there.
    shared = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    stale = shared / f"distill_test_stale_{os.getpid()}"
    stale.mkdir(parents=True, exist_ok=True)
    (stale / "lock").touch()  # left by a killed build: nobody holds it
    env = {**_env(tmp_path / "cache"), "TORCH_EXTENSIONS_DIR": str(shared)}
    try:
        r = subprocess.run([sys.executable, "-m", "distill_cli", "doctor"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=900)
        again = subprocess.run([sys.executable, "-m", "distill_cli", "doctor", "--no-build"],
                               env=env, cwd=tmp_path, capture_output=True, text=True,
                               timeout=300)
    finally:
        (stale / "lock").unlink(missing_ok=True)
        stale.rmdir()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "accelerator cpu (DS_ACCELERATOR=cpu)" in r.stdout
    assert f"{shared} " in r.stdout and "(your TORCH_EXTENSIONS_DIR)" in r.stdout
    assert f"removed 1 stale lock(s) left by killed builds: {stale / 'lock'}" in r.stdout
    assert "deepspeed_shm_comm ready" in r.stdout
    kernel = [line for line in r.stdout.splitlines() if "relation kernel" in line]
    assert len(kernel) == 1 and kernel[0].startswith("ok"), r.stdout + r.stderr
    so = Path(kernel[0].split()[3])
    assert so.parent == tmp_path / "cache" / "kernels" and hash_matches(so)
    assert "no stale lock" in again.stdout and again.returncode == 0


EVIL_SO = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((constructor)) static void on_load(void) {
    close(open(getenv("DISTILL_TEST_MARKER"), O_CREAT | O_WRONLY, 0600));
}
"""
LOAD_KERNEL = """
from distill_pretrain import kernels
lib = kernels.library()
print(lib._name if lib is not None else "none")
"""


def test_tampered_kernel_is_rebuilt_not_loaded(tmp_path):
    import shutil

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler here: the kernel cannot be built")
    marker = tmp_path / "loaded-the-tampered-library"
    env = _env(tmp_path / "cache", DISTILL_TEST_MARKER=str(marker))
    first = _python(LOAD_KERNEL, env)
    so = Path(first.stdout.strip())
    assert first.returncode == 0 and so.is_file() and hash_matches(so), first.stderr

    # Someone swaps in a library whose loading runs their code (a constructor).
    (tmp_path / "evil.c").write_text(EVIL_SO)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "evil.so"),
                    str(tmp_path / "evil.c")], check=True)
    os.replace(tmp_path / "evil.so", so)
    assert not hash_matches(so)
    second = _python(LOAD_KERNEL, env)
    assert second.returncode == 0 and second.stdout.strip() == str(so), second.stderr
    assert "does not match the SHA-256 recorded when it was built" in second.stderr
    assert not marker.exists()  # never loaded
    assert hash_matches(so)

    # A build without its record (written by something else) is not trusted either.
    so.with_name(so.name + ".sha256").unlink()
    third = _python(LOAD_KERNEL, env)
    assert "has no SHA-256 record" in third.stderr and hash_matches(so)
