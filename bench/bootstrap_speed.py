"""Benchmark: the paired bootstrap of a token task (`distill compare`, the report's
intervals) on 10,000 tagged sentences, 2 seeds a side, 2,000 draws.

The scorer in use sums per-example statistics taken once (correct tags, entity spans);
the baseline, measured in the same run, recomputes seqeval's metric on the drawn
sentences at every draw (what compare did before): it is timed on the first few draws
only and extrapolated to all of them. The first draws of both must agree exactly.
Prints one JSON line.

    .venv/bin/python bench/bootstrap_speed.py [--sentences 10000] [--draws 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TYPES = ("PER", "LOC", "ORG", "MISC")


def tagged_sentences(n: int, rng: random.Random) -> list[list[str]]:
    """CoNLL-like: 8-25 words, mostly O, entities of 1-3 words."""
    out = []
    for _ in range(n):
        tags: list[str] = []
        length = rng.randint(8, 25)
        while len(tags) < length:
            if rng.random() < 0.15:
                kind = rng.choice(TYPES)
                span = rng.randint(1, 3)
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (span - 1)
            else:
                tags.append("O")
        out.append(tags[:length])
    return out


def predicted(gold: list[list[str]], error_rate: float, rng: random.Random):
    every = ["O"] + [f"{p}-{t}" for t in TYPES for p in "BI"]
    return [[rng.choice(every) if rng.random() < error_rate else t for t in s] for s in gold]


def main() -> None:
    from finetune.compare import (_resampled_scores, _seed_scorer, paired_bootstrap,
                                  recomputing_scorer)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=10_000)
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--baseline-draws", type=int, default=5,
                    help="draws of the recomputing baseline (extrapolated to --draws)")
    ap.add_argument("--metric", default="entity_f1", choices=["entity_f1", "token_accuracy"])
    args = ap.parse_args()

    rng = random.Random(0)
    gold = tagged_sentences(args.sentences, rng)
    runs_a = [predicted(gold, 0.05, rng) for _ in range(2)]
    runs_b = [predicted(gold, 0.08, rng) for _ in range(2)]

    wall, cpu = time.perf_counter(), time.process_time()
    result = paired_bootstrap("token_classification", args.metric, gold, runs_a, runs_b,
                              draws=args.draws)
    new_wall, new_cpu = time.perf_counter() - wall, time.process_time() - cpu

    wall = time.perf_counter()
    scorers = [_seed_scorer("token_classification", args.metric, gold, r, None)
               for r in (runs_a, runs_b)]
    setup_wall = time.perf_counter() - wall
    fast = _resampled_scores(scorers, [2, 2], len(gold), args.baseline_draws, seed=0)

    wall, cpu = time.perf_counter(), time.process_time()
    slow_scorers = [recomputing_scorer("token_classification", args.metric, gold, r)
                    for r in (runs_a, runs_b)]
    slow = _resampled_scores(slow_scorers, [2, 2], len(gold), args.baseline_draws, seed=0)
    per_draw_wall = (time.perf_counter() - wall) / args.baseline_draws
    per_draw_cpu = (time.process_time() - cpu) / args.baseline_draws

    print(json.dumps({
        "sentences": args.sentences, "tags": sum(len(s) for s in gold),
        "seeds_per_side": 2, "draws": args.draws, "metric": args.metric,
        "seconds": round(new_wall, 2), "cpu_seconds": round(new_cpu, 2),
        "statistics_setup_seconds": round(setup_wall, 2),
        "baseline_draws_timed": args.baseline_draws,
        "baseline_seconds_per_draw": round(per_draw_wall, 3),
        "baseline_seconds_extrapolated": round(per_draw_wall * args.draws, 1),
        "speedup_wall": round(per_draw_wall * args.draws / new_wall, 1),
        "speedup_cpu": round(per_draw_cpu * args.draws / new_cpu, 1),
        "first_draws_agree": bool(abs(fast - slow).max() < 1e-12),
        "diff": result["diff"], "ci95": result["ci95"]}))


if __name__ == "__main__":
    main()
