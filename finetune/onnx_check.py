"""Serving check of a fine-tuned task model: export it to ONNX (fp32 and dynamic int8),
score the split its result was scored on with the same prediction code as fine-tuning,
and check that ONNX Runtime's fp32 score equals PyTorch's (fp32, recomputed here: the
recorded score may come from bf16 autocast) within a tolerance.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from finetune.tasks import TaskConfig

log = logging.getLogger(__name__)


class OnnxTaskModel:
    """An ONNX Runtime session that ``finetune.predict.predict`` calls like a model."""

    training = False

    def __init__(self, session):
        self.session = session

    def eval(self) -> "OnnxTaskModel":
        return self

    def train(self, mode: bool = True) -> "OnnxTaskModel":
        return self

    def __call__(self, **batch: torch.Tensor) -> SimpleNamespace:
        from distill_common.onnx_export import ort_feed

        (logits,) = self.session.run(None, ort_feed(self.session, batch))
        return SimpleNamespace(logits=torch.from_numpy(logits))


def load_task_model(model_dir: Path, task: TaskConfig):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    from distill_common.hf_quiet import quiet_hf_loading

    auto = AutoModelForTokenClassification if task.type == "token_classification" \
        else AutoModelForSequenceClassification
    with quiet_hf_loading():
        return auto.from_pretrained(model_dir, dtype=torch.float32).eval()


def export_task_model(model_dir: Path, task: TaskConfig, onnx_dir: Path,
                      int8: bool = True) -> list[Path]:
    """``onnx_dir/model.onnx`` (output ``logits``) and, with ``int8``, ``model_int8.onnx``."""
    from transformers import AutoTokenizer

    from distill_common.onnx_export import export_onnx, onnx_input_names, quantize_int8

    model = load_task_model(model_dir, task)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    path = export_onnx(model, Path(onnx_dir) / "model.onnx", onnx_input_names(tokenizer),
                       "logits", model.config.vocab_size)
    return [path] + ([quantize_int8(path, path.with_name("model_int8.onnx"))] if int8 else [])


def _agreement(a: list, b: list) -> float:
    """Share of examples predicted alike (regression: within 1e-3)."""
    same = [abs(x - y) <= 1e-3 if isinstance(x, float) else x == y for x, y in zip(a, b)]
    return sum(same) / max(1, len(same))


def onnx_task_check(result: dict, task: TaskConfig, onnx_dir: Path, tolerance: float,
                    threads: Optional[int] = None, int8: bool = True) -> dict:
    """Export ``result["saved_model"]`` and score it on ``result["score_split"]`` with
    PyTorch (fp32) and ONNX Runtime (fp32, int8). ``equal``: |ONNX - PyTorch| score <=
    ``tolerance``."""
    from distill_common.onnx_export import ort_session
    from finetune.data import load_task_data
    from distill_common.distributed import World
    from finetune.encode import encode_split
    from finetune.metrics import task_metrics
    from finetune.predict import gold_of, predict

    model_dir = Path(result["saved_model"])
    files = export_task_model(model_dir, task, onnx_dir, int8=int8)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = getattr(load_task_data(task), result.get("score_split") or "test")
    labels = result.get("labels")
    split = encode_split(tokenizer, task, examples, labels, result["hparams"]["max_length"])
    gold = gold_of(task, examples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def score(model) -> tuple[float, list]:
        preds = predict(model, split, task, labels, result["hparams"]["eval_batch_size"],
                        torch.device("cpu"), False, World(), pad_id)
        return task_metrics(task.type, gold, preds)[task.metric], preds

    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        pytorch, reference = score(load_task_model(model_dir, task))
    finally:
        torch.set_num_threads(threads_before)
    out = {"metric": task.metric, "split": result.get("score_split"),
           "examples": len(examples), "tolerance": tolerance, "pytorch_fp32": pytorch,
           "files": [str(f) for f in files]}
    for key, path in zip(("onnx", "onnx_int8"), files):
        value, preds = score(OnnxTaskModel(ort_session(path, threads)))
        out[key] = value
        out[f"{key}_agreement"] = _agreement(preds, reference)
    out["equal"] = abs(out["onnx"] - pytorch) <= tolerance
    log.info("ONNX check %s on %s: PyTorch %.4f, ONNX %.4f%s (%s)", model_dir, task.name,
             pytorch, out["onnx"], f", int8 {out['onnx_int8']:.4f}" if int8 else "",
             "equal" if out["equal"] else f"differs by more than {tolerance}")
    return out
