"""Where things live inside each supported encoder family: one table entry per family.

The objectives never touch a model's code: they hook modules found through these paths.
Paths of ``embeddings`` and ``layers`` are relative to the *base* model
(``model.base_model``: the ``BertModel`` inside ``BertForMaskedLM``); Q/K/V and the
attention module are relative to one layer; ``mlm_head`` paths are relative to the
masked-LM model and are applied in order to hidden states of shape (N, hidden).
Adding a family = adding an entry (check it with tests/test_teacher.py's tiny models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from distill_common.errors import DistillUserError


@dataclass(frozen=True)
class Architecture:
    model_type: str
    embeddings: str
    """Module whose output is the embedding output ("hidden state 0")."""
    layers: str
    """The nn.ModuleList of transformer layers."""
    query: str
    key: str
    value: str
    """Linear projections (hidden -> heads * head_size) inside one layer."""
    attention_output: str
    """Linear projection (heads * head_size -> hidden) of the attention context, in a layer."""
    ffn_in: str
    """Feed-forward Linear (hidden -> intermediate) inside one layer."""
    ffn_out: str
    """Feed-forward Linear (intermediate -> hidden) inside one layer; its input is the
    activation (after the nonlinearity)."""
    mlm_head: tuple[str, ...]
    """Modules of the masked-LM model mapping last hidden states to vocabulary logits."""
    head_weight_prefixes: tuple[str, ...]
    """Checkpoint key prefixes that exist only when the weights hold a trained MLM head."""
    num_layers_key: str = "num_hidden_layers"
    hidden_size_key: str = "hidden_size"
    num_heads_key: str = "num_attention_heads"
    intermediate_size_key: str = "intermediate_size"
    attention_dropout_key: str = "attention_probs_dropout_prob"
    hidden_dropout_key: str = "hidden_dropout_prob"
    word_embeddings: str = "word_embeddings"
    """Token embedding table inside ``embeddings``."""
    embedding_size_key: Optional[str] = None
    """Config key of the embedding width when it may differ from the hidden size."""
    pooler: Optional[str] = "pooler"
    """The pooler (dense + tanh on the first token) inside the base model, which BERT's
    sequence classifier sits on; None for families without one."""
    position_bias: Optional[tuple[str, int, str]] = None
    """(module inside a layer, positional index, keyword) of an additive attention-score
    bias passed to that module (MPNet's relative position bias), captured with a
    forward pre-hook so rebuilt attention scores match the model's own."""
    shared_head_bias: Optional[str] = None
    """nn.Embedding (buckets, heads) in the base model that every layer's attention adds
    per head (MPNet's relative attention bias): heads must be pruned alike in all layers."""
    embeddings_project: Optional[str] = None
    """Linear (embedding width -> hidden) in the base model after the embeddings (ELECTRA,
    present when embedding_size differs from hidden_size)."""


_BERT_LIKE = dict(embeddings="embeddings", layers="encoder.layer",
                  query="attention.self.query", key="attention.self.key",
                  value="attention.self.value", attention_output="attention.output.dense",
                  ffn_in="intermediate.dense", ffn_out="output.dense")

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in [
    Architecture("bert", **_BERT_LIKE, mlm_head=("cls",),
                 head_weight_prefixes=("cls.predictions.",)),
    Architecture("roberta", **_BERT_LIKE, mlm_head=("lm_head",),
                 head_weight_prefixes=("lm_head.",)),
    Architecture("electra", **_BERT_LIKE,
                 mlm_head=("generator_predictions", "generator_lm_head"),
                 head_weight_prefixes=("generator_lm_head.", "generator_predictions."),
                 embedding_size_key="embedding_size", embeddings_project="embeddings_project",
                 pooler=None),
    Architecture("mpnet", embeddings="embeddings", layers="encoder.layer",
                 query="attention.attn.q", key="attention.attn.k", value="attention.attn.v",
                 attention_output="attention.attn.o", ffn_in="intermediate.dense",
                 ffn_out="output.dense", mlm_head=("lm_head",),
                 head_weight_prefixes=("lm_head.",),
                 position_bias=("attention.attn", 2, "position_bias"),
                 shared_head_bias="encoder.relative_attention_bias"),
    Architecture("distilbert", embeddings="embeddings", layers="transformer.layer",
                 query="attention.q_lin", key="attention.k_lin", value="attention.v_lin",
                 attention_output="attention.out_lin", ffn_in="ffn.lin1", ffn_out="ffn.lin2",
                 mlm_head=("vocab_transform", "activation", "vocab_layer_norm",
                           "vocab_projector"),
                 head_weight_prefixes=("vocab_projector.", "vocab_transform."),
                 num_layers_key="n_layers", hidden_size_key="dim", num_heads_key="n_heads",
                 intermediate_size_key="hidden_dim", attention_dropout_key="attention_dropout",
                 hidden_dropout_key="dropout", pooler=None),
]}


class UnsupportedArchitectureError(DistillUserError, ValueError):
    """The model family has no entry in ARCHITECTURES."""


def architecture_of(hf_config) -> Architecture:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported as a teacher/student; supported: "
            f"{', '.join(sorted(ARCHITECTURES))} (add an entry to "
            f"distill_pretrain/architectures.py for another encoder family)")
    return ARCHITECTURES[model_type]


def submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def layer_list(base_model: nn.Module, arch: Architecture) -> nn.ModuleList:
    return base_model.get_submodule(arch.layers)


def apply_mlm_head(mlm_model: nn.Module, arch: Architecture,
                   hidden: torch.Tensor) -> torch.Tensor:
    """(N, hidden) last-layer states -> (N, vocab) logits through the model's own head."""
    out = hidden
    for path in arch.mlm_head:
        out = mlm_model.get_submodule(path)(out)
    return out


def embedding_width(hf_config, arch: Architecture) -> int:
    """Width of the embedding output (ELECTRA may embed narrower than its hidden size)."""
    width = getattr(hf_config, arch.embedding_size_key, None) if arch.embedding_size_key \
        else None
    return width or getattr(hf_config, arch.hidden_size_key)


def dims(hf_config, arch: Architecture) -> tuple[int, int, int]:
    """(layers, hidden size, heads) of a config."""
    return (getattr(hf_config, arch.num_layers_key), getattr(hf_config, arch.hidden_size_key),
            getattr(hf_config, arch.num_heads_key))
