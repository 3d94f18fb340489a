"""Task recipes and data: formats, column mapping, deterministic splits, held-out hashes,
and every user error caught before training with a message that says what to fix."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from distill_common.config import ConfigError, load_config
from distill_common.textnorm import doc_hash
from finetune.config import FinetuneConfig
from finetune.data import load_task_data
from finetune.holdout import heldout_doc_hashes
from finetune.tasks import TaskError, builtin_tasks, load_task


def rows(n: int, labels=("a", "b", "c")) -> list[dict]:
    return [{"sentence": f"example number {i} about {labels[i % len(labels)]}",
             "tag": labels[i % len(labels)], "id": f"r{i}"} for i in range(n)]


def write_csv(path: Path, records: list[dict], sep: str = ",") -> Path:
    import pandas as pd

    pd.DataFrame(records).to_csv(path, sep=sep, index=False)
    return path


def task_yaml(folder: Path, body: str, name: str = "t") -> Path:
    p = folder / f"{name}.yaml"
    p.write_text(body)
    return p


COLS = "columns: {text: sentence, label: tag}\n"


def test_shipped_task_recipes_parse():
    names = builtin_tasks()
    assert {"bbc_news", "wiki_topic"} <= set(names)
    for name in names:
        task = load_task(name)
        assert task.name == name
    bbc = load_task("bbc_news")
    assert bbc.source.corpus == "bbc_news" and bbc.type == "classification"
    assert load_task("wiki_topic").drop_labels == ["Uncategorized"]


def test_seeded_split_is_deterministic_stratified_and_disjoint(tmp_path):
    write_csv(tmp_path / "d.csv", rows(300))
    t = task_yaml(tmp_path, f"name: t\nsource: {{path: d.csv}}\n{COLS}"
                            "split: {validation: 0.2, test: 0.1, seed: 7}\n")
    a, b = load_task_data(load_task(t)), load_task_data(load_task(t))
    assert [e.id for e in a.validation] == [e.id for e in b.validation]
    assert a.sizes() == {"train": 210, "validation": 60, "test": 30}
    assert Counter(e.label for e in a.validation) == {"a": 20, "b": 20, "c": 20}
    ids = [{e.id for e in getattr(a, s)} for s in ("train", "validation", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    other = load_task_data(load_task(t, ["split.seed=8"]))
    assert {e.id for e in other.validation} != ids[1]


def test_duplicates_dropped_and_heldout_hashes(tmp_path):
    records = rows(60) + rows(60)[:10]  # ten exact repeats
    write_csv(tmp_path / "d.tsv", records, sep="\t")
    t = task_yaml(tmp_path, f"name: t\nsource: {{path: d.tsv}}\n{COLS}")
    data = load_task_data(load_task(t))
    assert data.notes["dropped_duplicates"] == {"all": 10}
    held = heldout_doc_hashes(t)
    assert held == {doc_hash(e.text) for e in data.validation + data.test}
    assert len(held) == 12 and not held & {doc_hash(e.text) for e in data.train}


def test_jsonl_given_splits_and_carved_validation(tmp_path):
    for split, n in (("train", 30), ("test", 9)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for r in rows(n):
                f.write(json.dumps(r) + "\n")
    t = task_yaml(tmp_path, "name: t\nsource: {train: train.jsonl, test: test.jsonl}\n" + COLS)
    data = load_task_data(load_task(t))
    assert data.sizes() == {"train": 27, "validation": 3, "test": 9}
    assert "carved from train" in data.notes["split"]


def test_datasets_folder_with_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(30)),
                               "validation": datasets.Dataset.from_list(rows(6)),
                               "test": datasets.Dataset.from_list(rows(9))})
    dd.save_to_disk(str(tmp_path / "ds"))
    t = task_yaml(tmp_path, f"name: t\nsource: {{path: ds}}\n{COLS}")
    data = load_task_data(load_task(t))
    assert data.sizes() == {"train": 30, "validation": 6, "test": 9}
    assert data.labels == ["a", "b", "c"]


def test_wrong_column_lists_available_columns(tmp_path):
    write_csv(tmp_path / "d.csv", rows(30))
    t = task_yaml(tmp_path, "name: t\nsource: {path: d.csv}\ncolumns: {text: text, label: tag}\n")
    with pytest.raises(TaskError) as err:
        load_task_data(load_task(t))
    msg = str(err.value)
    assert "no column 'text'" in msg and "columns.text" in msg
    assert "['sentence', 'tag', 'id']" in msg and "d.csv" in msg


def test_label_missing_from_training_data(tmp_path):
    write_csv(tmp_path / "d.csv", rows(30, labels=("a", "b")))
    t = task_yaml(tmp_path, f"name: t\nsource: {{path: d.csv}}\n{COLS}labels: [a, b, c]\n")
    with pytest.raises(TaskError, match=r"\['c'\] listed in `labels` never occur in the "
                                        r"training split"):
        load_task_data(load_task(t))


def test_unseen_label_at_test_time(tmp_path):
    write_csv(tmp_path / "train.csv", rows(30, labels=("a", "b")))
    write_csv(tmp_path / "dev.csv", rows(6, labels=("a", "b")))
    write_csv(tmp_path / "test.csv", rows(6, labels=("a", "z")))
    t = task_yaml(tmp_path, "name: t\nsource: {train: train.csv, validation: dev.csv, "
                            f"test: test.csv}}\n{COLS}")
    with pytest.raises(TaskError, match=r"unseen label 'z' in the test split \(3 example"):
        load_task_data(load_task(t))


def test_bad_regression_and_token_rows(tmp_path):
    write_csv(tmp_path / "r.csv", [{"text": "a b", "y": "1.5"}, {"text": "c d", "y": "high"}])
    t = task_yaml(tmp_path, "name: r\ntype: regression\nsource: {path: r.csv}\n"
                            "columns: {label: y}\n", "r")
    with pytest.raises(TaskError, match=r"row 2: label 'high' .* is not a number"):
        load_task_data(load_task(t))
    with open(tmp_path / "n.jsonl", "w") as f:
        f.write(json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) + "\n")
    t = task_yaml(tmp_path, "name: n\ntype: token_classification\nsource: {path: n.jsonl}\n"
                            "columns: {text: tokens, label: tags}\n", "n")
    with pytest.raises(TaskError, match="2 words but 1 tags"):
        load_task_data(load_task(t))


def test_recipe_errors_name_the_field(tmp_path):
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        load_task("nope")
    t = task_yaml(tmp_path, "name: t\ntype: pair_classification\nsource: {path: d.csv}\n")
    with pytest.raises(TaskError, match="columns.text_pair"):
        load_task(t)
    t = task_yaml(tmp_path, "name: t\nsource: {path: d.csv, corpus: bbc_news}\n")
    with pytest.raises(TaskError, match="exactly one of source.corpus"):
        load_task(t)
    with pytest.raises(ConfigError, match="precision"):
        load_config(FinetuneConfig, None, ["precision=fp16"])
    with pytest.raises(ConfigError, match="warmup_ratio"):
        load_config(FinetuneConfig, None, ["warmup_ratio=1.5"])


def test_model_folder_without_tokenizer_fails_before_training(tmp_path, tiny_teacher_nohead_dir):
    import shutil

    from finetune import run_task

    model = tmp_path / "model"
    model.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_teacher_nohead_dir / f, model / f)
    write_csv(tmp_path / "d.csv", rows(30))
    t = task_yaml(tmp_path, f"name: t\nsource: {{path: d.csv}}\n{COLS}")
    with pytest.raises(TaskError, match="has no tokenizer"):
        run_task(model, t, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_error_exit_code(tmp_path, capsys, tiny_teacher_nohead_dir):
    from distill_cli.main import main

    write_csv(tmp_path / "d.csv", rows(30))
    t = task_yaml(tmp_path, "name: t\nsource: {path: d.csv}\ncolumns: {text: body, label: tag}\n")
    rc = main(["finetune", str(tiny_teacher_nohead_dir), str(t), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "available columns" in err


def test_checkpoint_missing_encoder_weights_is_refused(tmp_path, tiny_teacher_nohead_dir):
    """A folder whose weights lack an encoder layer would silently fine-tune a random
    encoder; it is refused before training."""
    import shutil

    from safetensors.torch import load_file, save_file

    from finetune import run_task

    model = tmp_path / "model"
    shutil.copytree(tiny_teacher_nohead_dir, model)
    state = load_file(model / "model.safetensors")
    save_file({k: v for k, v in state.items() if ".layer.1." not in k},
              model / "model.safetensors")
    write_csv(tmp_path / "d.csv", rows(30))
    t = task_yaml(tmp_path, f"name: t\nsource: {{path: d.csv}}\n{COLS}")
    with pytest.raises(TaskError, match=r"encoder weight\(s\) missing"):
        run_task(model, t, tmp_path / "out")
    assert not (tmp_path / "out" / "results.json").exists()
