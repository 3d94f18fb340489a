"""Prep on a real (local, loopback-only) Ray: byte-identical shards with 1 and 2 workers
and in-process, file:// output from workers, and a run killed with SIGKILL then resumed.

One Ray session is shared by the module (starting Ray takes seconds)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from data_prep import run_prep, verify
from data_prep.config import PrepConfig

pytestmark = pytest.mark.slow


def test_local_ray_listens_on_loopback_only_and_is_shut_down(tmp_path, corpus, tokenizer_dir,
                                                             monkeypatch):
    """Runs first, before the shared session: prep starts its own Ray and stops it."""
    import psutil
    import ray

    import data_prep.run as run_module

    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    real, listening = run_module._run_chunks, []

    def spy(*args, **kwargs):
        ours = {p.pid for p in psutil.Process().children(recursive=True)}
        listening.extend(c.laddr.ip.removeprefix("::ffff:")
                         for c in psutil.net_connections("inet")
                         if c.status == psutil.CONN_LISTEN and c.pid in ours)
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "_run_chunks", spy)
    manifest = run_prep(cfg(tmp_path / "out", corpus), str(tokenizer_dir), workers=2)
    assert manifest["run"]["workers"] == 2
    assert listening and set(listening) <= {"127.0.0.1", "::1"}, listening
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    temp = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=2, object_store_memory=128 << 20, _temp_dir=str(temp),
             include_dashboard=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from conftest import sentences

    d = tmp_path_factory.mktemp("ray_corpus")
    for k in range(3):
        docs = [" ".join(sentences(1 + (i * 7) % 13, seed=k * 1000 + i)) for i in range(90)]
        (d / f"part-{k}.txt").write_text("\n\n".join(docs) + "\n")
    return d


def cfg(out, corpus, **kw) -> PrepConfig:
    kw = {"seq_len": 64, "docs_per_shard": 20, "min_tokens": 1, "doc_split": "blank_line",
          "validation_fraction": 0.1, **kw}
    return PrepConfig(sources=[str(corpus)], output_dir=str(out), **kw)


def shard_bytes(out, manifest) -> dict:
    from data_prep.shards import Output

    o = Output(str(out))
    files = [s["file"] for split in manifest["splits"].values() for s in split["shards"]]
    return {f: o.read_bytes(f) for f in files + ["token_counts.npy"]}


def test_shards_are_byte_identical_for_0_1_and_2_workers(ray_session, tmp_path, corpus,
                                                         tokenizer_dir):
    results = {}
    for workers in (0, 1, 2):
        out = tmp_path / f"w{workers}"
        manifest = run_prep(cfg(out, corpus), str(tokenizer_dir), workers=workers)
        assert manifest["run"]["workers"] == workers
        results[workers] = shard_bytes(out, manifest)
    assert len(results[0]) > 10
    assert results[1] == results[0]
    assert results[2] == results[0]


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_pool_queues_ahead_but_runs_at_most_workers_at_once(ray_session, workers):
    """Tasks are queued ahead of the workers (no driver round trip between two tasks), yet
    on this 2-CPU Ray one worker never runs two at once (its placement group holds them)."""
    from data_prep.executor import RayPool

    def timed_task(item, pause):  # defined here: sent by value, the workers cannot import tests
        import time as clock

        start = clock.monotonic()
        clock.sleep(pause)
        return item, start, clock.monotonic()

    got = dict(RayPool(workers).imap_unordered(timed_task, range(8), 0.15))
    assert sorted(got) == list(range(8)) and all(got[i][0] == i for i in got)
    events = sorted([(start, 1) for _, start, _ in got.values()]
                    + [(end, -1) for _, _, end in got.values()])  # an end sorts first
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    assert most == workers, events
    assert not ray_session.util.placement_group_table() or all(
        g["state"] == "REMOVED" for g in ray_session.util.placement_group_table().values())


def test_workers_write_to_a_file_url(ray_session, tmp_path, corpus, tokenizer_dir):
    manifest = run_prep(cfg(f"file://{tmp_path}/out", corpus), str(tokenizer_dir), workers=2)
    assert manifest["splits"]["train"]["samples"] > 0
    assert verify(f"file://{tmp_path}/out") == [] and verify(str(tmp_path / "out")) == []


def test_a_bad_file_in_a_worker_is_a_clear_error(ray_session, tmp_path, tokenizer_dir):
    from data_prep.errors import PrepError

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(b"fine line\nbad \xff line\n")
    with pytest.raises(PrepError, match=r"a.txt:2: invalid UTF-8"):
        run_prep(cfg(tmp_path / "out", tmp_path / "in", doc_split="line"), str(tokenizer_dir),
                 workers=2)


@pytest.mark.parametrize("case", ["corrupt.txt.xz", "badpage.parquet", "binary.txt",
                                  "nested.jsonl"])
def test_bad_input_in_a_worker_is_the_same_message_as_in_process(ray_session, tmp_path,
                                                                 tokenizer_dir, case):
    """A bad file read by a Ray task stops the run with the very line that the in-process
    run gives; with on_error=skip both count the same."""
    from data_prep.errors import PrepError
    from bad_inputs import CASES, MAX_LINE

    (spec,) = [c for c in CASES if c.file == case]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / case).write_bytes(spec.content())
    (tmp_path / "in" / "good.txt").write_text("the king of the north went to the city\n")
    messages, dropped = {}, {}
    for workers in (0, 2):
        c = cfg(tmp_path / f"w{workers}", tmp_path / "in", doc_split="line",
                max_line_bytes=MAX_LINE)
        with pytest.raises(PrepError) as err:
            run_prep(c, str(tokenizer_dir), workers=workers)
        messages[workers] = str(err.value)
        c.on_error = "skip"
        dropped[workers] = run_prep(c, str(tokenizer_dir), workers=workers)["dropped"]
    assert messages[2] == messages[0] and case in messages[0] and "\n" not in messages[0]
    assert dropped[2] == dropped[0] and all(dropped[0][r] == n for r, n in spec.skipped.items())


def test_a_task_whose_worker_dies_is_a_clear_error(ray_session):
    from data_prep.errors import PrepError
    from data_prep.executor import RayPool

    def die(item, shared):  # defined here: sent by value
        import os as worker_os

        worker_os._exit(1)

    with pytest.raises(PrepError, match=r"a Ray task lost its worker process .* fix: lower "
                                        r"--workers"):
        list(RayPool(1).imap_unordered(die, [0], None))


SLOW_CHUNKS = """
import sys, time
import data_prep.run as run
real = run.process_chunk
def slow(spec, ctx):
    result = real(spec, ctx)
    time.sleep(0.4)
    return result
run.process_chunk = slow
from distill_cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkilled_prep_resumes_and_matches_a_clean_run(tmp_path, corpus, tokenizer_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: t\noutput_dir: {tmp_path}/run\nteacher:\n  path: {tokenizer_dir}\nprep:\n"
        f"  sources: [{json.dumps(str(corpus))}]\n  seq_len: 64\n  docs_per_shard: 20\n"
        f"  min_tokens: 1\n  doc_split: blank_line\n  validation_fraction: 0.1\n")
    out = tmp_path / "run" / "shards"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CHUNKS, "prep", str(recipe),
                             "--workers", "0"], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / ".prep").glob("chunk-*.npz"))
                                         if (out / ".prep").is_dir() else []) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / ".prep").glob("chunk-*.npz")))
    assert 3 <= done_before < 14, "the run was not killed half-way"
    assert not (out / "manifest.json").exists()
    rc = subprocess.run([sys.executable, "-m", "distill_cli", "prep", str(recipe),
                         "--workers", "0"], env=env, capture_output=True, text=True,
                        timeout=300)
    assert rc.returncode == 0, rc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["chunks_reused"] >= done_before
    clean = run_prep(cfg(tmp_path / "clean", corpus), str(tokenizer_dir), workers=0)
    assert shard_bytes(out, manifest) == shard_bytes(tmp_path / "clean", clean)
    assert verify(str(out)) == []
