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


TAGS = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "I-MISC", "B"]


def random_tagging(rng: random.Random, n: int) -> list[list[str]]:
    """Sentences of random BIO tags, ill-formed ones included (I- without B-, a bare B,
    type changes inside a chunk): the span rules must agree with seqeval's on all."""
    return [[rng.choice(TAGS) for _ in range(rng.randint(1, 9))] for _ in range(n)]


def corrupt(rng: random.Random, tagging: list[list[str]], p: float) -> list[list[str]]:
    return [[rng.choice(TAGS) if rng.random() < p else t for t in s] for s in tagging]


@pytest.mark.parametrize("metric", ["entity_f1", "token_accuracy"])
def test_token_statistics_equal_seqeval_on_random_draws(metric):
    """Per-example sufficient statistics summed over a draw (repeats included) give what
    seqeval computes on the drawn sentences, for random and degenerate cases."""
    from finetune.compare import _seed_scorer
    from finetune.metrics import token_metrics

    rng = random.Random(4)
    for trial in range(40):
        n = rng.randint(1, 30)
        gold = random_tagging(rng, n)
        runs = [corrupt(rng, gold, rng.choice([0.0, 0.2, 0.8])) for _ in range(2)]
        if trial % 10 == 0:
            runs[0] = [["O"] * len(s) for s in gold]  # no predicted entity at all
        scorer = _seed_scorer("token_classification", metric, gold, runs, None)
        idx = np.array([rng.randrange(n) for _ in range(n)])
        want = [token_metrics([gold[i] for i in idx], [run[i] for i in idx])[metric]
                for run in runs]
        assert scorer(idx) == pytest.approx(want, abs=1e-12), (trial, gold, runs, idx)


def test_token_bootstrap_draws_equal_the_recomputed_ones():
    """The same draws through the statistics and through seqeval: the same intervals."""
    from finetune.compare import _resampled_scores, _seed_scorer, recomputing_scorer

    rng = random.Random(5)
    gold = random_tagging(rng, 60)
    model_runs = [[corrupt(rng, gold, p) for _ in range(2)] for p in (0.1, 0.3)]
    for metric in ("entity_f1", "token_accuracy"):
        fast = [_seed_scorer("token_classification", metric, gold, r, None)
                for r in model_runs]
        slow = [recomputing_scorer("token_classification", metric, gold, r)
                for r in model_runs]
        a = _resampled_scores(fast, [2, 2], len(gold), 50, seed=3)
        b = _resampled_scores(slow, [2, 2], len(gold), 50, seed=3)
        np.testing.assert_allclose(a, b, atol=1e-12)
    res = paired_bootstrap("token_classification", "entity_f1", gold, *model_runs, draws=300)
    assert res["diff"] > 0 and res["ci95"][0] < res["diff"] < res["ci95"][1]


def test_token_predictions_must_match_the_sentence_lengths():
    gold = [["B-PER", "O"], ["O"]]
    with pytest.raises(ValueError, match="predicts 1 tags for the 2 words of example 0"):
        paired_bootstrap("token_classification", "entity_f1", gold, [gold], [[["O"], ["O"]]])


def test_score_interval_of_one_result():
    from finetune.compare import score_interval

    rng = random.Random(6)
    gold = random_tagging(rng, 200)
    result = {"type": "token_classification", "metric": "token_accuracy", "gold": gold,
              "seeds": [{"predictions": corrupt(rng, gold, 0.3)} for _ in range(3)]}
    from finetune.metrics import token_metrics

    observed = np.mean([token_metrics(gold, s["predictions"])["token_accuracy"]
                        for s in result["seeds"]])
    low, high = score_interval(result, draws=400)["ci95"]
    assert low < observed < high and high - low < 0.1  # about 1,000 tags
    with pytest.raises(ValueError, match="no kept predictions"):
        score_interval({**result, "seeds": [{}]})
