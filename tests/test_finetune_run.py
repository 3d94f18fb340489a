"""A fine-tuning run over several models, tasks and seeds: one progress line whose total
covers all of them (less what early stopping saved), TensorBoard events per seed (loss,
learning rate, validation score, the configuration), and how each model's pooler starts
(said in results.json and in the log)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from test_finetune_train import classification_rows, save_tiny_bert, write_task


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("run_models")
    # BertModel saves a pooler; BertForMaskedLM (an exported student's class) has none.
    return {"with_pooler": save_tiny_bert(root / "with_pooler"),
            "mlm_only": save_tiny_bert(root / "mlm_only", mlm_head=True)}


def test_run_models_one_progress_line_events_and_pooler(tmp_path, two_models, caplog):
    import pandas as pd
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distill_common.config import load_config
    from finetune.config import FinetuneConfig
    from finetune.train import run_models

    pd.DataFrame(classification_rows(120)).to_csv(tmp_path / "topics.csv", index=False)
    task = write_task(tmp_path, "topics", "name: topics\nsource: {path: topics.csv}\n"
                                          "columns: {text: sentence, label: topic}\n")
    # patience 1 with 3 evaluations per epoch: some seeds stop early
    cfg = load_config(FinetuneConfig, None, [
        f"tasks=[{task}]", "seeds=[0,1]", "epochs=3", "batch_size=16", "patience=1",
        "evals_per_epoch=3", "learning_rate=1e-3", "precision=fp32", "save_model=none",
        "num_threads=1", "max_length=32"])
    caplog.set_level(logging.INFO)
    results = run_models(two_models, tmp_path / "out", cfg)

    steps = [r["steps"] for per_model in results.values() for r in per_model["topics"]["seeds"]]
    final = [m.getMessage() for m in caplog.records
             if m.getMessage().startswith("finetune (all models, tasks and seeds)")][-1]
    done, total = map(int, re.search(r": (\d+)/(\d+) steps", final).groups())
    assert done == total == sum(steps)  # the plan covered every model and seed
    stopped = [r["stopped_early"] for per_model in results.values()
               for r in per_model["topics"]["seeds"]]
    assert any(stopped)  # and early stopping took its unrun steps off the total

    assert results["with_pooler"]["topics"]["pooler"] == "trained"
    assert results["mlm_only"]["topics"]["pooler"] == "fresh"
    warned = [m.getMessage() for m in caplog.records if "fresh pooler" in m.getMessage()]
    assert len(warned) == 1 and str(two_models["mlm_only"]) in warned[0]

    seed_dir = tmp_path / "out" / "mlm_only" / "topics" / "seed-1"
    events = EventAccumulator(str(seed_dir / "tensorboard"))
    events.Reload()
    seed_steps = results["mlm_only"]["topics"]["seeds"][1]["steps"]
    assert len(events.Scalars("train/loss")) == len(events.Scalars("train/lr")) == seed_steps
    assert [e.step for e in events.Scalars("validation/accuracy")] == \
        [h["step"] for h in results["mlm_only"]["topics"]["seeds"][1]["history"]]
    assert "config/text_summary" in events.Tags()["tensors"]
    lines = [json.loads(x) for x in (seed_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == seed_steps


def test_pooler_note_says_who_starts_fresh(tmp_path):
    from finetune.loading import pooler_note

    folder = tmp_path / "student"
    folder.mkdir()
    assert pooler_note(folder, "trained") is None and pooler_note(folder, "none") is None
    assert "has no pooler weights" in pooler_note(folder, "fresh")
    (folder / "distill_run.json").write_text(json.dumps({"export": {
        "pooler": "fresh", "teacher_has_pooler": True, "fresh_pooler_only_in_student": True,
        "note": "random embeddings: the teacher's pooler does not apply"}}))
    note = pooler_note(folder, "fresh")
    assert "while its teacher starts with its trained one" in note and "random embed" in note
    (folder / "distill_run.json").write_text(json.dumps({"export": {
        "pooler": "fresh", "teacher_has_pooler": False,
        "fresh_pooler_only_in_student": False}}))
    assert "and so does its teacher" in pooler_note(folder, "fresh")


def test_metrics_record_config_text_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distill_common.tracking import Metrics, flat_hparams

    assert flat_hparams({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": True}) == \
        {"a.b": 1, "a.c": "[1, 2]", "d": "None", "e": True}
    metrics = Metrics(tmp_path, enabled=True, max_steps=2)
    metrics.record_config({"train": {"lr": 0.001, "max_steps": 2}, "name": "demo"},
                          metrics=["eval/mlm_accuracy"])
    metrics.log(1, {"eval/mlm_accuracy": 0.5}, progress=False)
    metrics.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lr: 0.001" in text and "name: demo" in text
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert b"train.lr" in hparams["_hparams_/session_start_info"]


def test_student_learning_rate_chosen_on_validation():
    """A rate grid (finetune.learning_rates, the pruning study's --student-lr): the rate of
    the best mean validation score (the lower on a tie); the test scores play no part."""
    from finetune.train import choose_on_validation

    def run(lr, validation, test):
        return {"hparams": {"learning_rate": lr}, "metric": "accuracy",
                "score_split": "test", "score": sum(test) / len(test), "score_std": 0.0,
                "seeds": [{"validation": {"accuracy": v}, "test": {"accuracy": t}}
                          for v, t in zip(validation, test)]}

    runs = {None: run(1e-4, [0.60, 0.62], [0.9, 0.9]), 3e-4: run(3e-4, [0.70, 0.66], [0.5, 0.5]),
            1e-3: run(1e-3, [0.64, 0.64], [0.99, 0.99])}
    chosen = choose_on_validation(runs)
    assert chosen["learning_rate"] == 3e-4 and chosen["score"] == 0.5
    assert chosen["lr_validation"] == {"0.0001": 0.61, "0.0003": 0.68, "0.001": 0.64}
    runs[1e-3] = run(1e-3, [0.70, 0.66], [0.99, 0.99])  # a tie: the lower rate
    assert choose_on_validation(runs)["learning_rate"] == 3e-4


def test_learning_rate_grid_fine_tunes_at_each_rate_and_keeps_the_validation_choice(
        tmp_path, two_models, caplog):
    """finetune.learning_rates: every model at every rate (its own folder), one progress
    line over all of them, and the result of the rate with the best mean validation score
    as the model's result for the task (results.json beside the rates' folders)."""
    import pandas as pd

    from distill_common.config import load_config
    from finetune.config import FinetuneConfig
    from finetune.train import run_models, validation_mean

    pd.DataFrame(classification_rows(96)).to_csv(tmp_path / "topics.csv", index=False)
    task = write_task(tmp_path, "topics", "name: topics\nsource: {path: topics.csv}\n"
                                          "columns: {text: sentence, label: topic}\n")
    cfg = load_config(FinetuneConfig, None, [
        f"tasks=[{task}]", "seeds=[0,1]", "epochs=2", "batch_size=16", "precision=fp32",
        "save_model=none", "num_threads=1", "max_length=32",
        "learning_rates=[1e-6, 3e-3]"])  # YAML's 1e-6 (no dot) is read as a number too
    assert cfg.learning_rates == [1e-6, 3e-3]
    caplog.set_level(logging.INFO)
    results = run_models({"m": two_models["with_pooler"]}, tmp_path / "out", cfg)

    out = tmp_path / "out" / "m" / "topics"
    by_rate = {rate: json.loads((out / f"lr-{rate:g}" / "results.json").read_text())
               for rate in (1e-6, 3e-3)}
    assert {r["hparams"]["learning_rate"] for r in by_rate.values()} == {1e-6, 3e-3}
    validation = {rate: validation_mean(r) for rate, r in by_rate.items()}
    assert validation[3e-3] > validation[1e-6]  # 1e-6 barely moves the classifier
    chosen = results["m"]["topics"]
    assert chosen["learning_rate"] == 3e-3
    assert chosen["lr_validation"] == {"1e-06": round(validation[1e-6], 4),
                                       "0.003": round(validation[3e-3], 4)}
    assert chosen["score"] == by_rate[3e-3]["score"]
    assert chosen["seeds"] == by_rate[3e-3]["seeds"]
    assert json.loads((out / "results.json").read_text())["learning_rate"] == 3e-3

    steps = sum(rec["steps"] for r in by_rate.values() for rec in r["seeds"])
    final = [m.getMessage() for m in caplog.records
             if m.getMessage().startswith("finetune (all models, tasks and seeds)")][-1]
    done, total = map(int, re.search(r": (\d+)/(\d+) steps", final).groups())
    assert done == total == steps  # the plan covered both rates


@pytest.mark.parametrize("rates, says", [
    ("[]", "at least one rate"), ("[1e-4, -1e-3]", "must be > 0"),
    ("[1e-4, 1e-4]", "listed twice")])
def test_learning_rate_grid_is_checked_before_anything_runs(rates, says):
    from distill_common.config import ConfigError, load_config
    from finetune.config import FinetuneConfig

    with pytest.raises(ConfigError) as err:
        load_config(FinetuneConfig, None, [f"learning_rates={rates}"])
    assert "learning_rates" in str(err.value) and says in str(err.value)
