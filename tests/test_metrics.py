"""Metric values on hand-made cases (computed by hand in the comments)."""

from __future__ import annotations

import math
import warnings

import pytest

from finetune.metrics import (classification_metrics, regression_metrics, task_metrics,
                              token_metrics)


def test_classification_hand_made():
    m = classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", "b"])
    assert m["accuracy"] == pytest.approx(0.75)
    # F1(a) = 2*1*0.5/1.5 = 2/3; F1(b) = 2*(2/3)*1/(5/3) = 0.8; macro = 0.7333
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    # b positive: TP 2, TN 1, FP 1, FN 0 -> (2*1 - 1*0) / sqrt(3*2*1*2)
    assert m["mcc"] == pytest.approx(2 / math.sqrt(12))


def test_classification_perfect_and_inverted():
    assert classification_metrics([0, 1, 0, 1], [0, 1, 0, 1]) == \
        {"accuracy": 1.0, "macro_f1": 1.0, "mcc": 1.0}
    assert classification_metrics([0, 1, 0, 1], [1, 0, 1, 0])["mcc"] == pytest.approx(-1.0)


def test_regression_hand_made():
    m = regression_metrics([1, 2, 3, 4], [2, 4, 6, 8])
    assert m["pearson"] == pytest.approx(1.0) and m["spearman"] == pytest.approx(1.0)
    assert m["mse"] == pytest.approx((1 + 4 + 9 + 16) / 4)
    m = regression_metrics([1, 2, 3], [3, 2, 1])
    assert m["pearson"] == pytest.approx(-1.0) and m["spearman"] == pytest.approx(-1.0)
    # Monotone but not linear: Spearman 1, Pearson below 1.
    m = regression_metrics([1, 2, 3, 4], [1, 2, 3, 100])
    assert m["spearman"] == pytest.approx(1.0) and m["pearson"] < 0.9


def test_regression_constant_prediction_is_zero_not_nan():
    m = regression_metrics([1, 2, 3], [2, 2, 2])
    assert m["pearson"] == 0.0 and m["spearman"] == 0.0


def test_entity_f1_hand_made():
    true = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "I-PER", "O", "O"]]
    m = token_metrics(true, pred)
    assert m["entity_precision"] == pytest.approx(1.0)
    assert m["entity_recall"] == pytest.approx(0.5)
    assert m["entity_f1"] == pytest.approx(2 / 3)
    assert m["token_accuracy"] == pytest.approx(0.75)
    # A span with the wrong boundary is a miss at entity level, though 1 of 2 tokens is right.
    m = token_metrics([["B-PER", "I-PER"]], [["B-PER", "O"]])
    assert m["entity_f1"] == 0.0 and m["token_accuracy"] == pytest.approx(0.5)


def test_word_class_tags_get_token_accuracy_only():
    true, pred = [["DT", "NN", "VBZ", "."]], [["DT", "NN", "NN", "."]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # seqeval warns on every non-BIO tag it parses
        assert token_metrics(true, pred) == {"token_accuracy": 0.75}
    assert "entity_f1" in token_metrics([["B-NP", "I-NP", "O"]], [["B-NP", "O", "O"]])


def test_task_metrics_dispatch():
    assert set(task_metrics("pair_classification", [0, 1], [0, 1])) == {"accuracy", "macro_f1", "mcc"}
    assert "entity_f1" in task_metrics("token_classification", [["O"]], [["O"]])
    with pytest.raises(ValueError):
        task_metrics("ranking", [1], [1])
