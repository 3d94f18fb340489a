"""Capturing what objectives need from inside an encoder, with forward hooks only.

The models run their normal (sdpa/eager) forward; hooks record the embedding output,
chosen layer outputs and chosen Q/K/V projections. Attention scores are rebuilt from the
captured Q and K (``losses.attention_scores``), which works under sdpa (where
transformers 5.x returns no attention maps) and gives the pre-dropout distribution.
MPNet adds a relative position bias to its scores; it is captured too, so rebuilt
scores equal the model's own.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from distill_pretrain.architectures import Architecture, layer_list

QKV = ("query", "key", "value")


@dataclass
class Captured:
    """Tensors recorded in one forward pass; layer numbers as in config.py (0=embeddings)."""
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer -> (batch, seq, hidden)."""
    query: dict[int, torch.Tensor] = field(default_factory=dict)
    key: dict[int, torch.Tensor] = field(default_factory=dict)
    value: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer -> (batch, seq, heads * head_size), all heads concatenated."""
    position_bias: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer -> (batch or 1, heads, seq, seq) additive score bias (MPNet only)."""


@dataclass(frozen=True)
class CapturePlan:
    """What to record: hidden-state layers and, per Q/K/V part, the layers."""
    hidden_layers: frozenset[int] = frozenset()
    qkv_layers: tuple[tuple[str, frozenset[int]], ...] = ()

    @staticmethod
    def build(hidden_layers: Iterable[int] = (),
              qkv: dict[str, Iterable[int]] | None = None) -> "CapturePlan":
        qkv = qkv or {}
        return CapturePlan(frozenset(hidden_layers),
                           tuple((part, frozenset(qkv.get(part, ()))) for part in QKV))

    def layers_of(self, part: str) -> frozenset[int]:
        return dict(self.qkv_layers).get(part, frozenset())

    @property
    def deepest_layer(self) -> int:
        layers = set(self.hidden_layers)
        for _, ls in self.qkv_layers:
            layers |= ls
        return max(layers, default=0)

    @property
    def score_layers(self) -> frozenset[int]:
        """Layers whose attention scores are rebuilt (both Q and K captured)."""
        return self.layers_of("query") & self.layers_of("key")


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def capture(base_model: nn.Module, arch: Architecture, plan: CapturePlan) -> Iterator[Captured]:
    """Record the plan's tensors during forward passes inside the ``with`` block."""
    captured = Captured()
    handles = []
    layers = layer_list(base_model, arch)

    def store(target: dict, index: int):
        def hook(_module, _inputs, output):
            target[index] = _first(output)
        return hook

    try:
        for k in sorted(plan.hidden_layers):
            module = base_model.get_submodule(arch.embeddings) if k == 0 else layers[k - 1]
            handles.append(module.register_forward_hook(store(captured.hidden, k)))
        for part in QKV:
            path = getattr(arch, part)
            for k in sorted(plan.layers_of(part)):
                module = layers[k - 1].get_submodule(path)
                handles.append(module.register_forward_hook(store(getattr(captured, part), k)))
        if arch.position_bias is not None:
            path, index, keyword = arch.position_bias
            for k in sorted(plan.score_layers):
                handles.append(layers[k - 1].get_submodule(path).register_forward_pre_hook(
                    _bias_hook(captured.position_bias, k, index, keyword), with_kwargs=True))
        yield captured
    finally:
        for h in handles:
            h.remove()


def _bias_hook(target: dict, layer: int, index: int, keyword: str):
    def hook(_module, args, kwargs):
        bias = kwargs.get(keyword, args[index] if len(args) > index else None)
        if bias is not None:
            target[layer] = bias
    return hook


@contextmanager
def truncated(base_model: nn.Module, arch: Architecture, num_layers: int) -> Iterator[None]:
    """Run only layers 1..num_layers inside the block (the ModuleList is swapped for a
    shorter one and put back afterwards)."""
    layers = layer_list(base_model, arch)
    if num_layers >= len(layers):
        yield
        return
    parent_path, _, name = arch.layers.rpartition(".")
    parent = base_model.get_submodule(parent_path) if parent_path else base_model
    # Plain attribute assignment of a ModuleList re-registers it as a child module.
    setattr(parent, name, nn.ModuleList(list(layers)[:num_layers]))
    try:
        yield
    finally:
        setattr(parent, name, layers)
