"""Task metrics, each from a maintained library (scikit-learn, scipy, seqeval)."""

from __future__ import annotations

import math
from typing import Sequence


def classification_metrics(y_true: Sequence, y_pred: Sequence) -> dict[str, float]:
    """accuracy, macro-F1 and Matthews correlation (scikit-learn)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            "mcc": float(matthews_corrcoef(y_true, y_pred))}


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlation (scipy) and MSE (scikit-learn). A constant
    prediction has no correlation: reported as 0, not NaN, so early stopping can compare."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_squared_error

    t, p = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    constant = np.ptp(p) == 0 or np.ptp(t) == 0
    pearson = 0.0 if constant else float(pearsonr(t, p).statistic)
    spearman = 0.0 if constant else float(spearmanr(t, p).statistic)
    return {"pearson": 0.0 if math.isnan(pearson) else pearson,
            "spearman": 0.0 if math.isnan(spearman) else spearman,
            "mse": float(mean_squared_error(t, p))}


def is_span_tag(tag: str) -> bool:
    """``O`` or a span tag: a scheme prefix with a type (``B-PER``, ``I-NP``, also E-/S-/
    L-/U-) or without one (a bare ``B``, which seqeval reads as an untyped span)."""
    return tag == "O" or (tag[:1] in ("B", "I", "E", "S", "L", "U")
                          and (len(tag) == 1 or (len(tag) > 2 and tag[1] == "-")))


def token_metrics(tags_true: Sequence[Sequence[str]], tags_pred: Sequence[Sequence[str]]
                  ) -> dict[str, float]:
    """Per-token accuracy and, where the gold tags mark spans (BIO), entity-level
    precision/recall/F1 (seqeval, CoNLL rules). Word-class tags (``NN``, ``VBZ``: part of
    speech) have no spans: only token accuracy."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    t, p = [list(s) for s in tags_true], [list(s) for s in tags_pred]
    scores = {"token_accuracy": float(accuracy_score(t, p))}
    if all(is_span_tag(tag) for sent in t for tag in sent):
        scores.update({"entity_f1": float(f1_score(t, p, zero_division=0)),
                       "entity_precision": float(precision_score(t, p, zero_division=0)),
                       "entity_recall": float(recall_score(t, p, zero_division=0))})
    return scores


def task_metrics(task_type: str, y_true: Sequence, y_pred: Sequence) -> dict[str, float]:
    if task_type in ("classification", "pair_classification"):
        return classification_metrics(y_true, y_pred)
    if task_type == "regression":
        return regression_metrics(y_true, y_pred)
    if task_type == "token_classification":
        return token_metrics(y_true, y_pred)
    raise ValueError(f"unknown task type {task_type!r}")
