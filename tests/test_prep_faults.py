"""Bad corpus input through `distill prep`: each malformed file of the table
(tests/bad_inputs.py) must stop the run with exit code 2 and one `error:` line naming the
file (and line) and the fix, never a traceback and never a partial shard (in this process,
and through `python -m distill_cli` a process per case); with `prep.on_error=skip` the
manifest counts every one of them and only good documents are packed. Plus bounded
memory whatever the line length."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest

from bad_inputs import CASES, MAX_LINE, Case, text_lines
from cli_process import assert_one_clean_error, run_cli
from data_prep import verify
from data_prep.lines import read_lines
from data_prep.readers import read_unit
from data_prep.sources import ReadOptions, Unit


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    good = d / "good.txt"
    good.write_text(text_lines(30, 0))
    for case in CASES:
        (d / case.file).write_bytes(case.content())
    return d, good


def write_recipe(folder, tokenizer_dir, sources, **prep) -> str:
    prep = {"sources": [str(s) for s in sources], "seq_len": 32, "workers": 0,
            "min_tokens": 1, "max_line_bytes": MAX_LINE, **prep}
    recipe = folder / "recipe.yaml"
    recipe.write_text(json.dumps({"name": "t", "output_dir": str(folder / "run"),
                                  "teacher": {"path": str(tokenizer_dir)}, "prep": prep}))
    return str(recipe)


def assert_nothing_partial(out) -> None:
    """A failed run leaves no manifest, no shard, no temporary file and no lock."""
    left = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()] \
        if out.exists() else []
    assert not [p for p in left if p.endswith((".tar", "manifest.json", ".lock"))
                or "/.tmp-" in f"/{p}"], left


def test_each_malformed_input_is_one_clean_error(tmp_path, inputs, tokenizer_dir, capsys):
    """The table in this process (fast): `main` returns 2 with one error line; an
    exception escaping `main` would fail the test."""
    from distill_cli.main import main

    folder, good = inputs
    for case in CASES:
        work = tmp_path / case.file.replace(".", "_")
        work.mkdir()
        rc = main(["prep", write_recipe(work, tokenizer_dir, [good, folder / case.file])])
        err = capsys.readouterr().err
        assert_one_clean_error(subprocess.CompletedProcess([], rc, "", err),
                               re.escape(str(folder / case.file)) + case.message)
        assert_nothing_partial(work / "run" / "shards")


@pytest.mark.slow
def test_each_malformed_input_is_one_clean_error_from_the_command(tmp_path, inputs,
                                                                   tokenizer_dir):
    """The same table through `python -m distill_cli prep`, a process per case: exit code
    2, one `error:` line, no traceback on stderr."""
    folder, good = inputs

    def run(case: Case):
        work = tmp_path / case.file.replace(".", "_")
        work.mkdir()
        proc = run_cli("prep", write_recipe(work, tokenizer_dir, [good, folder / case.file]))
        return case, work, proc

    with ThreadPoolExecutor(4) as pool:  # ~5 s of imports each: run a few at once
        results = list(pool.map(run, CASES))
    for case, work, proc in results:
        assert_one_clean_error(proc, re.escape(str(folder / case.file)) + case.message)
        assert_nothing_partial(work / "run" / "shards")


def test_on_error_skip_counts_each_bad_input_and_packs_only_good_documents(
        tmp_path, inputs, tokenizer_dir):
    folder, good = inputs
    proc = run_cli("prep", write_recipe(tmp_path, tokenizer_dir, [folder],
                                        on_error="skip"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    out = tmp_path / "run" / "shards"
    manifest = json.loads((out / "manifest.json").read_text())
    (source,) = manifest["sources"]
    per_file = {os.path.basename(b["file"]): b["skipped"] for b in source["bad_input"]}
    assert per_file == {case.file: case.skipped for case in CASES}
    for entry in source["bad_input"]:  # the first message of each reason is kept
        assert set(entry["first"]) == set(entry["skipped"])
        assert all(m.startswith(entry["file"]) for m in entry["first"].values())
    totals: dict = {}
    for case in CASES:
        for reason, n in case.skipped.items():
            totals[reason] = totals.get(reason, 0) + n
    assert {k: v for k, v in manifest["dropped"].items() if v and k in totals} == totals
    assert manifest["documents"]["kept"] == 30 + sum(case.good for case in CASES)
    assert verify(str(out)) == []
    assert not (out / ".lock").exists()
    for reason in totals:  # each kind of bad input is named once in the log
        assert f"skipping bad input ({reason})" in proc.stderr


def test_compressed_file_without_its_codec_is_a_setup_error_even_with_skip(
        tmp_path, tokenizer_dir, capsys):
    """fsspec reads .zst / .lz4 only with `zstandard` / `lz4` installed; without them the
    bytes would be taken for text. Not bad input, so on_error=skip does not hide it."""
    from fsspec.utils import infer_compression

    if infer_compression("a.zst") is not None:
        pytest.skip("zstandard is installed here")
    from distill_cli.main import main

    f = tmp_path / "a.txt.zst"
    f.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(64)))
    rc = main(["prep", write_recipe(tmp_path, tokenizer_dir, [f], on_error="skip")])
    assert_one_clean_error(subprocess.CompletedProcess([], rc, "", capsys.readouterr().err),
                           re.escape(str(f)) + r": reading it needs the Python package "
                           r"`zstandard`.*fix: `pip install zstandard`")


# ---------------------------------------------------------------- bounded memory

@pytest.mark.parametrize("name", ["huge.txt", "huge.txt.gz"])
def test_a_line_longer_than_the_cap_is_never_held_whole(tmp_path, name):
    line = b"x" * (40 << 20)
    f = tmp_path / name
    opener = gzip.open if name.endswith(".gz") else open
    with opener(f, "wb") as fh:
        fh.write(line + b"\nthe next line\n")
    del line
    tracemalloc.start()
    try:
        lines = list(read_lines(str(f), name, max_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(x.offset, x.number, x.raw, x.size) for x in lines] == [
        (0, 1, None, (40 << 20) + 1), ((40 << 20) + 1, 2, b"the next line\n", 14)]
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB reading a 40 MiB line"


def test_a_blank_line_document_over_the_cap_is_dropped_whole(tmp_path):
    f = tmp_path / "blocks.txt"
    f.write_text("a short first document\n\n" + "a line of the long one\n" * 100
                 + "\nthe last document\n")
    opts = ReadOptions(doc_split="blank_line", max_line_bytes=1024)
    items = list(read_unit(Unit("text", str(f), str(f)), opts))
    assert [(i.reason, i.line) for i in items] == [(None, 1), ("too_long", 3), (None, 104)]
    assert re.search(r"blocks.txt:3: the document .* over prep.max_line_bytes",
                     items[1].message)
