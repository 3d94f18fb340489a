"""The sentence-transformers layout of an exported student whose teacher is a
sentence-transformers model: ``modules.json``, ``sentence_bert_config.json``, the pooling
and normalisation modules and ``config_sentence_transformers.json``, so that
``SentenceTransformer(student)`` embeds the way the teacher does instead of guessing.

The teacher's files are carried over as they are (old and new sentence-transformers
formats alike), with the pooling width set to the student's. Only the modules that hold
no trained weights of the teacher's width can be carried: Transformer, Pooling and
Normalize. A teacher with more (a Dense projection, say) gets no layout, and the reason
is recorded.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

CARRIED = ("Transformer", "Pooling", "Normalize")
# Pooling width: the 2.x-5.x key, then the 6.x key.
WIDTH_KEYS = ("word_embedding_dimension", "embedding_dimension")


def is_sentence_transformer(folder: Optional[Path]) -> bool:
    return folder is not None and (Path(folder) / "modules.json").is_file()


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def pooling_mode(config: dict) -> str:
    """'mean', 'cls', ... from either format of the pooling config."""
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        return "+".join(mode) if isinstance(mode, list) else str(mode)
    modes = [k[len("pooling_mode_"):].removesuffix("_tokens") for k, v in config.items()
             if k.startswith("pooling_mode_") and v is True]
    return "+".join(modes) or "?"


def write_sentence_transformers(out: Path, teacher_dir: Path, width: int,
                                max_positions: int) -> dict:
    """Write the layout into ``out`` (the student's folder); returns what was done:
    ``written``, and ``modules``, ``pooling``, ``normalize`` or ``reason``."""
    modules = json.loads((teacher_dir / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    extra = [k for k in kinds if k not in CARRIED]
    if extra or not kinds or kinds[0] != "Transformer" or kinds.count("Transformer") != 1:
        reason = (f"the teacher's sentence-transformers modules {kinds} hold more than "
                  f"{', '.join(CARRIED)} (trained at the teacher's width)")
        log.warning("export: no sentence-transformers layout: %s", reason)
        return {"written": False, "reason": reason}
    carried, pooling = [], None
    for module, kind in zip(modules, kinds):
        source = teacher_dir / module["path"]
        if kind == "Transformer":
            config = _read(source / "sentence_bert_config.json")
            if "max_seq_length" in config:  # the student has the teacher's positions
                config["max_seq_length"] = min(config["max_seq_length"], max_positions)
            _write(out / "sentence_bert_config.json", config)
            module = dict(module, path="")  # the student's weights are at the top
        elif kind == "Pooling":
            config = _read(source / "config.json")
            for key in WIDTH_KEYS:
                if key in config:
                    config[key] = width
            _write(out / module["path"] / "config.json", config)
            pooling = pooling_mode(config)
        else:  # Normalize: no weights; a config only in newer versions
            (out / module["path"]).mkdir(parents=True, exist_ok=True)
            if (source / "config.json").is_file():
                shutil.copyfile(source / "config.json", out / module["path"] / "config.json")
        carried.append(module)
    _write(out / "modules.json", carried)
    _write(out / "config_sentence_transformers.json",
           _st_config(_read(teacher_dir / "config_sentence_transformers.json")))
    return {"written": True, "modules": kinds, "pooling": pooling,
            "normalize": "Normalize" in kinds}


def _st_config(teacher_config: dict) -> dict:
    """The teacher's (prompts, similarity function), with the versions of this export."""
    import torch
    import transformers

    versions = dict(teacher_config.get("__version__") or {})
    versions.update(transformers=transformers.__version__, pytorch=torch.__version__)
    try:
        import sentence_transformers

        versions["sentence_transformers"] = sentence_transformers.__version__
    except ImportError:  # not needed to write the layout; the teacher's value stays
        pass
    return {**teacher_config, "__version__": versions}
