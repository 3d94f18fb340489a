"""How much each part of the teacher matters, measured on its own activations over a
calibration sample (activation-based importance, as in Minitron: Muralidharan et al.,
2024). One forward pass per batch with hooks; only real (non-padding) tokens count.

- hidden channel c: mean |x_c| of the hidden states between layers (every layer's input
  and the last layer's output, LayerNorm outputs but for ELECTRA's projected embeddings),
  summed over those L + 1 states;
- head h of layer l: mean || W_o[:, h] c_h ||_2, the norm of the head's contribution to
  the attention output projection (c_h: the head's slice of the attention context);
- query/key channel: mean |q_c| * mean |k_c|; value channel: mean |c_c| * ||W_o[:, c]||
  (they choose channels inside a head when the student's heads are narrower);
- FFN neuron n of layer l: mean |a_n| of the activation entering the FFN output projection;
- layer l: block importance, mean (1 - cos(input, output)) over tokens (Men et al., 2024).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from distill_pretrain.architectures import Architecture, layer_list
from distill_pretrain.config import RecipeValidationError


@dataclass
class Importance:
    """Per-part scores of one teacher (layers as present, 0-based)."""
    hidden: torch.Tensor
    """(hidden,)"""
    heads: torch.Tensor
    """(layers, heads)"""
    query_key: torch.Tensor
    """(layers, heads * head_size)"""
    value: torch.Tensor
    """(layers, heads * head_size)"""
    ffn: torch.Tensor
    """(layers, intermediate)"""
    layers: torch.Tensor
    """(layers,)"""
    sequences: int
    tokens: int


class _Sums:
    """Running sums over real tokens, filled by the hooks of one teacher."""

    def __init__(self, layers: int, hidden: int, heads: int, inner: int, ffn: int,
                 device: torch.device):
        def zeros(*shape):  # float64 sums: hundreds of thousands of tokens add up exactly
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        self.mask = torch.zeros(0, dtype=torch.bool)  # (batch * seq,) of the running batch
        self.hidden = zeros(hidden)
        self.heads = zeros(layers, heads)
        self.query, self.key, self.context = zeros(layers, inner), zeros(layers, inner), \
            zeros(layers, inner)
        self.ffn = zeros(layers, ffn)
        self.layers = zeros(layers)
        self.layer_inputs: dict[int, torch.Tensor] = {}
        self.tokens = 0
        self.sequences = 0

    def real(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, ...) -> (real tokens, ...) in float32."""
        return x.reshape(-1, *x.shape[2:])[self.mask].float()


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _layer_hooks(sums: _Sums, index: int, last: bool):
    def before(_module, args, kwargs):
        x = sums.real(args[0] if args else kwargs["hidden_states"])  # (tokens, hidden)
        sums.layer_inputs[index] = x
        sums.hidden += x.abs().sum(0).double()

    def after(_module, _inputs, output):
        y = sums.real(_first(output))
        x = sums.layer_inputs.pop(index)
        sums.layers[index] += (1 - nn.functional.cosine_similarity(x, y, dim=-1)).sum().double()
        if last:
            sums.hidden += y.abs().sum(0).double()
    return before, after


def _projection_hook(target: torch.Tensor, sums: _Sums, index: int):
    def hook(_module, _inputs, output):
        target[index] += sums.real(_first(output)).abs().sum(0).double()
    return hook


def _attention_output_hook(sums: _Sums, index: int, heads: int):
    def hook(module, args):
        c = sums.real(args[0])  # (tokens, heads * head_size)
        sums.context[index] += c.abs().sum(0).double()
        w = module.weight.float()  # (hidden, heads * head_size)
        per_head = torch.einsum("nhd,ehd->nhe", c.view(c.shape[0], heads, -1),
                                w.view(w.shape[0], heads, -1))  # (tokens, heads, hidden)
        sums.heads[index] += per_head.norm(dim=-1).sum(0).double()
    return hook


def _ffn_hook(sums: _Sums, index: int):
    def hook(_module, args):
        sums.ffn[index] += sums.real(args[0]).abs().sum(0).double()
    return hook


@contextmanager
def _hooked(base: nn.Module, arch: Architecture, sums: _Sums, heads: int) -> Iterator[None]:
    layers = layer_list(base, arch)
    handles = []
    try:
        for i, layer in enumerate(layers):
            before, after = _layer_hooks(sums, i, last=i == len(layers) - 1)
            handles += [layer.register_forward_pre_hook(before, with_kwargs=True),
                        layer.register_forward_hook(after),
                        layer.get_submodule(arch.query).register_forward_hook(
                            _projection_hook(sums.query, sums, i)),
                        layer.get_submodule(arch.key).register_forward_hook(
                            _projection_hook(sums.key, sums, i)),
                        layer.get_submodule(arch.attention_output).register_forward_pre_hook(
                            _attention_output_hook(sums, i, heads)),
                        layer.get_submodule(arch.ffn_out).register_forward_pre_hook(
                            _ffn_hook(sums, i))]
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def measure_importance(teacher, batches: Iterable[dict]) -> Importance:
    """Scores of the ``teacher`` (a loaded ``Teacher``) on contract-2 ``batches``
    (``input_ids`` and ``attention_mask`` (batch, seq) are read; labels are not)."""
    base, arch = teacher.base, teacher.arch
    layers = layer_list(base, arch)
    first = layers[0]
    inner = first.get_submodule(arch.query).out_features
    device = next(base.parameters()).device
    sums = _Sums(len(layers), teacher.hidden_size, teacher.num_heads, inner,
                 first.get_submodule(arch.ffn_in).out_features, device)
    was_training = base.training
    base.eval()
    try:
        with _hooked(base, arch, sums, teacher.num_heads):
            for batch in batches:
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                sums.mask = mask.bool().reshape(-1)
                sums.tokens += int(sums.mask.sum())
                sums.sequences += int(ids.shape[0])
                base(input_ids=ids, attention_mask=mask)
    finally:
        base.train(was_training)
    if sums.tokens == 0:
        raise RecipeValidationError("student.init=pruned: the calibration sample holds no "
                                    "tokens; check train.data_dir and "
                                    "student.calibration_samples")
    return _averaged(sums, layers, arch)


def _averaged(sums: _Sums, layers: nn.ModuleList, arch: Architecture) -> Importance:
    n = float(sums.tokens)
    out_norms = torch.stack([layer.get_submodule(arch.attention_output).weight.double()
                             .norm(dim=0) for layer in layers])  # (layers, inner)

    def mean(total: torch.Tensor) -> torch.Tensor:
        return (total / n).float().cpu()
    return Importance(hidden=mean(sums.hidden), heads=mean(sums.heads),
                      query_key=mean(sums.query * sums.key / n),
                      value=mean(sums.context * out_norms),
                      ffn=mean(sums.ffn), layers=mean(sums.layers),
                      sequences=sums.sequences, tokens=sums.tokens)
