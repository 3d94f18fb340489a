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
"""

from __future__ import annotations

from typing import Sequence

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


def paired_bootstrap(task_type: str, metric: str, gold: Sequence,
                     preds_a: Sequence[Sequence], preds_b: Sequence[Sequence],
                     draws: int = 2000, seed: int = 0) -> dict:
    """Bootstrap the difference A - B of ``metric``.

    ``gold``: the labels of the split; ``preds_a``/``preds_b``: one prediction list per
    seed, each in the order of ``gold``. Returns ``diff`` (observed, mean over seeds),
    ``ci95`` ([low, high]), ``p_a_ahead`` (share of draws with A ahead; ties count half)
    and the counts used."""
    n = len(gold)
    if n == 0:
        raise ValueError("paired_bootstrap: no examples to compare on")
    if not preds_a or not preds_b:
        raise ValueError("paired_bootstrap: each model needs the predictions of at least "
                         "one seed")
    for name, runs in (("A", preds_a), ("B", preds_b)):
        for k, run in enumerate(runs):
            if len(run) != n:
                raise ValueError(f"paired_bootstrap: model {name} seed #{k} has {len(run)} "
                                 f"predictions for {n} examples; predictions must be in "
                                 f"the order of the gold labels")
    if draws < 1:
        raise ValueError(f"paired_bootstrap: draws must be >= 1, got {draws}")

    fast = _confusion_metric(metric) if task_type in CLASSIFICATION else None
    if fast is not None:  # integer codes and a confusion matrix per draw, not sklearn
        codes = {label: k for k, label in enumerate(sorted(
            {*gold, *(x for run in (*preds_a, *preds_b) for x in run)}, key=str))}
        gold, k = np.array([codes[g] for g in gold]), len(codes)
        preds_a, preds_b = ([np.array([codes[x] for x in run]) for run in runs]
                            for runs in (preds_a, preds_b))

        def score(preds, idx) -> float:
            return fast(gold[idx], preds[idx], k)
    else:
        def score(preds, idx) -> float:
            return task_metrics(task_type, [gold[i] for i in idx],
                                [preds[i] for i in idx])[metric]

    def per_seed(runs, idx) -> np.ndarray:
        return np.array([score(run, idx) for run in runs])

    everything = np.arange(n)
    observed = float(per_seed(preds_a, everything).mean()
                     - per_seed(preds_b, everything).mean())
    rng = np.random.default_rng(seed)
    diffs = np.empty(draws)
    for d in range(draws):
        idx = rng.integers(0, n, n)
        seeds_a = rng.integers(0, len(preds_a), len(preds_a))
        seeds_b = rng.integers(0, len(preds_b), len(preds_b))
        # each seed scored once on this draw's examples, then the seeds resampled
        diffs[d] = (per_seed(preds_a, idx)[seeds_a].mean()
                    - per_seed(preds_b, idx)[seeds_b].mean())
    low, high = np.percentile(diffs, [2.5, 97.5])
    ahead = float(np.mean(diffs > 0) + 0.5 * np.mean(diffs == 0))
    return {"metric": metric, "diff": round(observed, 4),
            "ci95": [round(float(low), 4), round(float(high), 4)],
            "p_a_ahead": round(ahead, 4), "draws": draws, "examples": n,
            "seeds": [len(preds_a), len(preds_b)]}


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
