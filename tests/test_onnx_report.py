"""`report.onnx: true`: ONNX Runtime latency beside PyTorch's, and each fine-tuned model
exported to ONNX scoring its test split as PyTorch does (fp32), with the int8 variant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_finetune_train import (classification_rows, finetune_cfg, save_tiny_bert,
                                 token_rows, write_task)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("onnx_encoder"))


def test_report_with_onnx(tmp_path, encoder_dir):
    import pandas as pd

    from distill_common.config import load_config
    from finetune import build_report, run_task
    from finetune.config import ReportConfig
    from finetune.tasks import load_task

    pd.DataFrame(classification_rows(240)).to_csv(tmp_path / "topics.csv", index=False)
    task = load_task(write_task(tmp_path, "topics", """
name: topics
type: classification
source: {path: topics.csv}
columns: {text: sentence, label: topic}
split: {validation: 0.15, test: 0.25, seed: 3}
"""))
    result = run_task(encoder_dir, task, tmp_path / "ft", finetune_cfg("epochs=3"))
    cfg = load_config(ReportConfig, None, ["onnx=true", "latency_batch_sizes=[1,2]",
                                           "latency_seq_len=16", "latency_repeats=3",
                                           "latency_warmup=1", "threads=1", "plots=false",
                                           "bootstrap_draws=0"])
    report = build_report({"teacher": encoder_dir}, {"teacher": {"topics": result}},
                          tmp_path / "report", "teacher", cfg, task_configs={"topics": task})

    row = report["models"]["teacher"]
    for key in ("ort", "ort_int8"):
        assert [r["batch"] for r in row[key]] == [1, 2] and all(r["median_ms"] > 0
                                                               for r in row[key])
    check = row["tasks"]["topics"]["onnx"]
    assert check["examples"] == 60 and check["metric"] == "accuracy"
    assert check["equal"] and check["onnx_agreement"] == 1.0
    assert check["onnx"] == pytest.approx(check["pytorch_fp32"], abs=1e-12)
    assert 0 <= check["onnx_int8"] <= 1 and check["onnx_int8_agreement"] > 0.8
    assert check["pytorch_fp32"] == pytest.approx(result["score"], abs=0.05)  # fp32 run
    md = (tmp_path / "report" / "report.md").read_text()
    assert "ORT b1 (ms)" in md and "ORT int8 b2 (ms)" in md and "## ONNX Runtime" in md
    assert "| teacher | topics |" in md and "| yes (±0.50 points) |" in md
    on_disk = json.loads((tmp_path / "report" / "report.json").read_text())
    assert on_disk["models"]["teacher"]["tasks"]["topics"]["onnx"]["equal"] is True


def test_token_model_scores_alike_under_onnx(tmp_path, encoder_dir):
    import pandas as pd

    from finetune import run_task
    from finetune.onnx_check import onnx_task_check
    from finetune.tasks import load_task

    pd.DataFrame(token_rows(200)).to_json(tmp_path / "ner.jsonl", orient="records",
                                          lines=True)
    task = load_task(write_task(tmp_path, "ner", """
name: ner
type: token_classification
source: {path: ner.jsonl}
columns: {text: tokens, label: ner_tags}
"""))
    result = run_task(encoder_dir, task, tmp_path / "ft", finetune_cfg("epochs=3"))
    check = onnx_task_check(result, task, tmp_path / "onnx", tolerance=0.005, threads=1,
                            int8=False)
    assert check["metric"] == "entity_f1" and check["equal"]
    assert check["onnx_agreement"] == 1.0 and "onnx_int8" not in check
    assert [Path(f).name for f in check["files"]] == ["model.onnx"]
