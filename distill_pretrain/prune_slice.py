"""Copying a pruning plan's slices of the teacher's weights into the student.

Every student parameter is matched to its teacher parameter and to one index list per
dimension (None: the whole dimension), from where its module sits:

    embeddings: Embedding (rows, E), LayerNorm (E)      E: kept embedding channels
    layer i (cut from teacher layer plan.layers[i]):
      query, key  (QK_i, H)    value (V_i, H)    attention output (H, V_i)
      FFN in      (F_i, H)     FFN out (H, F_i)  every LayerNorm (H)
    embeddings_project (ELECTRA): (H, E)
    shared head bias (MPNet): (buckets, student heads), summed over each head's group
    MLM head: Linear (E, H), LayerNorm (E), the vocabulary bias whole; the decoder is
      tied to the word embeddings

A parameter found nowhere in this table is an error, never silently left random.
Tensors are copied: the teacher is not touched.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from distill_pretrain.architectures import Architecture

Index = tuple[Optional[Sequence[int]], ...]


class PruneSliceError(RuntimeError):
    """A student parameter the pruning table does not cover (a new architecture entry
    needs its paths in distill_pretrain/architectures.py)."""


def take(tensor: torch.Tensor, index: Index) -> torch.Tensor:
    """A copy of ``tensor`` with dimension d restricted to ``index[d]`` (None: all)."""
    out = tensor.detach()
    for dim, kept in enumerate(index):
        if kept is not None:
            out = out.index_select(dim, torch.as_tensor(list(kept), dtype=torch.long,
                                                         device=out.device))
    return out.clone()


def _by_kind(module: nn.Module, attr: str, out: Sequence[int] | None,
             inp: Sequence[int] | None) -> Index:
    """Index of a Linear / LayerNorm / Embedding parameter from its output and input sets."""
    if isinstance(module, nn.Embedding):
        return (None, out)
    if isinstance(module, nn.LayerNorm) or attr == "bias":
        return (out,)
    return (out, inp)


def _layer_rule(rest: str, module: nn.Module, attr: str, plan, i: int,
                arch: Architecture) -> tuple[Index, float]:
    hidden = plan.hidden
    roles = {arch.query: (plan.query_key[i], hidden), arch.key: (plan.query_key[i], hidden),
             arch.value: (plan.value[i], hidden),
             arch.attention_output: (hidden, plan.value[i]),
             arch.ffn_in: (plan.ffn[i], hidden), arch.ffn_out: (hidden, plan.ffn[i])}
    if rest in roles:
        scale = plan.query_scale if rest == arch.query else 1.0
        return _by_kind(module, attr, *roles[rest]), scale
    if isinstance(module, nn.LayerNorm):
        return (hidden,), 1.0
    raise PruneSliceError(f"layer parameter {rest}.{attr} has no pruning rule")


def _base_rule(path: str, module: nn.Module, attr: str, plan,
               arch: Architecture) -> tuple[str, Index, float]:
    """(teacher path, index, scale) of a base-model parameter at module ``path``."""
    if path.startswith(arch.layers + "."):
        number, _, rest = path[len(arch.layers) + 1:].partition(".")
        i = int(number)
        index, scale = _layer_rule(rest, module, attr, plan, i, arch)
        return f"{arch.layers}.{plan.layers[i] - 1}.{rest}", index, scale
    if path == arch.embeddings_project:
        return path, _by_kind(module, attr, plan.hidden, plan.embedding), 1.0
    if path == arch.embeddings or path.startswith(arch.embeddings + "."):
        if isinstance(module, (nn.Embedding, nn.LayerNorm)):
            return path, _by_kind(module, attr, plan.embedding, None), 1.0
    raise PruneSliceError(f"base-model parameter {path}.{attr} has no pruning rule")


def _head_rule(module: nn.Module, attr: str, plan, vocab_size: int) -> Index:
    if isinstance(module, nn.LayerNorm):
        return (plan.embedding,)
    if isinstance(module, nn.Linear):  # the transform: hidden -> embedding width
        return _by_kind(module, attr, plan.embedding, plan.hidden)
    if getattr(module, attr).shape == (vocab_size,):  # the vocabulary bias
        return (None,)
    raise PruneSliceError(f"MLM head parameter {type(module).__name__}.{attr} has no "
                          f"pruning rule")


def _copy(target: nn.Parameter, source: torch.Tensor, index: Index, scale: float,
          name: str) -> None:
    value = take(source, index).to(target.dtype) * scale
    if value.shape != target.shape:
        raise PruneSliceError(f"{name}: the teacher's slice has shape {tuple(value.shape)}, "
                              f"the student's parameter {tuple(target.shape)}")
    target.copy_(value)


def _shared_head_bias(target: nn.Parameter, source: torch.Tensor, plan) -> None:
    """(buckets, teacher heads) -> (buckets, student heads): each student head's bias is
    the sum of its teacher heads' (their scores add up when heads are merged)."""
    groups = plan.head_groups[0]
    summed = torch.stack([source[:, group].sum(dim=1) for group in groups], dim=1)
    target.copy_(summed.to(target.dtype))


@torch.no_grad()
def copy_pruned_weights(student: nn.Module, teacher, plan) -> None:
    """Fill ``student`` (a masked-LM model built with the plan's shape) with the plan's
    slices of ``teacher`` (a loaded ``Teacher``). The student's MLM head is sliced from
    the teacher's when the teacher has one, else it keeps its fresh initialisation."""
    arch = teacher.arch
    prefix = student.base_model_prefix + "."
    decoder = student.get_output_embeddings()
    for name, param in student.named_parameters():
        path, _, attr = name.rpartition(".")
        module = student.get_submodule(path)
        if name.startswith(prefix):
            base_path = path[len(prefix):]
            if base_path == arch.shared_head_bias:
                _shared_head_bias(param, teacher.base.get_submodule(base_path).weight, plan)
                continue
            t_path, index, scale = _base_rule(base_path, module, attr, plan, arch)
            source = getattr(teacher.base.get_submodule(t_path), attr)
        elif not teacher.has_mlm_head:
            continue
        elif module is decoder and attr == "weight":
            continue  # tied to the word embeddings, copied with them
        else:
            index = (None,) if module is decoder else \
                _head_rule(module, attr, plan, student.config.vocab_size)
            scale = 1.0
            source = getattr(teacher.model.get_submodule(path), attr)
        _copy(param, source, index, scale, name)
