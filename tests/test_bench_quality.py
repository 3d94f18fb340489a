"""bench/quality.py's summary row of a task: every model's scores and retention, the
(a)-(b) margin with its paired-bootstrap interval, and the (a)-(c) one only when (c) ran
(--no-scratch leaves the random-init MLM-only student out)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def _result(correct_per_seed: list[int], n: int = 40) -> dict:
    """A classification result of len(correct_per_seed) seeds on n test examples, all of
    label 1; seed i predicts the first correct_per_seed[i] right."""
    gold = [1] * n
    seeds = []
    for k in correct_per_seed:
        predictions = [1] * k + [0] * (n - k)
        seeds.append({"test": {"accuracy": k / n}, "validation": {"accuracy": k / n},
                      "predictions": predictions})
    scores = [s["test"]["accuracy"] for s in seeds]
    return {"task": "t", "type": "classification", "metric": "accuracy",
            "score_split": "test", "gold": gold, "seeds": seeds,
            "score": sum(scores) / len(scores), "score_std": 0.0,
            "sizes": {"test": n}}


def test_task_row_with_and_without_the_scratch_student():
    from quality import _task_row

    results = {"teacher": {"t": _result([40, 40])}, "a_distilled": {"t": _result([36, 38])},
               "b_teacher_layers": {"t": _result([20, 22])}}
    row = _task_row("t", results, None, draws=200)
    assert row["a_minus_b"] == 0.4 and "a_minus_c" not in row and "a_vs_c" not in row
    assert row["a_vs_b"]["ci95"][0] > 0  # 16 more right of 40 per seed: not noise
    assert row["a_distilled"]["retention_pct"] == 92.5 and row["test_examples"] == 40

    results["c_mlm_only"] = {"t": _result([38, 38])}
    row = _task_row("t", results, None, draws=200)
    assert row["a_minus_c"] == -0.025
    assert row["a_vs_c"]["ci95"][0] <= 0  # (a) does not beat (c) here


def test_task_row_with_a_teacher_of_fewer_seeds():
    """--teacher-seeds 0: the teacher's one run gives retention; the students' margins
    still pair their two seeds."""
    from quality import _task_row

    results = {"teacher": {"t": _result([40])}, "a_distilled": {"t": _result([36, 38])},
               "b_teacher_layers": {"t": _result([20, 22])}}
    row = _task_row("t", results, None, draws=200)
    assert row["teacher"]["per_seed"] == [1.0]
    assert row["a_distilled"]["retention_pct"] == 92.5
    assert row["a_minus_b"] == 0.4 and row["a_vs_b"]["ci95"][0] > 0


def test_a_variant_on_another_corpus_gets_its_own_shards(tmp_path):
    """--set-a prep.sources=...: the variant prepares into OUT/shards-NAME, so the shared
    shards (which (b) of a pruned recipe is calibrated on) are not overwritten; other
    overrides share them; a prep override without a variant name is refused."""
    import pytest
    from quality import variant_shards

    shards = tmp_path / "shards"
    assert variant_shards(shards, "-lw", ["train.lr=1e-4"]) == shards
    assert variant_shards(shards, "", []) == shards
    assert variant_shards(shards, "-rt", ["train.lr=1e-4", "prep.sources=[bbc_news]"]) \
        == tmp_path / "shards-rt"
    with pytest.raises(SystemExit, match="--variant NAME"):
        variant_shards(shards, "", ["prep.sources=[bbc_news]"])
