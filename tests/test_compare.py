"""finetune.compare: the paired bootstrap that says whether a gap between two fine-tuned
models is more than seed and test-sample noise."""

from __future__ import annotations

import random

import numpy as np
import pytest

from finetune.compare import _confusion_metric, compare_results, paired_bootstrap
from finetune.metrics import classification_metrics


def noisy(gold, labels, p_right, rng):
    return [g if rng.random() < p_right else rng.choice(labels) for g in gold]


@pytest.mark.filterwarnings("ignore:A single label was found")
@pytest.mark.parametrize("metric", ["accuracy", "macro_f1", "mcc"])
def test_confusion_metrics_equal_scikit_learn(metric):
    """Including classes that never occur in gold or predictions, and constant
    predictions (MCC undefined -> 0)."""
    rng = np.random.default_rng(0)
    fast = _confusion_metric(metric)
    for trial in range(60):
        k = int(rng.integers(2, 7))
        n = int(rng.integers(1, 40))
        gold = rng.integers(0, k, n)
        pred = rng.integers(0, k - 1, n) if trial % 3 else gold.copy()
        if trial % 7 == 0:
            pred = np.zeros(n, dtype=int)
        want = classification_metrics(gold.tolist(), pred.tolist())[metric]
        assert fast(gold, pred, k) == pytest.approx(want, abs=1e-12), (trial, gold, pred)


def test_a_clear_gap_is_found_and_a_tie_is_not():
    rng = random.Random(1)
    labels = list("abcde")
    gold = [rng.choice(labels) for _ in range(400)]
    good = [noisy(gold, labels, 0.95, rng) for _ in range(3)]
    bad = [noisy(gold, labels, 0.75, rng) for _ in range(3)]
    gap = paired_bootstrap("classification", "accuracy", gold, good, bad, draws=500)
    assert 0.15 < gap["diff"] < 0.25
    assert gap["ci95"][0] > 0.1 and gap["p_a_ahead"] == 1.0
    assert gap["examples"] == 400 and gap["seeds"] == [3, 3]
    # Reversed: the same gap, negative.
    back = paired_bootstrap("classification", "accuracy", gold, bad, good, draws=500)
    assert back["diff"] == pytest.approx(-gap["diff"]) and back["p_a_ahead"] == 0.0

    # Two models of the same quality: the interval holds 0.
    twin_a = [noisy(gold, labels, 0.9, rng) for _ in range(3)]
    twin_b = [noisy(gold, labels, 0.9, rng) for _ in range(3)]
    tie = paired_bootstrap("classification", "macro_f1", gold, twin_a, twin_b, draws=500)
    assert tie["ci95"][0] < 0 < tie["ci95"][1]
    assert 0.02 < tie["p_a_ahead"] < 0.98

    # One identical seed each: every draw is exactly 0.
    same = paired_bootstrap("classification", "mcc", gold, good[:1], good[:1], draws=50)
    assert same["diff"] == 0 and same["ci95"] == [0, 0] and same["p_a_ahead"] == 0.5


def test_pairing_makes_shared_mistakes_free():
    """A and B make the same mistakes except on a few examples A gets right: the pairs
    make the interval much narrower than the two scores' own sampling noise."""
    rng = random.Random(2)
    labels = list("xyz")
    gold = [rng.choice(labels) for _ in range(300)]
    b = noisy(gold, labels, 0.7, rng)
    a = list(b)
    fixed = [i for i, (g, p) in enumerate(zip(gold, b)) if g != p][:9]
    for i in fixed:
        a[i] = gold[i]
    res = paired_bootstrap("classification", "accuracy", gold, [a], [b], draws=1000)
    assert res["diff"] == pytest.approx(9 / 300)
    assert res["ci95"][0] > 0  # every draw: A >= B, and almost always ahead
    assert res["ci95"][1] - res["ci95"][0] < 0.05


def test_generic_metrics_go_through_task_metrics():
    rng = np.random.default_rng(3)
    gold = rng.normal(size=80).tolist()
    close = [[g + 0.1 * rng.normal() for g in gold] for _ in range(2)]
    far = [[g + 1.0 * rng.normal() for g in gold] for _ in range(2)]
    res = paired_bootstrap("regression", "pearson", gold, close, far, draws=100)
    assert res["diff"] > 0.2 and res["ci95"][0] > 0


def test_bad_inputs_are_named():
    gold = ["a", "b", "a"]
    with pytest.raises(ValueError, match="model B seed #1 has 2 predictions for 3"):
        paired_bootstrap("classification", "accuracy", gold, [gold], [gold, gold[:2]])
    with pytest.raises(ValueError, match="no examples"):
        paired_bootstrap("classification", "accuracy", [], [[]], [[]])
    with pytest.raises(ValueError, match="at least one seed"):
        paired_bootstrap("classification", "accuracy", gold, [], [gold])
    base = {"task": "t", "type": "classification", "metric": "accuracy",
            "score_split": "test", "gold": gold, "model_dir": "m1",
            "seeds": [{"predictions": gold}]}
    with pytest.raises(ValueError, match="differ in 'score_split'"):
        compare_results(base, {**base, "score_split": "validation"})
    with pytest.raises(ValueError, match="no kept predictions in the results of m2"):
        compare_results(base, {**base, "model_dir": "m2", "seeds": [{}]})
    with pytest.raises(ValueError, match="different examples"):
        compare_results(base, {**base, "gold": ["b", "b", "a"]})


def test_compare_cli(tmp_path, capsys):
    """`distill compare A B` on two results.json files (or their folders); a missing or
    mismatched file is a one-line error naming it."""
    import json

    from distill_cli.main import main

    gold = ["a", "b"] * 100
    flip = {"a": "b", "b": "a"}

    def write(folder, right):
        preds = gold[:right] + [flip[g] for g in gold[right:]]
        res = {"task": "t", "type": "classification", "metric": "accuracy",
               "score_split": "test", "model_dir": str(folder), "gold": gold,
               "seeds": [{"seed": 0, "predictions": preds}]}
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(res))
        return folder

    a, b = write(tmp_path / "a", 190), write(tmp_path / "b", 150)
    assert main(["compare", str(a / "results.json"), str(b), "--draws", "200"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["diff"] == pytest.approx(0.2) and out["ci95"][0] > 0.1
    assert out["task"] == "t" and out["draws"] == 200 and out["a"] == str(a)

    assert main(["compare", str(a), str(tmp_path / "nope")]) == 2
    assert "nope: no results.json there" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text(json.dumps(
        {"task": "other", "score_split": "test", "metric": "accuracy"}))
    assert main(["compare", str(a), str(tmp_path / "c")]) == 2
    assert "differ in 'task'" in capsys.readouterr().err
