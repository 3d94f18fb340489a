"""`distill report`: measured fields, retention and speed-up against the teacher, the
markdown table and the PNG plots; the CLI joins results.json files to models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

WORDS = "the a of river king war water game team north south light film".split()


def save_bert(folder: Path, layers: int, hidden: int) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(vocab=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=hidden * 4,
                     max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pair_of_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report_models")
    return {"teacher": save_bert(root / "teacher", 4, 128),
            "student": save_bert(root / "student", 1, 64)}


def fake_result(model_dir: Path, task: str, score: float, std: float = 0.01,
                predictions: bool = True) -> dict:
    """A run_task-like result on 100 test examples: both seeds get the first
    round(100 * score) right (when ``predictions``; otherwise an older results.json)."""
    gold = ["x", "y"] * 50
    right = round(100 * score)
    preds = gold[:right] + [{"x": "y", "y": "x"}[g] for g in gold[right:]]
    res = {"task": task, "type": "classification", "metric": "accuracy",
           "model_dir": str(model_dir), "score": score, "score_std": std,
           "score_split": "test", "mean": {"accuracy": score},
           "seeds": [{"seed": 0}, {"seed": 1}], "saved_model": None}
    if predictions:
        res["gold"] = gold
        for rec in res["seeds"]:
            rec["predictions"] = preds
    return res


FAST = dict(latency_batch_sizes=[1, 4], latency_seq_len=16, latency_warmup=1,
            latency_repeats=3, threads=1)


def test_build_report_fields_retention_speedup_and_plots(tmp_path, pair_of_models):
    from finetune.config import ReportConfig
    from finetune.report import build_report

    results = {"teacher": {"topics": fake_result(pair_of_models["teacher"], "topics", 0.90)},
               "student": {"topics": fake_result(pair_of_models["student"], "topics", 0.81)}}
    report = build_report(pair_of_models, results, tmp_path / "rep", "teacher",
                          ReportConfig(**FAST))
    t, s = report["models"]["teacher"], report["models"]["student"]
    assert t["parameters"] > s["parameters"] > 0
    assert t["size_bytes"] > s["size_bytes"] > 0
    assert t["size_mib"] == pytest.approx(t["size_bytes"] / 2**20, abs=0.01)
    assert s["compression"] == pytest.approx(t["parameters"] / s["parameters"], rel=1e-3)
    assert [r["batch"] for r in s["cpu"]] == [1, 4] and s["cpu_threads"] == 1
    for row in s["cpu"]:
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["throughput_seq_per_s"] == pytest.approx(
            row["batch"] / (row["median_ms"] / 1000), rel=1e-2)
    assert s["speedup"]["cpu_b4"] == pytest.approx(
        t["cpu"][1]["median_ms"] / s["cpu"][1]["median_ms"], rel=1e-2)
    assert t["speedup"]["cpu_b1"] == pytest.approx(1.0)
    assert s["tasks"]["topics"]["retention_pct"] == pytest.approx(90.0)
    assert t["tasks"]["topics"]["retention_pct"] == pytest.approx(100.0)
    # The student gets 9 of the teacher's right examples wrong: a gap of -9 points whose
    # paired interval is below zero; the teacher has no gap to itself.
    gap = s["tasks"]["topics"]["vs_teacher"]
    assert gap["diff"] == pytest.approx(-0.09) and gap["ci95"][1] < 0
    assert gap["p_a_ahead"] == 0.0 and "vs_teacher" not in t["tasks"]["topics"]

    out = tmp_path / "rep"
    assert json.loads((out / "report.json").read_text())["teacher"] == "teacher"
    assert report["latency"]["interleaved"] is True
    md = (out / "report.md").read_text()
    assert "the models' runs interleaved" in md
    assert "| student |" in md and "90.0%" in md and "81.00 ± 1.00 (n=2)" in md
    assert "Gap to the teacher" in md and "| student | topics | -9.00 | [-" in md
    for png in ("score_vs_size.png", "score_vs_latency.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({png})" in md


def test_report_says_which_learning_rate_a_grid_chose(tmp_path, pair_of_models):
    """A result fine-tuned over a rate grid (finetune.learning_rates) carries the rate
    chosen on validation: the report's score cell gives it, and a line says how it was
    chosen; a result without a grid adds neither."""
    from finetune.config import ReportConfig
    from finetune.report import build_report

    student = fake_result(pair_of_models["student"], "topics", 0.81)
    student.update(learning_rate=1e-3, lr_validation={"0.0001": 0.7, "0.001": 0.8})
    results = {"teacher": {"topics": fake_result(pair_of_models["teacher"], "topics", 0.90)},
               "student": {"topics": student}}
    report = build_report(pair_of_models, results, tmp_path / "rep", "teacher",
                          ReportConfig(**{**FAST, "plots": False}))
    entry = report["models"]["student"]["tasks"]["topics"]
    assert entry["learning_rate"] == 1e-3 and entry["lr_validation"]["0.001"] == 0.8
    assert report["models"]["teacher"]["tasks"]["topics"]["learning_rate"] is None
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "81.00 ± 1.00 (n=2), lr 0.001 |" in md and "90.00 ± 1.00 (n=2) |" in md
    assert "chosen per model and task from 0.0001, 0.001 on the seeds' mean validation" in md


def test_latency_runs_of_the_models_interleave(pair_of_models):
    """The models' timed CPU runs alternate, one forward of each per round in a rotating
    order, after each model's warm-up: a machine whose load changes meanwhile slows all
    of them alike. One model at a time on request, with rows of the same form."""
    from finetune.latency import measure_all, time_interleaved
    from finetune.loading import load_encoder

    models = {name: load_encoder(folder) for name, folder in pair_of_models.items()}
    order = []
    for name, model in models.items():
        model.register_forward_pre_hook(lambda module, args, name=name: order.append(name))
    rows = time_interleaved(models, [1, 4], 8, warmup=2, repeats=3)
    warm = ["teacher", "teacher", "student", "student"]
    rounds = ["teacher", "student", "student", "teacher", "teacher", "student"]
    assert order == (warm + rounds) * 2
    for name in models:
        assert [(r["batch"], r["seq_len"]) for r in rows[name]] == [(1, 8), (4, 8)]
        assert all(r["min_ms"] <= r["median_ms"] <= r["max_ms"] for r in rows[name])

    both = {interleave: measure_all(pair_of_models, [1, 4], 8, 1, 2, 1, False,
                                    interleave=interleave)
            for interleave in (True, False)}
    for name in pair_of_models:
        a, b = both[True][name], both[False][name]
        assert set(a) == set(b) and a["parameters"] == b["parameters"]
        assert [r["batch"] for r in a["cpu"]] == [r["batch"] for r in b["cpu"]] == [1, 4]
        assert a["cpu_threads"] == b["cpu_threads"] == 1 and a["gpu"] is b["gpu"] is None


def test_report_gap_needs_kept_predictions(tmp_path, pair_of_models):
    """Results without predictions (an older results.json) or with bootstrap_draws=0 get
    no interval, and the report still builds."""
    from finetune.config import ReportConfig
    from finetune.report import build_report

    old = {"teacher": {"t": fake_result(pair_of_models["teacher"], "t", 0.9)},
           "student": {"t": fake_result(pair_of_models["student"], "t", 0.8,
                                        predictions=False)}}
    fast = {**FAST, "plots": False}
    report = build_report(pair_of_models, old, tmp_path / "a", "teacher", ReportConfig(**fast))
    assert report["models"]["student"]["tasks"]["t"]["vs_teacher"] is None
    assert "Gap to the teacher" not in (tmp_path / "a" / "report.md").read_text()
    new = {"teacher": old["teacher"],
           "student": {"t": fake_result(pair_of_models["student"], "t", 0.8)}}
    report = build_report(pair_of_models, new, tmp_path / "b", "teacher",
                          ReportConfig(**fast, bootstrap_draws=0))
    assert report["models"]["student"]["tasks"]["t"]["vs_teacher"] is None
    with pytest.raises(Exception, match="bootstrap_draws"):
        ReportConfig(bootstrap_draws=-1)


def test_report_without_scores_and_bad_teacher(tmp_path, pair_of_models):
    from finetune.config import ReportConfig
    from finetune.report import build_report
    from finetune.tasks import TaskError

    report = build_report(pair_of_models, {}, tmp_path / "rep", "teacher",
                          ReportConfig(**FAST))
    assert report["tasks"] == [] and report["plots"] == []
    assert "No fine-tuning results" in (tmp_path / "rep" / "report.md").read_text()
    with pytest.raises(TaskError, match="teacher 'bert' is not one of the models"):
        build_report(pair_of_models, {}, tmp_path / "rep2", "bert", ReportConfig(**FAST))


def test_report_cli_joins_results_and_finetunes_missing(tmp_path, pair_of_models, capsys):
    """The teacher's result comes from a results.json; the student's is fine-tuned by
    --finetune-missing (through run_task), then both land in the report."""
    import pandas as pd

    from distill_cli.main import main

    res_dir = tmp_path / "results" / "teacher"
    res_dir.mkdir(parents=True)
    (res_dir / "results.json").write_text(json.dumps(
        fake_result(pair_of_models["teacher"], "topics", 0.5)))
    pd.DataFrame([{"text": f"the {w} {w}", "label": "x" if i % 2 else "y"}
                  for i, w in enumerate(WORDS * 4)]).to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "topics.yaml").write_text("name: topics\nsource: {path: d.csv}\n")
    rc = main(["report", "--model", f"teacher={pair_of_models['teacher']}",
               "--model", f"student={pair_of_models['student']}", "--teacher", "teacher",
               "--task", str(tmp_path / "topics.yaml"), "--results", str(tmp_path / "results"),
               "--finetune-missing", "--out", str(tmp_path / "rep"),
               "report.latency_batch_sizes=[1]", "report.latency_repeats=2",
               "report.latency_seq_len=8",
               "finetune.epochs=1", "finetune.precision=fp32", "finetune.save_model=none"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["models"]["teacher"]["scores"] == {"topics": 0.5}
    student = json.loads((tmp_path / "rep" / "report.json").read_text())["models"]["student"]
    ft = json.loads((tmp_path / "rep" / "finetune" / "student" / "topics" / "results.json")
                    .read_text())
    assert student["tasks"]["topics"]["score"] == ft["score"]
    assert student["tasks"]["topics"]["retention_pct"] == pytest.approx(
        100 * ft["score"] / 0.5, abs=0.01)


def test_report_error_bars_curves_and_pooler_start(tmp_path, pair_of_models):
    """Each score carries its 95% interval (the plots' error bars); a student whose
    distill_run.json names its run gets the run's curves from metrics.jsonl; a student
    starting with a fresh pooler against a trained one is said to start unequal."""
    import shutil

    from finetune.config import ReportConfig
    from finetune.report import build_report
    from finetune.report_plots import _points

    run = tmp_path / "runs" / "demo"
    student = run / "student"
    shutil.copytree(pair_of_models["student"], student)
    (student / "distill_run.json").write_text(json.dumps({
        "recipe": {"train": {"output_dir": "runs/demo/pretrain"}},
        "export": {"pooler": "fresh", "teacher_has_pooler": True,
                   "fresh_pooler_only_in_student": True, "note": "random embeddings"}}))
    (run / "pretrain").mkdir()
    with open(run / "pretrain" / "metrics.jsonl", "w") as f:
        for step in range(1, 31):
            record = {"step": step, "time": 0.0, "train/total": 5.0 / step,
                      "train/part/qkv_relation_kl": 3.0 / step, "train/part/mlm": 9.0 - step / 10,
                      "train/lr": 1e-4, "throughput/tokens_per_s": 1000.0}
            if step % 10 == 0:
                record.update({"eval/mlm_accuracy": step / 100, "eval/agreement": step / 50})
            f.write(json.dumps(record) + "\n")
    models = {"teacher": pair_of_models["teacher"], "student": student}
    results = {"teacher": {"topics": {**fake_result(models["teacher"], "topics", 0.90),
                                      "pooler": "trained"}},
               "student": {"topics": {**fake_result(student, "topics", 0.81),
                                      "pooler": "fresh"}}}
    report = build_report(models, results, tmp_path / "rep", "teacher", ReportConfig(**FAST))

    entry = report["models"]["student"]["tasks"]["topics"]
    low, high = entry["ci95"]
    assert low < 0.81 < high and high - low > 0.01  # 100 examples: a visible bar
    points = _points(report, "topics", lambda r: r["size_mib"])
    assert all(below > 0 and above > 0 for _, _, below, above, _ in points)

    curves = report["distillation"]["student"]
    assert set(curves["series"]) == {"train/total", "train/part/qkv_relation_kl",
                                     "train/part/mlm", "eval/mlm_accuracy", "eval/agreement"}
    assert curves["series"]["eval/agreement"] == [[10, 0.2], [20, 0.4], [30, 0.6]]
    assert "teacher" not in report["distillation"]
    out = tmp_path / "rep"
    assert "distillation_student.png" in report["plots"]
    assert (out / "distillation_student.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "## Distillation" in md and "| student | 30 | 0.1667 | 0.300 | 0.600 |" in md
    assert "Fine-tuning starts unequal: student start(s) with a fresh (random) pooler, " \
           "teacher with a trained one" in md
    assert "size (MiB)" in md and "(MB)" not in md
    saved = json.loads((out / "report.json").read_text())
    assert saved["models"]["student"]["export"]["fresh_pooler_only_in_student"] is True
