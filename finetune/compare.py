"""Is model A better than model B on a task, or is the gap noise?

Two sources of noise hide a small gap: which seed fine-tuned the model, and which
examples happen to be in the test split (213 BBC News articles move accuracy in steps of
0.47 points). ``paired_bootstrap`` resamples both, from the per-seed predictions that
``run_task`` keeps in ``results.json``:

- the test examples, with replacement, the same draw for A and B (paired: an article
  both get wrong costs neither);
- the seeds of each model, with replacement, independently (different models share no
  seed effect).

Each draw gives mean-over-seeds(A) - mean-over-seeds(B) of the task metric on the drawn
examples. Reported: the observed difference, the 2.5/97.5 percentiles of the draws and
the share of draws where A is ahead.

A draw must cost little: token tasks score each draw from per-example statistics taken
once (correct tags; entity spans), classification from a confusion matrix of integer
codes; only other metrics (regression's correlations) are recomputed on the drawn
examples. bench/bootstrap_speed.py measures it.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from finetune.metrics import task_metrics


CLASSIFICATION = ("classification", "pair_classification")


def _confusion_metric(metric: str):
    """accuracy, macro-F1 or MCC from integer labels through a confusion matrix, the
    same values as scikit-learn's (macro-F1 averages over the classes that occur in the
    gold or the predictions, a class with no true or predicted example scores 0; MCC is
    0 when undefined). None for any other metric."""
    def confusion(gold, pred, k):
        return np.bincount(gold * k + pred, minlength=k * k).reshape(k, k).astype(float)

    def accuracy(gold, pred, k):
        return float(np.mean(gold == pred))

    def macro_f1(gold, pred, k):
        cm = confusion(gold, pred, k)
        tp = np.diag(cm)
        denom = cm.sum(0) + cm.sum(1)  # 2TP + FP + FN
        present = denom > 0
        return float(np.mean(2 * tp[present] / denom[present]))

    def mcc(gold, pred, k):
        cm = confusion(gold, pred, k)
        total, correct = cm.sum(), np.trace(cm)
        true_counts, pred_counts = cm.sum(1), cm.sum(0)
        cov = correct * total - pred_counts @ true_counts
        denom = np.sqrt((total ** 2 - pred_counts @ pred_counts)
                        * (total ** 2 - true_counts @ true_counts))
        return float(cov / denom) if denom > 0 else 0.0

    return {"accuracy": accuracy, "macro_f1": macro_f1, "mcc": mcc}.get(metric)


def _token_stats(metric: str, gold: Sequence, runs: Sequence[Sequence]
                 ) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Per-example sufficient statistics of a token metric, so that the metric of any
    multiset of examples is sum(numerator) / sum(denominator) (0 when the denominator is
    0): token_accuracy from correct and total tags; entity_f1 (seqeval's micro F1 over
    BIO spans: 2 TP / (predicted + gold spans)) from the spans of each sentence, taken
    once with seqeval's own span extraction (a sentence's spans are those it has in
    seqeval's concatenation, which puts an "O" between sentences). Returns
    (numerator (seeds, n), denominator (seeds, n)); None for any other metric."""
    if metric not in ("token_accuracy", "entity_f1"):
        return None
    for k, run in enumerate(runs):
        bad = next((i for i, (g, p) in enumerate(zip(gold, run)) if len(g) != len(p)), None)
        if bad is not None:
            raise ValueError(f"paired_bootstrap: seed #{k} predicts {len(run[bad])} tags "
                             f"for the {len(gold[bad])} words of example {bad}")
    if metric == "token_accuracy":
        total = np.array([len(g) for g in gold], dtype=float)
        correct = np.array([[sum(a == b for a, b in zip(g, p)) for g, p in zip(gold, run)]
                            for run in runs], dtype=float)
        return correct, np.broadcast_to(total, correct.shape)
    from seqeval.metrics.sequence_labeling import get_entities

    gold_spans = [set(get_entities(list(g))) for g in gold]
    both, counts = [], []
    for run in runs:
        pred_spans = [set(get_entities(list(p))) for p in run]
        both.append([2 * len(g & p) for g, p in zip(gold_spans, pred_spans)])
        counts.append([len(g) + len(p) for g, p in zip(gold_spans, pred_spans)])
    return np.array(both, dtype=float), np.array(counts, dtype=float)


def _seed_scorer(task_type: str, metric: str, gold: Sequence, runs: Sequence[Sequence],
                 codes: Optional[dict]) -> Callable[[np.ndarray], np.ndarray]:
    """A function from the drawn example indices to each seed's score on them. Token
    metrics: a weighted sum of per-example statistics (a draw costs two dot products);
    classification: a confusion matrix of integer codes; anything else recomputes the
    metric on the drawn examples (task_metrics)."""
    n = len(gold)
    stats = _token_stats(metric, gold, runs) if task_type == "token_classification" else None
    if stats is not None:
        numerator, denominator = stats

        def from_stats(idx):
            weights = np.bincount(idx, minlength=n).astype(float)
            num, den = numerator @ weights, denominator @ weights
            return np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        return from_stats
    fast = _confusion_metric(metric) if task_type in CLASSIFICATION else None
    if fast is not None:
        gold_codes = np.array([codes[g] for g in gold])
        run_codes = [np.array([codes[x] for x in run]) for run in runs]
        return lambda idx: np.array([fast(gold_codes[idx], r[idx], len(codes))
                                     for r in run_codes])
    return recomputing_scorer(task_type, metric, gold, runs)


def recomputing_scorer(task_type: str, metric: str, gold: Sequence, runs: Sequence[Sequence]
                       ) -> Callable[[np.ndarray], np.ndarray]:
    """Each seed's score on the drawn examples, the metric computed afresh on them (the
    reference the faster scorers are tested and benchmarked against)."""
    return lambda idx: np.array([
        task_metrics(task_type, [gold[i] for i in idx], [run[i] for i in idx])[metric]
        for run in runs])


def _resampled_scores(scorers: Sequence[Callable], seed_counts: Sequence[int], n: int,
                      draws: int, seed: int) -> np.ndarray:
    """(draws, models): per draw, the examples resampled (the same for every model: the
    pairing), each model scored per seed on them, its seeds resampled and averaged."""
    rng = np.random.default_rng(seed)
    out = np.empty((draws, len(scorers)))
    for d in range(draws):
        idx = rng.integers(0, n, n)
        for m, (scorer, k) in enumerate(zip(scorers, seed_counts)):
            out[d, m] = scorer(idx)[rng.integers(0, k, k)].mean()
    return out


def _check_runs(gold: Sequence, named_runs: dict, draws: int) -> None:
    n = len(gold)
    if n == 0:
        raise ValueError("paired_bootstrap: no examples to compare on")
    if any(not runs for runs in named_runs.values()):
        raise ValueError("paired_bootstrap: each model needs the predictions of at least "
                         "one seed")
    for name, runs in named_runs.items():
        for k, run in enumerate(runs):
            if len(run) != n:
                raise ValueError(f"paired_bootstrap: model {name} seed #{k} has {len(run)} "
                                 f"predictions for {n} examples; predictions must be in "
                                 f"the order of the gold labels")
    if draws < 1:
        raise ValueError(f"paired_bootstrap: draws must be >= 1, got {draws}")


def _scorers(task_type: str, metric: str, gold: Sequence, *model_runs: Sequence[Sequence]
             ) -> list[Callable]:
    codes = None
    if task_type in CLASSIFICATION:  # one integer code per label, shared by the models
        every = {*gold, *(x for runs in model_runs for run in runs for x in run)}
        codes = {label: k for k, label in enumerate(sorted(every, key=str))}
    return [_seed_scorer(task_type, metric, gold, runs, codes) for runs in model_runs]


def _interval(values: np.ndarray) -> list[float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return [round(float(low), 4), round(float(high), 4)]


def paired_bootstrap(task_type: str, metric: str, gold: Sequence,
                     preds_a: Sequence[Sequence], preds_b: Sequence[Sequence],
                     draws: int = 2000, seed: int = 0) -> dict:
    """Bootstrap the difference A - B of ``metric``.

    ``gold``: the labels of the split; ``preds_a``/``preds_b``: one prediction list per
    seed, each in the order of ``gold``. Returns ``diff`` (observed, mean over seeds),
    ``ci95`` ([low, high]), ``p_a_ahead`` (share of draws with A ahead; ties count half)
    and the counts used."""
    _check_runs(gold, {"A": preds_a, "B": preds_b}, draws)
    n = len(gold)
    scorers = _scorers(task_type, metric, gold, preds_a, preds_b)
    everything = np.arange(n)
    observed = float(scorers[0](everything).mean() - scorers[1](everything).mean())
    scores = _resampled_scores(scorers, [len(preds_a), len(preds_b)], n, draws, seed)
    diffs = scores[:, 0] - scores[:, 1]
    ahead = float(np.mean(diffs > 0) + 0.5 * np.mean(diffs == 0))
    return {"metric": metric, "diff": round(observed, 4), "ci95": _interval(diffs),
            "p_a_ahead": round(ahead, 4), "draws": draws, "examples": n,
            "seeds": [len(preds_a), len(preds_b)]}


def score_interval(result: dict, draws: int = 2000, seed: int = 0) -> dict:
    """The 95% interval of one ``run_task`` result's score (mean over seeds), by the same
    bootstrap over its examples and seeds: the error bar of the report's plots."""
    if "gold" not in result or any("predictions" not in s for s in result["seeds"]):
        raise ValueError(f"score_interval: no kept predictions in the results of "
                         f"{result.get('model_dir', '?')}; fine-tune again with this version")
    runs = [s["predictions"] for s in result["seeds"]]
    _check_runs(result["gold"], {"A": runs}, draws)
    scorer = _scorers(result["type"], result["metric"], result["gold"], runs)
    scores = _resampled_scores(scorer, [len(runs)], len(result["gold"]), draws, seed)
    return {"metric": result["metric"], "ci95": _interval(scores[:, 0]), "draws": draws}


def compare_results(res_a: dict, res_b: dict, draws: int = 2000, seed: int = 0) -> dict:
    """``paired_bootstrap`` of two ``run_task`` results of the same task and split."""
    for key in ("task", "score_split", "metric"):
        if res_a.get(key) != res_b.get(key):
            raise ValueError(f"compare_results: the results differ in {key!r} "
                             f"({res_a.get(key)!r} vs {res_b.get(key)!r})")
    missing = [r.get("model_dir", "?") for r in (res_a, res_b)
               if "gold" not in r or any("predictions" not in s for s in r["seeds"])]
    if missing:
        raise ValueError(f"compare_results: no kept predictions in the results of "
                         f"{', '.join(missing)}; fine-tune again with this version")
    if res_a["gold"] != res_b["gold"]:
        raise ValueError("compare_results: the two results were scored on different "
                         "examples (the gold labels differ); use the same task split")
    return paired_bootstrap(res_a["type"], res_a["metric"], res_a["gold"],
                            [s["predictions"] for s in res_a["seeds"]],
                            [s["predictions"] for s in res_b["seeds"]], draws, seed)
