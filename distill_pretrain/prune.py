"""`student.init: pruned`: the student is cut out of the teacher by structured pruning
(Minitron, Muralidharan et al., 2024, here for encoders and task-agnostic), keeping what
matters most on a calibration sample of the training shards (``importance.py``):

- layers: the ``num_layers`` with the highest block importance (``layer_selection:
  importance``), evenly spaced ones (``even``), or ``teacher_layers``; among teacher
  layers 1..``prune_depth`` when the objective runs a truncated teacher;
- hidden channels: one kept set for the embeddings, every LayerNorm, every projection's
  input and output and the MLM head (whose decoder is tied to the embeddings);
- heads, per layer (MPNet: one set for all layers, as its relative attention bias is
  shared), and FFN neurons, per layer.

Head size is the teacher's unless ``student.num_heads`` asks otherwise: narrower heads
keep each kept head's most important query/key and value channels ("truncated"); wider
ones (a multiple) concatenate several teacher heads ("merged", their scores summed). The
query is rescaled so scores keep the teacher's scale.

Importance is measured on rank 0 and its plan broadcast, so every rank builds the same
student whatever floating-point noise the ranks' hardware adds.

``d`` below is the student's shape, ``student.student_dims`` (num_layers, hidden_size,
num_heads, intermediate_size), computed by the caller (this module sits below
student.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

from distill_pretrain.architectures import dims, embedding_width
from distill_pretrain.config import StudentConfig, fail
from distill_pretrain.importance import Importance, measure_importance
from distill_pretrain.layer_map import default_teacher_layers

log = logging.getLogger(__name__)

TEACHER_CHANNELS_KEY = "distill_teacher_hidden_channels"
"""Attribute of a width-pruned student's Hugging Face config (saved in config.json): the
teacher hidden channel each of its channels was cut from. objective.hidden_cosine
compares the student's channel j with the teacher's channel j of this list."""


def kept_channels(teacher_hidden: torch.Tensor, channels: Optional[list[int]]) -> torch.Tensor:
    """(..., teacher width) -> (..., len(channels)): the channels a pruned student kept
    (all of them when ``channels`` is None)."""
    return teacher_hidden if channels is None else teacher_hidden[..., channels]


def teacher_channels_of(student_config, teacher_width: int) -> Optional[list[int]]:
    """The teacher channels a narrower pruned student kept, else None."""
    channels = getattr(student_config, TEACHER_CHANNELS_KEY, None)
    return channels if channels is not None and len(channels) < teacher_width else None


@dataclass(frozen=True)
class HeadLayout:
    """How the student's heads are formed from the teacher's."""
    mode: str
    """kept (the teacher's head size) | truncated (narrower) | merged (a multiple)."""
    heads: int
    head_size: int
    teacher_head_size: int

    @property
    def teacher_heads_per_head(self) -> int:
        return self.head_size // self.teacher_head_size if self.mode == "merged" else 1


def head_layout(hidden: int, heads: int, teacher_hidden: int, teacher_heads: int) -> HeadLayout:
    """The layout for a student of ``hidden`` width and ``heads`` heads; raises
    RecipeValidationError when the teacher's heads cannot form them."""
    t_size = teacher_hidden // teacher_heads
    if hidden % heads:
        fail("student.num_heads", f"{heads} heads do not divide hidden_size={hidden}; with "
                                  f"init=pruned leave num_heads unset to keep the teacher's "
                                  f"head size {t_size} (then hidden_size must be a multiple "
                                  f"of {t_size})")
    size = hidden // heads
    mode = "kept" if size == t_size else "truncated" if size < t_size else "merged"
    if mode == "merged" and size % t_size:
        fail("student.num_heads", f"head size {size} (hidden_size {hidden} / {heads} heads) "
                                  f"is wider than the teacher's {t_size} but not a multiple "
                                  f"of it; use a head size of {t_size}, a multiple of it, or "
                                  f"a smaller one")
    layout = HeadLayout(mode, heads, size, t_size)
    if heads * layout.teacher_heads_per_head > teacher_heads:
        fail("student.num_heads", f"{heads} heads of size {size} need "
                                  f"{heads * layout.teacher_heads_per_head} teacher heads, the "
                                  f"teacher has {teacher_heads}; use fewer or wider heads")
    return layout


def check_prunable(cfg: StudentConfig, d: dict, teacher_config, arch,
                   teacher_folder) -> None:
    """The recipe's student (of ``d``: its shape) can be cut out of this teacher
    (config.json only)."""
    t_layers, t_hidden, t_heads = dims(teacher_config, arch)
    t_inter = getattr(teacher_config, arch.intermediate_size_key)
    where = f"the teacher {teacher_folder}"
    if cfg.num_layers > t_layers:
        fail("student.num_layers", f"{cfg.num_layers} layers cannot be cut out of {where} "
                                   f"({t_layers} layers); use at most {t_layers}")
    for key, value, limit in (("hidden_size", d["hidden_size"], t_hidden),
                              ("intermediate_size", d["intermediate_size"], t_inter)):
        if value > limit:
            fail(f"student.{key}", f"{value} is wider than {where} ({limit}); pruning only "
                                   f"removes: use at most {limit}, or init=random")
    bad = [k for k in cfg.teacher_layers or [] if not 1 <= k <= t_layers]
    if bad:
        fail("student.teacher_layers", f"layers {bad} are outside 1..{t_layers} ({where})")
    if (cfg.prune_depth or 0) > t_layers:
        fail("student.prune_depth", f"{cfg.prune_depth} is deeper than {where} "
                                    f"({t_layers} layers)")
    head_layout(d["hidden_size"], d["num_heads"], t_hidden, t_heads)
    if cfg.embedding_init != "auto":
        fail("student.embedding_init", f"{cfg.embedding_init} is not used with init=pruned "
                                       f"(the embeddings keep the pruned hidden channels); "
                                       f"drop it")
    if getattr(teacher_config, "sinusoidal_pos_embds", False) and d["hidden_size"] != t_hidden:
        fail("student.hidden_size", f"{where} has fixed sinusoidal position embeddings, "
                                    f"which a narrower width cannot keep; keep hidden_size="
                                    f"{t_hidden} or use init=random")


@dataclass
class PrunePlan:
    """What the student keeps of the teacher: teacher indices, 0-based (layers 1-based)."""
    layers: list[int]
    """Teacher layer each student layer is cut from."""
    hidden: list[int]
    """Kept hidden channels, ascending."""
    embedding: list[int]
    """Kept embedding channels: the hidden ones, or all when the teacher's embeddings are
    narrower than its hidden states and projected (ELECTRA)."""
    head_groups: list[list[list[int]]]
    """[student layer][student head] -> the teacher heads it is formed from."""
    query_key: list[list[int]]
    """[student layer] teacher query/key channels in student order (heads * head_size)."""
    value: list[list[int]]
    """[student layer] teacher value channels = attention output projection inputs."""
    ffn: list[list[int]]
    """[student layer] kept FFN neurons, ascending."""
    query_scale: float
    """Multiplies the query so attention scores keep the teacher's scale."""


def top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` highest scores, ascending (ties: the lower index first)."""
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return sorted(order.tolist())


def choose_layers(cfg: StudentConfig, block_importance: torch.Tensor) -> tuple[list[int], str]:
    """(teacher layers 1-based, how they were chosen)."""
    if cfg.teacher_layers is not None:
        return list(cfg.teacher_layers), "teacher_layers"
    depth = cfg.prune_depth or len(block_importance)
    if (cfg.layer_selection or "importance") == "even":
        return default_teacher_layers(cfg.num_layers, depth), "even"
    return [k + 1 for k in top(block_importance[:depth], cfg.num_layers)], "importance"


def _head_groups(scores: torch.Tensor, layout: HeadLayout) -> list[list[int]]:
    per = layout.teacher_heads_per_head
    used = top(scores, layout.heads * per)
    return [used[j * per:(j + 1) * per] for j in range(layout.heads)]


def _channels(groups: list[list[int]], scores: torch.Tensor, layout: HeadLayout) -> list[int]:
    """Teacher channels of each student head in order; ``scores`` (heads * head_size,)
    choose the channels inside a head when heads are truncated."""
    size = layout.teacher_head_size
    out = []
    for group in groups:
        for h in group:
            inside = range(size) if layout.mode != "truncated" else \
                top(scores[h * size:(h + 1) * size], layout.head_size)
            out += [h * size + c for c in inside]
    return out


def plan_pruning(cfg: StudentConfig, d: dict, teacher,
                 importance: Importance) -> tuple[PrunePlan, dict]:
    """The plan for a student of shape ``d`` and a summary of how it was chosen."""
    layout = head_layout(d["hidden_size"], d["num_heads"], teacher.hidden_size,
                         teacher.num_heads)
    layers, selection = choose_layers(cfg, importance.layers)
    hidden = top(importance.hidden, d["hidden_size"])
    width = embedding_width(teacher.config, teacher.arch)
    embedding = hidden if width == teacher.hidden_size else list(range(width))
    rows = [k - 1 for k in layers]
    shared = _head_groups(importance.heads[rows].sum(0), layout) \
        if teacher.arch.shared_head_bias else None
    groups = [shared or _head_groups(importance.heads[r], layout) for r in rows]
    plan = PrunePlan(
        layers=layers, hidden=hidden, embedding=embedding, head_groups=groups,
        query_key=[_channels(g, importance.query_key[r], layout) for g, r in zip(groups, rows)],
        value=[_channels(g, importance.value[r], layout) for g, r in zip(groups, rows)],
        ffn=[top(importance.ffn[r], d["intermediate_size"]) for r in rows],
        query_scale=math.sqrt(layout.head_size / layout.teacher_head_size))
    return plan, plan_summary(plan, importance, layout, selection)


def _share(scores: torch.Tensor, kept: list[int]) -> float:
    """Fraction of the total importance held by the kept indices."""
    return round(float(scores[kept].sum() / scores.sum().clamp_min(1e-30)), 4)


def _rounded(t: torch.Tensor) -> list:
    return [round(float(v), 5) for v in t] if t.dim() == 1 else [_rounded(r) for r in t]


def plan_summary(plan: PrunePlan, importance: Importance, layout: HeadLayout,
                 selection: str) -> dict:
    """What was kept and why, as plain JSON values."""
    rows = [k - 1 for k in plan.layers]
    return {
        "layers": {"selection": selection, "teacher_layers": plan.layers,
                   "block_importance": _rounded(importance.layers)},
        "hidden": {"kept": len(plan.hidden), "of": len(importance.hidden),
                   "importance_kept": _share(importance.hidden, plan.hidden),
                   "channels": plan.hidden},
        "embedding": {"kept": len(plan.embedding)},
        "heads": {"formed": layout.mode, "heads": layout.heads, "head_size": layout.head_size,
                  "teacher_head_size": layout.teacher_head_size,
                  "shared_across_layers": len({str(g) for g in plan.head_groups}) == 1,
                  "teacher_heads": plan.head_groups if layout.mode == "merged"
                  else [sum(groups, []) for groups in plan.head_groups],
                  "importance_kept": [_share(importance.heads[r], sum(g, []))
                                      for r, g in zip(rows, plan.head_groups)],
                  "importance": _rounded(importance.heads)},
        "ffn": {"kept_per_layer": [len(f) for f in plan.ffn], "of": importance.ffn.shape[1],
                "importance_kept": [_share(importance.ffn[r], f)
                                    for r, f in zip(rows, plan.ffn)]},
        "calibration": {"sequences": importance.sequences, "tokens": importance.tokens},
    }


def _plan_on_rank_zero(cfg: StudentConfig, d: dict, teacher, calibration,
                       world) -> tuple[PrunePlan, dict]:
    """Rank 0 measures and plans; every rank gets its plan (or its error, so that no rank
    waits for a plan that never comes). ``world``: a distill_common.distributed.World,
    or None for one process."""
    result, error = None, None
    if world is None or world.is_main:
        try:
            result = plan_pruning(cfg, d, teacher, measure_importance(teacher, calibration))
        except Exception as err:  # noqa: BLE001 - re-raised below, after the broadcast
            error = err
    message = None if error is None else str(error)
    if world is not None:
        result, message = world.broadcast_object((result, message))
    if error is not None:
        raise error
    if message is not None:
        fail("student.init", f"pruned: rank 0 could not measure the teacher's importance: "
                             f"{message}")
    return result


def prune_into(student, cfg: StudentConfig, d: dict, teacher, calibration,
               world=None) -> dict:
    """Fill ``student`` (a masked-LM model of shape ``d``) with the teacher's kept parts,
    chosen on ``calibration`` (an iterable of contract-2 batches) on ``world``'s rank 0;
    returns the summary of what was kept."""
    from distill_pretrain.prune_slice import copy_pruned_weights

    if calibration is None:
        fail("student.init", "pruned measures the teacher on a calibration sample of the "
                             "training shards, and none was given: set train.data_dir (or "
                             "prep.output_dir) to the shards of `distill prep`")
    plan, summary = _plan_on_rank_zero(cfg, d, teacher, calibration, world)
    copy_pruned_weights(student, teacher, plan)
    if len(plan.hidden) < teacher.hidden_size:
        setattr(student.config, TEACHER_CHANNELS_KEY, plan.hidden)
    heads = summary["heads"]
    log.info("student pruned from the teacher: layers %s (%s), hidden %d/%d channels "
             "(%.0f%% of their importance), %d heads of size %d per layer (%s from the "
             "teacher's heads of size %d), FFN %s/%d neurons", plan.layers,
             summary["layers"]["selection"], len(plan.hidden), summary["hidden"]["of"],
             100 * summary["hidden"]["importance_kept"], heads["heads"], heads["head_size"],
             heads["formed"], heads["teacher_head_size"], summary["ffn"]["kept_per_layer"],
             summary["ffn"]["of"])
    return summary
