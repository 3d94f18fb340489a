"""A tiny BERT learns a separable synthetic task of every type, well above chance, and
the saved folder loads back with the Auto* classes and predicts the same labels."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

FILLER = """the of and to in is was for on that with as by at from his her it an were are
which this be or has had not but their its first also after new one two three year years
people school team game music film book light small large early late north south""".split()
TOPICS = {"sport": ["game", "team", "film"], "nature": ["water", "river", "light"],
          "power": ["king", "war", "state"]}
FAST = ["epochs=6", "batch_size=16", "learning_rate=2e-3", "warmup_ratio=0.05",
        "patience=0", "max_length=32", "precision=fp32", "seeds=[0]", "save_model=best",
        "num_threads=1"]  # tiny models: one thread is fastest, and fair on a shared CI box


def _filler(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(FILLER) for _ in range(n)]


def classification_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choice(sorted(TOPICS))
        words = _filler(rng, rng.randint(4, 8)) + rng.sample(TOPICS[label], 2)
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "topic": label})
    return rows


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """The label says which of the two texts holds the word "water"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = _filler(rng, rng.randint(3, 6)), _filler(rng, rng.randint(3, 6))
        where = rng.choice(["first", "second"])
        target = a if where == "first" else b
        target.insert(rng.randint(0, len(target)), "water")
        rows.append({"premise": " ".join(a), "hypothesis": " ".join(b), "where": where})
    return rows


def regression_rows(n: int, seed: int = 0) -> list[dict]:
    """Target: how many times "war" occurs (0-4)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(0, 4)
        words = _filler(rng, rng.randint(4, 8)) + ["war"] * k
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "score": float(k)})
    return rows


def token_rows(n: int, seed: int = 0) -> list[dict]:
    """Spans: "river [city]" is a LOC, "king [house]" a PER; everything else O."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words, tags = [], []
        for _ in range(rng.randint(2, 4)):
            filler = _filler(rng, rng.randint(1, 3))
            words += filler
            tags += ["O"] * len(filler)
            kind = rng.choice(["LOC", "PER"])
            head, tail = ("river", "city") if kind == "LOC" else ("king", "house")
            span = [head] + ([tail] if rng.random() < 0.5 else [])
            words += span
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(span) - 1)
        rows.append({"tokens": words, "ner_tags": tags})
    return rows


def save_tiny_bert(folder: Path, mlm_head: bool = False) -> Path:
    """A 2-layer, 64-wide BERT with a WordPiece tokenizer over the words above. (Built
    here with ``BertTokenizer(vocab=...)``: transformers 5 ignores ``vocab_file=``.)"""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer

    words = sorted(set(FILLER) | {w for ws in TOPICS.values() for w in ws}
                   | {"river", "city", "king", "house", "water", "war"})
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,'-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + chars + \
        [f"##{c}" for c in chars]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(vocab=str(folder / "vocab.txt"), model_max_length=512)
    assert tok.tokenize("the river") == ["the", "river"]
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                     pad_token_id=tok.pad_token_id)
    (BertForMaskedLM(cfg) if mlm_head else BertModel(cfg)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A bare BertModel folder (no heads), like the real teachers."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_encoder"))


@pytest.fixture(scope="module")
def tiny_mlm_dir(tmp_path_factory) -> Path:
    """A BertForMaskedLM folder, like an exported student."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_mlm"), mlm_head=True)


def write_task(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(body)
    return path


def finetune_cfg(*overrides: str):
    from distill_common.config import load_config
    from finetune.config import FinetuneConfig

    return load_config(FinetuneConfig, None, list(FAST) + list(overrides))


def test_classification_from_csv_learns_and_reloads(tmp_path, tiny_encoder_dir):
    import pandas as pd
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune import run_task

    pd.DataFrame(classification_rows(300)).to_csv(tmp_path / "topics.csv", index=False)
    task = write_task(tmp_path, "topics", """
name: topics
type: classification
source: {path: topics.csv}
columns: {text: sentence, label: topic}
split: {validation: 0.15, test: 0.15, seed: 3}
""")
    res = run_task(tiny_encoder_dir, task, tmp_path / "out", finetune_cfg())
    assert res["metric"] == "accuracy" and res["score_split"] == "test"
    assert res["score"] > 0.8, res["seeds"][0]["history"]  # chance is 1/3
    assert set(res["mean"]) == {"accuracy", "macro_f1", "mcc"}
    saved = Path(res["saved_model"])
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["score"] == pytest.approx(res["score"])

    # The saved folder is a plain HF classifier with label names, and predicts what the
    # fine-tuning run scored.
    model = AutoModelForSequenceClassification.from_pretrained(saved).eval()
    tok = AutoTokenizer.from_pretrained(saved)
    assert set(model.config.id2label.values()) == set(TOPICS)
    from finetune.data import load_task_data
    from finetune.tasks import load_task

    test = load_task_data(load_task(task)).test
    enc = tok([ex.text for ex in test], padding=True, truncation=True, max_length=32,
              return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1).tolist()
    names = [model.config.id2label[i] for i in pred]
    acc = sum(n == ex.label for n, ex in zip(names, test)) / len(test)
    assert acc == pytest.approx(res["seeds"][0]["test"]["accuracy"])
    # results.json keeps the test labels and each seed's predictions, in test order: the
    # same ones the reloaded folder makes.
    assert on_disk["gold"] == [ex.label for ex in test]
    assert on_disk["seeds"][0]["predictions"] == names


def test_pair_classification_from_tsv(tmp_path, tiny_encoder_dir):
    import pandas as pd

    from finetune import run_task

    pd.DataFrame(pair_rows(300)).to_csv(tmp_path / "pairs.tsv", sep="\t", index=False)
    task = write_task(tmp_path, "pairs", """
name: pairs
type: pair_classification
source: {path: pairs.tsv}
columns: {text: premise, text_pair: hypothesis, label: where}
""")
    res = run_task(tiny_encoder_dir, task, tmp_path / "out", finetune_cfg("epochs=8"))
    assert res["score"] > 0.8, res["seeds"][0]["history"]  # chance is 1/2


def test_regression_from_jsonl_with_given_splits(tmp_path, tiny_encoder_dir):
    import pandas as pd

    from finetune import run_task

    for split, n, seed in (("train", 300, 0), ("dev", 60, 1), ("test", 60, 2)):
        pd.DataFrame(regression_rows(n, seed)).to_json(tmp_path / f"{split}.jsonl",
                                                       orient="records", lines=True)
    task = write_task(tmp_path, "counts", """
name: counts
type: regression
source: {train: train.jsonl, validation: dev.jsonl, test: test.jsonl}
columns: {label: score}
""")
    res = run_task(tiny_encoder_dir, task, tmp_path / "out", finetune_cfg("epochs=8"))
    assert res["notes"]["split"] == "given splits"
    assert res["sizes"] == {"train": 300, "validation": 60, "test": 60}
    assert res["metric"] == "pearson"
    assert res["score"] > 0.8, res["seeds"][0]["history"]
    assert res["mean"]["spearman"] > 0.7


def test_token_classification_from_parquet_and_reload(tmp_path, tiny_encoder_dir):
    import pandas as pd
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from finetune import run_task

    pd.DataFrame(token_rows(300)).to_parquet(tmp_path / "ner.parquet")
    task = write_task(tmp_path, "ner", """
name: ner
type: token_classification
source: {path: ner.parquet}
columns: {text: tokens, label: ner_tags}
""")
    res = run_task(tiny_encoder_dir, task, tmp_path / "out", finetune_cfg("epochs=8"))
    assert res["metric"] == "entity_f1"
    assert res["score"] > 0.8, res["seeds"][0]["history"]
    model = AutoModelForTokenClassification.from_pretrained(res["saved_model"]).eval()
    assert set(model.config.label2id) == {"O", "B-LOC", "I-LOC", "B-PER", "I-PER"}
    tok = AutoTokenizer.from_pretrained(res["saved_model"])
    enc = tok(["the", "river", "city", "and", "king"], is_split_into_words=True,
              return_tensors="pt")
    with torch.no_grad():
        ids = model(**enc).logits.argmax(-1)[0].tolist()
    firsts = [ids[p] for p, w in enumerate(enc.word_ids()) if w is not None]
    assert [model.config.id2label[i] for i in firsts] == ["O", "B-LOC", "I-LOC", "O", "B-PER"]


def test_mlm_folder_seeds_mean_std_and_save_all(tmp_path, tiny_mlm_dir):
    """A *ForMaskedLM folder (like an exported student) takes a fresh classifier; two
    seeds give a mean and a std; save_model=all keeps one folder per seed."""
    import pandas as pd

    from finetune import run_task

    pd.DataFrame(classification_rows(160)).to_csv(tmp_path / "topics.csv", index=False)
    task = write_task(tmp_path, "topics", """
name: topics
source: {path: topics.csv}
columns: {text: sentence, label: topic}
""")
    res = run_task(tiny_mlm_dir, task, tmp_path / "out",
                   finetune_cfg("seeds=[1,2]", "epochs=2", "save_model=all"))
    scores = [r["test"]["accuracy"] for r in res["seeds"]]
    assert [r["seed"] for r in res["seeds"]] == [1, 2]
    assert res["score"] == pytest.approx(sum(scores) / 2)
    assert res["score_std"] == pytest.approx(abs(scores[0] - scores[1]) / 2)
    assert (tmp_path / "out" / "seed-1" / "model" / "config.json").is_file()
    assert (tmp_path / "out" / "seed-2" / "model" / "config.json").is_file()
    assert res["seeds"][0]["steps"] == 2 * -(-int(res["sizes"]["train"]) // 16)

    # Two seeds' kept predictions compare against themselves as a tie, and the paired
    # bootstrap reproduces the scores' difference.
    from finetune.compare import compare_results

    same = compare_results(res, res, draws=50)
    assert same["diff"] == 0 and same["examples"] == res["sizes"]["test"]
    one_seed = {**res, "seeds": res["seeds"][:1]}
    vs = compare_results(res, one_seed, draws=50)
    assert vs["diff"] == pytest.approx(res["score"] - scores[0], abs=1e-4)


def _topics_task(tmp_path):
    import pandas as pd

    pd.DataFrame(classification_rows(80)).to_csv(tmp_path / "topics.csv", index=False)
    return write_task(tmp_path, "topics", """
name: topics
source: {path: topics.csv}
columns: {text: sentence, label: topic}
""")


def test_early_stopping_stops(tmp_path, tiny_encoder_dir):
    """lr=0 never improves: patience 1 stops after the second evaluation."""
    from finetune import run_task

    task = _topics_task(tmp_path)
    res = run_task(tiny_encoder_dir, task, tmp_path / "out",
                   finetune_cfg("learning_rate=1e-12", "patience=1", "epochs=5",
                                "evals_per_epoch=2", "save_model=none"))
    seed = res["seeds"][0]
    assert seed["stopped_early"] and len(seed["history"]) == 2
    assert res["saved_model"] is None and not (tmp_path / "out" / "model").exists()


def test_early_stopping_waits_for_min_steps(tmp_path, tiny_encoder_dir):
    """min_steps is a floor: with patience 1 a run that never improves still trains until
    min_steps, then stops at the first evaluation there."""
    from finetune import run_task

    task = _topics_task(tmp_path)
    cfg = ("learning_rate=1e-12", "patience=1", "epochs=5", "evals_per_epoch=2",
           "save_model=none")
    first = run_task(tiny_encoder_dir, task, tmp_path / "a", finetune_cfg(*cfg))
    per_epoch = first["seeds"][0]["history"][1]["step"]  # 2nd evaluation: end of epoch 1
    res = run_task(tiny_encoder_dir, task, tmp_path / "b",
                   finetune_cfg(*cfg, f"min_steps={2 * per_epoch}"))
    seed = res["seeds"][0]
    assert seed["stopped_early"] and len(seed["history"]) == 4
    assert seed["history"][-1]["step"] == 2 * per_epoch and seed["epochs"] == 5


def test_without_a_test_split_the_best_validation_predictions_are_kept(tmp_path,
                                                                       tiny_encoder_dir):
    """No test split: the score is on validation, and the kept predictions are those of
    the best evaluation (no extra pass), so they reproduce its score."""
    from finetune import run_task

    res = run_task(tiny_encoder_dir, _topics_task(tmp_path), tmp_path / "out",
                   finetune_cfg("epochs=2", "evals_per_epoch=2", "save_model=none"),
                   task_overrides=["split.test=0"])
    assert res["score_split"] == "validation" and len(res["gold"]) == res["sizes"]["validation"]
    seed = res["seeds"][0]
    right = sum(g == p for g, p in zip(res["gold"], seed["predictions"]))
    assert right / len(res["gold"]) == pytest.approx(seed["validation"]["accuracy"])
    assert seed["test"] is None


def test_min_steps_raises_epochs_on_a_small_subset(tmp_path, tiny_encoder_dir):
    """max_train_examples=20 at batch 8 is 3 steps an epoch: min_steps=10 makes it 4
    epochs (12 steps) instead of 1; a larger split keeps its epochs."""
    from finetune import run_task

    task = _topics_task(tmp_path)
    res = run_task(tiny_encoder_dir, task, tmp_path / "small",
                   finetune_cfg("epochs=1", "batch_size=8", "max_train_examples=20",
                                "min_steps=10", "save_model=none"))
    seed = res["seeds"][0]
    assert res["sizes"]["train"] == 20 and res["hparams"]["min_steps"] == 10
    assert (seed["epochs"], seed["total_steps"], seed["steps"]) == (4, 12, 12)
    assert [h["step"] for h in seed["history"]] == [3, 6, 9, 12]
    res = run_task(tiny_encoder_dir, task, tmp_path / "large",
                   finetune_cfg("epochs=1", "batch_size=8", "min_steps=5",
                                "save_model=none"))
    assert res["seeds"][0]["epochs"] == 1 and res["seeds"][0]["steps"] >= 5
    with pytest.raises(Exception, match="min_steps"):
        finetune_cfg("min_steps=-1")


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path, tiny_encoder_dir):
    """torchrun with 2 CPU processes (gloo): both ranks train on half the data each, the
    evaluation is gathered, rank 0 writes results and the model."""
    import os
    import subprocess
    import sys

    import pandas as pd

    pd.DataFrame(classification_rows(300)).to_csv(tmp_path / "topics.csv", index=False)
    task = write_task(tmp_path, "topics", """
name: topics
source: {path: topics.csv}
columns: {text: sentence, label: topic}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", "2", "-m", "distill_cli", "finetune", str(tiny_encoder_dir),
           str(task), *(f"finetune.{o}" for o in FAST), "finetune.batch_size=8",
           "finetune.epochs=8", "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["world_size"] == 2
    # 240 training examples / 2 ranks / 8 per step = 15 steps per epoch.
    assert res["seeds"][0]["total_steps"] == 15 * 8
    assert res["score"] > 0.8, res["seeds"][0]["history"]
    assert (tmp_path / "out" / "model" / "config.json").is_file()
