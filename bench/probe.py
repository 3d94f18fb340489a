"""Frozen-feature probe: what an encoder carries before fine-tuning moves it.

A multinomial logistic regression on the encoder's frozen last hidden states, trained on
the training examples the fine-tuning used, its C picked on the validation split, scored
with the task's own metric on test (validation when there is none):

- sentence tasks: one row per example, the mean-pooled hidden states;
- token tasks: one row per word, the hidden state of its first sub-word (the position
  the fine-tuned tagger reads), at most ``MAX_TOKEN_ROWS`` training words (a seeded
  subset: a 1,000-sentence POS split has ~20k words, and the fit's cost grows with them).
  A word cut off by max_length gets the fill tag, as in fine-tuning's predictions.

Used by bench/quality.py (one fit per model and task, no seeds), and from the command line
on any encoder's layers (``layer`` k: the hidden states after layer k, what the encoder
cut to its first k layers returns; 0 is the embeddings): where along the depth does a
teacher carry what a task needs? One JSON line, {task: {layer: probe result}}:

    python bench/probe.py MODEL --tasks oanc_pos,movie_sentiment --layers 2,3,4,5,6
        [--max-train 600]
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("bench.probe")

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
MAX_TOKEN_ROWS = 12000


def probe_data(task_name: str, cfg):
    """(task data with the training subset the fine-tuning used, its hyperparameters)."""
    from finetune.data import cap_train_split, load_task_data
    from finetune.tasks import load_task
    from finetune.train import resolve_hparams

    task = load_task(task_name)
    hp = resolve_hparams(task, cfg)
    data = load_task_data(task)
    cap_train_split(data, hp.max_train_examples, task.split.seed)
    return data, hp


def _features(encoder, tokenizer, data, examples, hp, layer: int | None = None):
    """(rows (n, width) as numpy, the split's EncodedSplit): mean-pooled per example, or
    one row per kept word (its first sub-word) for a token task, in example order; from
    the last hidden states, or those after ``layer`` (0: the embeddings)."""
    import numpy as np
    import torch

    from finetune.encode import collate, encode_split

    split = encode_split(tokenizer, data.task, examples, data.labels, hp.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    for start in range(0, len(split), 64):
        idx = list(range(start, min(start + 64, len(split))))
        batch = collate(split, idx, pad_id, with_targets=False)
        with torch.no_grad():
            if layer is None:
                hidden = encoder(**batch).last_hidden_state  # (batch, width, hidden)
            else:
                hidden = encoder(**batch, output_hidden_states=True).hidden_states[layer]
        if split.word_starts is None:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            rows.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
        else:
            rows += [hidden[k, split.word_starts[i]].numpy() for k, i in enumerate(idx)]
    return np.concatenate(rows), split


def _targets(data, examples, split) -> list:
    """The label of each feature row: the class, or the tag of each kept word."""
    if split.word_starts is None:
        return [ex.label for ex in examples]
    return [ex.label[w] for ex, starts in zip(examples, split.word_starts)
            for w in range(len(starts))]


def _predicted(data, split, flat: list) -> list:
    """Row predictions -> the task's prediction format (a tag list per sentence, padded
    with the fill tag for words max_length cut off)."""
    if split.word_starts is None:
        return list(flat)
    fill = "O" if "O" in data.labels else data.labels[0]
    out, at = [], 0
    for starts, n_words in zip(split.word_starts, split.n_words):
        tags = list(flat[at:at + len(starts)])
        at += len(starts)
        out.append(tags + [fill] * (n_words - len(tags)))
    return out


def _subsample(x, y: list, limit: int, seed: int):
    import numpy as np

    if len(y) <= limit:
        return x, y
    keep = np.sort(np.random.default_rng(seed).permutation(len(y))[:limit])
    return x[keep], [y[i] for i in keep]


def probe(model_dir: str, task_data, c_grid=C_GRID, max_token_rows: int = MAX_TOKEN_ROWS,
          layer: int | None = None) -> dict:
    """Fit the probe of ``model_dir`` on ``task_data`` (``probe_data``'s result), on its
    last hidden states or those after ``layer``: {"C", "validation", "test", "rows"}
    (scores as fractions, rows: training rows fitted)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from finetune.loading import load_encoder, load_tokenizer
    from finetune.metrics import task_metrics

    data, hp = task_data
    task = data.task
    tokenizer = load_tokenizer(Path(model_dir), task)
    encoder = load_encoder(Path(model_dir))
    depth = encoder.config.num_hidden_layers
    if layer is not None and not 0 <= layer <= depth:
        raise ValueError(f"layer={layer}: {model_dir} has layers 1..{depth} (0: the "
                         f"embeddings); pick one of those")

    def scorer(examples):
        """clf -> the task metric on ``examples`` (their features taken once)."""
        x, split = _features(encoder, tokenizer, data, examples, hp, layer)
        x = scaler.transform(x)
        gold = [ex.label for ex in examples]
        return lambda clf: task_metrics(task.type, gold, _predicted(
            data, split, clf.predict(x).tolist()))[task.metric]

    x_train, split = _features(encoder, tokenizer, data, data.train, hp, layer)
    y_train = _targets(data, data.train, split)
    x_train, y_train = _subsample(x_train, y_train, max_token_rows, task.split.seed)
    scaler = StandardScaler().fit(x_train)
    x_train = scaler.transform(x_train)
    on_validation = scorer(data.validation)
    best = None
    for c in c_grid:
        clf = LogisticRegression(C=c, max_iter=3000).fit(x_train, y_train)
        val = on_validation(clf)
        if best is None or val > best[0]:
            best = (val, c, clf)
    val, c, clf = best
    test = scorer(data.test)(clf) if data.test is not None else val
    log.info("probe %s%s on %s: C=%g, validation %.4f, test %.4f (%d training rows)",
             model_dir, "" if layer is None else f" layer {layer}", task.name, c, val, test,
             len(y_train))
    return {"C": c, "validation": round(float(val), 4), "test": round(float(test), 4),
            "rows": len(y_train)}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from distill_common.assets import resolve_model_dir
    from distill_common.logs import setup_logging
    from finetune.config import FinetuneConfig

    ap = argparse.ArgumentParser(description="Frozen-feature probe of an encoder's layers")
    ap.add_argument("model", help="a model folder or an asset name, e.g. minilm_l6")
    ap.add_argument("--tasks", required=True, help="task names or task YAML files")
    ap.add_argument("--layers", default="",
                    help="layers to probe, e.g. 2,3,4,5,6 (0: embeddings; default: last)")
    ap.add_argument("--max-train", type=int, default=600,
                    help="training examples (the quality benchmark's cap; 0 = all)")
    args = ap.parse_args(argv)
    setup_logging()
    model_dir = str(resolve_model_dir(args.model))
    layers = [int(k) for k in args.layers.split(",") if k] or [None]
    out = {}
    for task in [t for t in args.tasks.split(",") if t]:
        cfg = FinetuneConfig(tasks=[task], max_train_examples=args.max_train or None)
        task_data = probe_data(task, cfg)
        out[task] = {"last" if k is None else str(k): probe(model_dir, task_data, layer=k)
                     for k in layers}
    print(json.dumps({"bench": "probe", "model": model_dir, "max_train": args.max_train,
                      "tasks": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
