"""Loading Hugging Face model folders for fine-tuning and measuring: checks that say
what is wrong with a folder (no tokenizer, weights that do not match the config) before
anything trains."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from distill_common.hf_quiet import quiet_hf_loading
from finetune.tasks import TaskConfig, TaskError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")


def load_encoder(model_dir: Path):
    """The bare encoder (``AutoModel``), in eval mode: what every task head sits on."""
    from transformers import AutoModel

    check_model_dir(model_dir, need_tokenizer=False)
    with quiet_hf_loading():
        # fp32 whatever the folder was saved in: latency and fine-tuning compare models
        # on equal terms (bf16 compute is autocast's job, over fp32 master weights).
        model, info = AutoModel.from_pretrained(model_dir, output_loading_info=True,
                                                dtype=torch.float32)
    check_loading_info(model_dir, info)
    return model.eval()


def check_model_dir(model_dir: Path, need_tokenizer: bool = True) -> None:
    if not model_dir.is_dir():
        raise TaskError(f"{model_dir}: model folder not found")
    if not (model_dir / "config.json").is_file():
        raise TaskError(f"{model_dir}: not a Hugging Face model folder (no config.json); "
                        f"pass a folder written by save_pretrained / `distill export`")
    if need_tokenizer and not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        raise TaskError(f"{model_dir}: the model folder has no tokenizer (none of "
                        f"{', '.join(TOKENIZER_FILES)}). Save the teacher's tokenizer into "
                        f"it: AutoTokenizer.from_pretrained(TEACHER).save_pretrained("
                        f"'{model_dir}')")


def load_tokenizer(model_dir: Path, task: TaskConfig):
    from transformers import AutoTokenizer

    check_model_dir(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise TaskError(f"{model_dir}: tokenizer does not load: {err}") from None
    if task.type == "token_classification" and not tok.is_fast:
        raise TaskError(f"{model_dir}: token classification needs a fast tokenizer "
                        f"(tokenizer.json) to align words and sub-words")
    return tok


def load_model(model_dir: Path, task: TaskConfig, labels: Optional[list[str]]):
    """(the encoder with a fresh task head, how its pooler starts: ``pooler_start``).
    Works on bare encoders (BertModel, MPNetModel) and on *ForMaskedLM folders (the MLM
    head is left out)."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    if task.type == "regression":
        kwargs = {"num_labels": 1, "problem_type": "regression"}
    else:
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                  "label2id": {lab: i for i, lab in enumerate(labels)}}
        if task.is_classification:
            kwargs["problem_type"] = "single_label_classification"
    auto = AutoModelForTokenClassification if task.type == "token_classification" \
        else AutoModelForSequenceClassification
    try:
        with quiet_hf_loading():
            model, info = auto.from_pretrained(model_dir, output_loading_info=True,
                                               dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise TaskError(f"{model_dir}: cannot load as {auto.__name__}: {err}") from None
    check_loading_info(model_dir, info)
    return model, pooler_start(model, info)


def pooler_start(model, info: dict) -> str:
    """fresh (the task model reads a pooler the folder has no weights for), trained, or
    none (the task model reads no pooler: token tasks, families without one)."""
    has_pooler = any(".pooler." in f".{name}." for name, _ in model.named_modules())
    if not has_pooler:
        return "none"
    return "fresh" if any("pooler" in k for k in info.get("missing_keys", [])) else "trained"


def pooler_note(model_dir: Path, start: str) -> Optional[str]:
    """What a fresh pooler means for a comparison, from the student's distill_run.json
    (``export.fresh_pooler_only_in_student``, ``export.pooler``): only this model starts
    with a random pooler, or its teacher does too. None when the pooler is not fresh."""
    if start != "fresh":
        return None
    export = export_record(model_dir)
    if export.get("fresh_pooler_only_in_student"):
        return (f"{model_dir} starts fine-tuning with a fresh (random) pooler while its "
                f"teacher starts with its trained one: the comparison starts unequal "
                f"({export.get('note') or 'the pooler could not be carried over'})")
    if export.get("teacher_has_pooler") is False:
        return (f"{model_dir} starts fine-tuning with a fresh (random) pooler, and so does "
                f"its teacher (it has no trained pooler either): both start alike")
    return f"{model_dir} has no pooler weights: fine-tuning starts it with a fresh pooler"


def export_record(model_dir: Path) -> dict:
    """The ``export`` entry of a student's distill_run.json (pooler, teacher_has_pooler,
    fresh_pooler_only_in_student, note...); {} for any other folder."""
    import json

    record = Path(model_dir) / "distill_run.json"
    try:
        return json.loads(record.read_text()).get("export") or {} if record.is_file() else {}
    except ValueError:
        return {}


HEAD_KEYS = ("classifier", "pooler", "score")


def check_loading_info(model_dir: Path, info: dict) -> None:
    """Only the task head (and a pooler the folder may lack) may be freshly initialised;
    a missing encoder weight means the folder does not hold the model its config says."""
    missing = sorted(info.get("missing_keys", []))
    encoder_missing = [k for k in missing if not any(h in k for h in HEAD_KEYS)]
    if encoder_missing or info.get("mismatched_keys"):
        raise TaskError(f"{model_dir}: {len(encoder_missing)} encoder weight(s) missing from "
                        f"the checkpoint (e.g. {encoder_missing[:3]}) and "
                        f"{len(info.get('mismatched_keys', []))} of the wrong shape: the "
                        f"weights do not match config.json; export the model again")
    log.info("%s: fresh %s; %d checkpoint weight(s) not used by the task model%s", model_dir,
             ", ".join(missing) or "no new weights", len(info.get("unexpected_keys", [])),
             " (e.g. an MLM head)" if info.get("unexpected_keys") else "")
