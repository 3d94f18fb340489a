"""Task sources from the Hugging Face Hub (offline, from a Hub-layout cache built here),
class-id columns read as names, and `unseen_labels` (error / drop / count_as_wrong) for
classification and token tasks, down to the scores and results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.data import load_task_data
from finetune.tasks import TaskError, load_task
from test_hub import hf_home, populate_hub_cache  # noqa: F401  (fixture)

TOPICS = ["arts", "science", "sport"]


def topic_rows(n: int, offset: int = 0) -> list[dict]:
    return [{"sentence": f"document {i + offset} is about {TOPICS[i % 3]} mostly",
             "topic": i % 3} for i in range(n)]


def write_hub_dataset(src: Path) -> Path:
    """A dataset repository as on the Hub: parquet files under data/, named by split,
    with the topic column a ClassLabel (class ids on disk, names in the features)."""
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "topic": datasets.ClassLabel(names=TOPICS)})
    (src / "data").mkdir(parents=True)
    for split, n, offset in (("train", 30, 0), ("dev", 9, 100), ("test", 6, 200)):
        ds = datasets.Dataset.from_list(topic_rows(n, offset), features=features)
        ds.to_parquet(str(src / "data" / f"{split}-00000-of-00001.parquet"))
    return src


def hub_task(folder: Path, extra: str = "") -> Path:
    path = folder / "hubtask.yaml"
    path.write_text("name: hubtask\nsource: {hub: tiny-org/topics" + extra + "}\n"
                    "columns: {text: sentence, label: topic}\n")
    return path


def test_hub_dataset_is_read_offline_from_the_hub_cache(tmp_path, hf_home):
    populate_hub_cache(hf_home / "hub", "tiny-org/topics", write_hub_dataset(tmp_path / "src"),
                       repo_type="dataset")
    data = load_task_data(load_task(hub_task(tmp_path, ", splits: {train: train, "
                                                       "validation: dev, test: test}")))
    assert data.sizes() == {"train": 30, "validation": 9, "test": 6}
    assert data.labels == TOPICS  # class ids decoded through the ClassLabel feature
    assert data.test[0].label == "arts" and data.notes["source"]["test"].endswith("[test]")
    # `datasets` prepared it into its own cache under HF_HOME, not the user's home
    assert any((hf_home / "datasets").iterdir())


def test_hub_dataset_not_cached_names_both_caches_and_the_fix(tmp_path, hf_home):
    with pytest.raises(TaskError) as err:
        load_task_data(load_task(hub_task(tmp_path)))
    msg = str(err.value)
    assert "tiny-org/topics" in msg and str(hf_home / "hub") in msg
    assert str(hf_home / "datasets") in msg and "hf download --repo-type dataset" in msg


def test_hub_split_that_does_not_exist(tmp_path, hf_home):
    populate_hub_cache(hf_home / "hub", "tiny-org/topics", write_hub_dataset(tmp_path / "src"),
                       repo_type="dataset")
    with pytest.raises(TaskError, match=r"no split 'valid' \(source.splits.validation\)"):
        load_task_data(load_task(hub_task(tmp_path, ", splits: {validation: valid}")))


def test_source_fields_are_checked(tmp_path):
    (tmp_path / "x.yaml").write_text("name: x\nsource: {path: d.csv, config: sst2}\n")
    with pytest.raises(TaskError, match="source.config is the configuration of a source.hub"):
        load_task(tmp_path / "x.yaml")
    (tmp_path / "y.yaml").write_text("name: y\nsource: {hub: a/b, path: d.csv}\n")
    with pytest.raises(TaskError, match="exactly one of source.corpus, source.hub"):
        load_task(tmp_path / "y.yaml")
    (tmp_path / "z.yaml").write_text("name: z\nsource: {hub: a/b}\nunseen_labels: skip\n")
    with pytest.raises(TaskError, match=r"unseen_labels: must be one of \['error', 'drop', "
                                        r"'count_as_wrong'\]"):
        load_task(tmp_path / "z.yaml")


# ------------------------------------------------------------------ unseen labels

def _classification_task(tmp_path: Path, policy: str | None) -> Path:
    import pandas as pd

    def rows(n, labels, start):
        return [{"text": f"text {start + i} on {labels[i % len(labels)]}",
                 "label": labels[i % len(labels)]} for i in range(n)]

    pd.DataFrame(rows(30, "ab", 0)).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(rows(6, "ab", 100)).to_csv(tmp_path / "dev.csv", index=False)
    pd.DataFrame(rows(6, "abz", 200)).to_csv(tmp_path / "test.csv", index=False)
    path = tmp_path / "c.yaml"
    path.write_text("name: c\nsource: {train: train.csv, validation: dev.csv, test: test.csv}\n"
                    + (f"unseen_labels: {policy}\n" if policy else ""))
    return path


def test_unseen_label_error_names_the_option(tmp_path):
    with pytest.raises(TaskError) as err:
        load_task_data(load_task(_classification_task(tmp_path, None)))
    msg = str(err.value)
    assert "unseen label 'z' in the test split (2 example(s)" in msg
    assert "unseen_labels: drop" in msg and "count_as_wrong" in msg
    assert "task.unseen_labels=drop" in msg


def test_unseen_label_drop_and_count_as_wrong_for_classification(tmp_path):
    dropped = load_task_data(load_task(_classification_task(tmp_path, "drop")))
    assert dropped.sizes()["test"] == 4 and all(e.label != "z" for e in dropped.test)
    assert dropped.unseen == {"policy": "drop",
                              "test": {"labels": {"z": 2}, "examples": 2}}
    kept = load_task_data(load_task(_classification_task(tmp_path, "count_as_wrong")))
    assert kept.sizes()["test"] == 6 and kept.labels == ["a", "b"]
    assert kept.unseen["test"] == {"labels": {"z": 2}, "examples": 2}


def _token_task(tmp_path: Path, policy: str) -> Path:
    """Train tags: O, B-PER, I-PER; one test sentence has B-LOC, never seen in training."""
    sentences = [(["anna", "smith", "runs"], ["B-PER", "I-PER", "O"]),
                 (["the", "river", "flows"], ["O", "O", "O"])] * 15
    with open(tmp_path / "train.jsonl", "w") as f:
        for words, tags in sentences:
            f.write(json.dumps({"tokens": words, "tags": tags}) + "\n")
    with open(tmp_path / "test.jsonl", "w") as f:
        f.write(json.dumps({"tokens": ["anna", "in", "paris"],
                            "tags": ["B-PER", "O", "B-LOC"]}) + "\n")
        f.write(json.dumps({"tokens": ["smith", "runs"], "tags": ["B-PER", "O"]}) + "\n")
    path = tmp_path / "n.yaml"
    path.write_text("name: n\ntype: token_classification\nsource: {train: train.jsonl, "
                    "test: test.jsonl}\ncolumns: {text: tokens, label: tags}\n"
                    f"unseen_labels: {policy}\nsplit: {{validation: 0.2}}\n")
    return path


def test_unseen_tag_in_a_token_task(tmp_path):
    with pytest.raises(TaskError, match=r"unseen label 'B-LOC' in the test split \(1 tag\(s\) "
                                        r"in 1 sentence\(s\)"):
        load_task_data(load_task(_token_task(tmp_path, "error")))
    dropped = load_task_data(load_task(_token_task(tmp_path, "drop")))
    assert [e.text for e in dropped.test] == [["smith", "runs"]]
    kept = load_task_data(load_task(_token_task(tmp_path, "count_as_wrong")))
    assert len(kept.test) == 2 and "B-LOC" not in kept.labels


def test_count_as_wrong_scores_the_unseen_tag_as_an_error(tmp_path, tiny_teacher_nohead_dir):
    """The fine-tuned model cannot predict B-LOC: the LOC entity is a false negative and
    its token a wrong one, and results.json says what was done."""
    from finetune.config import FinetuneConfig
    from finetune.metrics import token_metrics
    from finetune.train import run_task

    cfg = FinetuneConfig(epochs=1, batch_size=8, precision="fp32", save_model="none")
    res = run_task(tiny_teacher_nohead_dir, _token_task(tmp_path, "count_as_wrong"),
                   tmp_path / "out", cfg)
    assert res["unseen_labels"] == {"policy": "count_as_wrong",
                                    "test": {"labels": {"B-LOC": 1}, "examples": 1}}
    preds = res["seeds"][0]["predictions"]
    assert all(tag != "B-LOC" for sentence in preds for tag in sentence)
    assert res["mean"]["token_accuracy"] == pytest.approx(
        token_metrics(res["gold"], preds)["token_accuracy"])
    assert res["mean"]["token_accuracy"] <= 4 / 5  # the B-LOC token is always wrong
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["unseen_labels"]["policy"] == "count_as_wrong"
