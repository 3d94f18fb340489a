"""Loading a frozen teacher: any encoder family in ``architectures.ARCHITECTURES``.

Whether the teacher has a masked-LM head is read from its *weights* (not guessed from
the class name in config.json): loading ``AutoModelForMaskedLM`` on a headless checkpoint
would silently give a randomly initialised head, and soft targets from it are noise.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from distill_pretrain.architectures import (Architecture, UnsupportedArchitectureError,
                                            architecture_of, dims, layer_list)
from distill_pretrain.config import DTYPES, RecipeValidationError, TeacherConfig

log = logging.getLogger(__name__)

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


@dataclass
class Teacher:
    model: nn.Module
    """Frozen, eval mode; a masked-LM model when ``has_mlm_head``, else the base model."""
    config: object
    """Its Hugging Face PretrainedConfig (layer count as in the checkpoint)."""
    path: Path
    tokenizer: object
    has_mlm_head: bool
    arch: Architecture
    num_layers: int
    """Layers actually present (fewer than the checkpoint's when loaded truncated)."""

    @property
    def base(self) -> nn.Module:
        """The encoder without head (``BertModel`` inside ``BertForMaskedLM``)."""
        return self.model.base_model

    @property
    def hidden_size(self) -> int:
        return dims(self.config, self.arch)[1]

    @property
    def num_heads(self) -> int:
        return dims(self.config, self.arch)[2]

    @property
    def total_layers(self) -> int:
        return dims(self.config, self.arch)[0]


def checkpoint_keys(folder: Path) -> list[str]:
    """Parameter names stored in a model folder (safetensors, sharded or not, or .bin)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return list(f.keys())
    binary = folder / "pytorch_model.bin"
    if binary.is_file():
        state = torch.load(binary, map_location="cpu", weights_only=True, mmap=True)
        return list(state)
    raise RecipeValidationError(f"{folder}: no model weights (model.safetensors, "
                                f"model.safetensors.index.json or pytorch_model.bin)")


def has_mlm_head(folder: Path, arch: Architecture) -> bool:
    """True when the checkpoint stores a trained MLM head for this family."""
    return any(key.startswith(arch.head_weight_prefixes) for key in checkpoint_keys(folder))


def read_teacher_config(path_or_asset: str):
    """(folder, HF config, Architecture) without loading weights."""
    from transformers import AutoConfig

    from distill_common.assets import AssetError, resolve_model_dir

    try:
        folder = resolve_model_dir(path_or_asset)
    except AssetError as err:
        raise RecipeValidationError(f"teacher.path: {err}") from None
    if not (folder / "config.json").is_file():
        raise RecipeValidationError(f"teacher.path: {folder} has no config.json; point it "
                                    f"at a Hugging Face model folder")
    hf_config = AutoConfig.from_pretrained(folder)
    try:
        arch = architecture_of(hf_config)
    except UnsupportedArchitectureError as err:
        raise RecipeValidationError(f"teacher.path ({folder}): {err}") from None
    return folder, hf_config, arch


def truncate_layers(base_model: nn.Module, arch: Architecture, num_layers: int) -> None:
    """Keep only the first ``num_layers`` layers (in place; frees the others)."""
    layers = layer_list(base_model, arch)
    parent_path, _, name = arch.layers.rpartition(".")
    parent = base_model.get_submodule(parent_path) if parent_path else base_model
    setattr(parent, name, nn.ModuleList(list(layers)[:num_layers]))


def load_teacher(cfg: TeacherConfig, *, device="cpu", dtype=torch.float32,
                 up_to_layer: Optional[int] = None) -> Teacher:
    """Load the teacher frozen in eval mode; with ``up_to_layer=k`` keep layers 1..k only
    (no objective may then need the MLM head or deeper layers)."""
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    folder, hf_config, arch = read_teacher_config(cfg.path)
    if cfg.dtype is not None:
        dtype = TORCH_DTYPES[cfg.dtype]
    with_head = has_mlm_head(folder, arch)
    model_cls = AutoModelForMaskedLM if with_head else AutoModel
    model = model_cls.from_pretrained(folder, dtype=dtype)
    total = dims(hf_config, arch)[0]
    num_layers = total
    if up_to_layer is not None:
        if not 1 <= up_to_layer <= total:
            raise RecipeValidationError(f"up_to_layer={up_to_layer} is outside 1..{total} "
                                        f"of the teacher {folder}")
        truncate_layers(model.base_model, arch, up_to_layer)
        num_layers = up_to_layer
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    log.info("teacher %s: %s, %d/%d layers, hidden %d, MLM head: %s", folder,
             type(model).__name__, num_layers, total, dims(hf_config, arch)[1], with_head)
    return Teacher(model=model, config=model.config, path=folder, tokenizer=tokenizer,
                   has_mlm_head=with_head, arch=arch, num_layers=num_layers)
