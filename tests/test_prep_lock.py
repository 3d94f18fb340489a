"""One prep per output folder, with real `distill prep` processes: a second run into a
folder in use stops at once naming the first (whose shards stay intact and which then
completes), and the lock of a SIGKILLed run is taken over by the next run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from cli_process import assert_one_clean_error, child_env, run_cli
from conftest import sentences
from data_prep import verify
from distill_common.folder_lock import LOCK_NAME, lock_holder

pytestmark = pytest.mark.slow

# `distill prep` whose chunks, once written, wait for a file to appear: the run is held
# half-way (lock taken, first shards written) for as long as the test needs.
GATED_PREP = """
import os, sys, time
import data_prep.run as run
real = run.process_chunk
def gated(spec, ctx):
    result = real(spec, ctx)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.05)
    return result
run.process_chunk = gated
from distill_cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture
def recipe(tmp_path, tokenizer_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(" ".join(sentences(3, seed=i)) + "\n" for i in range(100)))
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({
        "name": "t", "output_dir": str(tmp_path / "run"),
        "teacher": {"path": str(tokenizer_dir)},
        "prep": {"sources": [str(corpus)], "seq_len": 32, "workers": 0, "min_tokens": 1,
                 "docs_per_shard": 20}}))
    return str(path)


def start_gated(tmp_path, recipe: str) -> tuple[subprocess.Popen, object]:
    go = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", GATED_PREP, str(go), "prep", recipe],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out = tmp_path / "run" / "shards"
    deadline = time.time() + 180
    while not list(out.glob(".prep/chunk-*.npz")):  # one chunk written, the next waits
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    return proc, go


def test_a_second_prep_into_a_folder_in_use_stops_at_once(tmp_path, recipe):
    first, go = start_gated(tmp_path, recipe)
    out = tmp_path / "run" / "shards"
    try:
        assert lock_holder(out)["pid"] == first.pid
        written = {p: p.read_bytes() for p in out.rglob("*.tar")}
        assert written
        second = run_cli("prep", recipe)
        assert first.poll() is None  # the second did not wait for the first
        assert_one_clean_error(second, rf"{out} is in use by prep PID {first.pid} on host "
                                       rf"{socket.gethostname()} \(started .*: -c \S+ prep "
                                       rf"{recipe}\); two runs on one folder .*another "
                                       rf"output folder")
        assert {p: p.read_bytes() for p in written} == written  # untouched
    finally:
        go.touch()
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert (out / "manifest.json").is_file() and verify(str(out)) == []
    assert not (out / LOCK_NAME).exists()


def test_the_lock_of_a_sigkilled_prep_is_taken_over_by_the_next_run(tmp_path, recipe):
    first, _ = start_gated(tmp_path, recipe)
    out = tmp_path / "run" / "shards"
    os.kill(first.pid, signal.SIGKILL)
    first.communicate()
    assert lock_holder(out)["pid"] == first.pid  # left behind
    again = run_cli("prep", recipe)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"taking over the lock left by prep PID {first.pid}" in again.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["chunks_reused"] >= 1 and verify(str(out)) == []
    assert not (out / LOCK_NAME).exists()
