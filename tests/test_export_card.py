"""The exported student's model card: small and free of local paths whatever the corpus,
sources named as they may be published, speed-ups quoted from a report."""

from __future__ import annotations

import json
import re

import pytest

from export_fixtures import MINILM, write_checkpoint


ABSOLUTE = re.compile(r"(?<![\w.:/])/(?:[\w.-]+/)+[\w.*-]*")


def test_card_is_small_and_has_no_local_paths_with_2000_source_files(tmp_path,
                                                                       tiny_teacher_dir):
    from huggingface_hub import ModelCard

    from distill_pretrain.export import export_checkpoint

    files = [f"/srv/corpora/bbc/business/{i:03d}.txt" for i in range(2000)]
    sources = [{"source": "/srv/corpora/bbc/*/*.txt", "files": files, "documents": 2000},
               {"source": "s3://user:secret@bucket/wiki/*.jsonl?X-Amz-Signature=abc#frag",
                "files": ["s3://bucket/wiki/0.jsonl"], "documents": 7},
               {"source": "wiki_summaries", "files": ["/root/.cache/x.json"],
                "documents": 10033}]
    sources += [{"source": f"/srv/extra/part-{i}.txt", "files": [f"/srv/extra/part-{i}.txt"],
                 "documents": 3} for i in range(2000)]
    run = write_checkpoint(tmp_path / "run", str(tiny_teacher_dir), student={"num_layers": 2},
                           objective={"mlm": {"weight": 1.0},
                                      "qkv_relation_kl": {"weight": 1.0, "relation_heads": 4}},
                           sources=sources)
    out = export_checkpoint(run, tmp_path / "student")
    text = (out / "README.md").read_text()
    assert len(text.encode()) < 10_000, len(text.encode())
    assert not ABSOLUTE.findall(text), ABSOLUTE.findall(text)[:5]
    assert "secret" not in text and "Signature" not in text and "frag" not in text
    assert "| bbc/*/*.txt | 2,000 |" in text and "| s3://bucket/wiki/*.jsonl | 7 |" in text
    assert "| wiki_summaries | 10,033 |" in text and "| 1983 more sources | 5,949 |" in text
    assert "Q-Q, K-K, V-V self-attention relations over 4 relation heads" in text
    assert "| eval/mlm_accuracy | 0.1250 |" in text
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "fill-mask"
    # The run record keeps counts, not the file lists.
    record = json.loads((out / "distill_run.json").read_text())
    assert record["manifest"]["sources"][0]["n_files"] == 2000
    assert "files" not in record["manifest"]["sources"][0]


@pytest.mark.parametrize("spec, want", [
    ("wiki_summaries", "wiki_summaries"),
    ("/data/bbc/*.txt", "bbc/*.txt"),
    ("/data/corpus.jsonl", "corpus.jsonl"),
    ("~/corpora/**/*.txt", "corpora/**/*.txt"),
    ("https://user:pw@host.org/a/b.txt?token=1#x", "https://host.org/a/b.txt"),
    ("hf://datasets/org/name/train/*.parquet", "hf://datasets/org/name/train/*.parquet"),
])
def test_source_names_as_published(spec, want):
    from distill_pretrain.export_card import source_name

    assert source_name(spec) == want


def test_card_quotes_the_speed_ups_of_a_report(tmp_path, tiny_teacher_nohead_dir):
    """`distill export ... --report report.json`: the speed-ups `distill report` measured
    for this folder (matched by path) go into the card."""
    from distill_pretrain.export import export_checkpoint

    run = write_checkpoint(tmp_path / "run", str(tiny_teacher_nohead_dir),
                           student={"num_layers": 2}, objective=MINILM)
    out = tmp_path / "student"
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"models": {
        "teacher": {"path": str(tiny_teacher_nohead_dir), "speedup": {"cpu_b1": 1.0}},
        "student": {"path": str(out), "speedup": {"cpu_b1": 1.91, "cpu_b32": 1.94}}}}))
    export_checkpoint(run, out, report=report)
    card = (out / "README.md").read_text()
    assert "speed-up over the teacher (CPU, batch 1): 1.91x" in card
    assert "speed-up over the teacher (CPU, batch 32): 1.94x" in card


def test_every_objective_has_words_on_the_card():
    """A new objective (ObjectiveConfig field) without OBJECTIVE_WORDS would print its bare
    name on the card; each one's words fill from its own section's defaults."""
    from dataclasses import asdict
    from typing import get_args, get_type_hints

    from distill_pretrain.config import ObjectiveConfig
    from distill_pretrain.export_card import OBJECTIVE_WORDS, _objective_lines

    sections = get_type_hints(ObjectiveConfig)  # name -> Optional[its section's type]
    assert sorted(OBJECTIVE_WORDS) == sorted(sections)
    for name, hint in sections.items():
        section_type = get_args(hint)[0]
        line, = _objective_lines({name: asdict(section_type())})
        assert "{" not in line and "?" not in line, line
