"""Building the student: same family and vocabulary as the teacher, a tied MLM head, and
either chosen teacher layers copied in or a fresh initialisation (any width)."""

from __future__ import annotations

import copy
import logging
from typing import Iterable, Optional

import torch
from torch import nn

from distill_common.seeding import shared_seed
from distill_pretrain.architectures import Architecture, dims, embedding_width, layer_list
from distill_pretrain.config import RecipeValidationError, StudentConfig, fail
from distill_pretrain.layer_map import default_teacher_layers

log = logging.getLogger(__name__)


def student_dims(cfg: StudentConfig, teacher_config, arch: Architecture) -> dict[str, int]:
    """The student's layers, hidden size, heads and feed-forward size, defaults filled."""
    _, t_hidden, t_heads = dims(teacher_config, arch)
    t_inter = getattr(teacher_config, arch.intermediate_size_key)
    hidden = cfg.hidden_size or t_hidden
    if cfg.num_heads is not None:
        heads = cfg.num_heads
    elif hidden % (t_hidden // t_heads) == 0:
        heads = hidden // (t_hidden // t_heads)  # the teacher's head size, whatever the init
    else:
        heads = max(1, hidden // 64)
    inter = cfg.intermediate_size or int(round(hidden * t_inter / t_hidden))
    return {"num_layers": cfg.num_layers, "hidden_size": hidden, "num_heads": heads,
            "intermediate_size": inter}


def copies_teacher_layers(cfg: StudentConfig, teacher_config, arch: Architecture) -> bool:
    """Whether the student is initialised from teacher layers (see StudentConfig.init)."""
    if cfg.init in ("random", "pruned"):
        return False
    if cfg.init == "teacher_layers":
        return True
    d = student_dims(cfg, teacher_config, arch)
    t_layers, t_hidden, t_heads = dims(teacher_config, arch)
    return (d["hidden_size"] == t_hidden and d["num_heads"] == t_heads
            and d["intermediate_size"] == getattr(teacher_config, arch.intermediate_size_key)
            and (cfg.num_layers <= t_layers or cfg.teacher_layers is not None))


def embedding_init_mode(cfg: StudentConfig, teacher_config, arch: Architecture) -> str:
    if cfg.embedding_init != "auto":
        return cfg.embedding_init
    same_width = student_dims(cfg, teacher_config, arch)["hidden_size"] == \
        dims(teacher_config, arch)[1]
    return "copy" if same_width else "svd"


def student_hf_config(cfg: StudentConfig, teacher_config, arch: Architecture):
    """The student's Hugging Face config: the teacher's, resized, masked-LM, tied."""
    d = student_dims(cfg, teacher_config, arch)
    conf = copy.deepcopy(teacher_config)
    setattr(conf, arch.num_layers_key, d["num_layers"])
    setattr(conf, arch.hidden_size_key, d["hidden_size"])
    setattr(conf, arch.num_heads_key, d["num_heads"])
    setattr(conf, arch.intermediate_size_key, d["intermediate_size"])
    t_hidden = dims(teacher_config, arch)[1]
    projected = embedding_width(teacher_config, arch) != t_hidden
    if arch.model_type == "electra" and d["hidden_size"] != t_hidden and \
            not (cfg.init == "pruned" and projected):  # pruning keeps projected embeddings
        conf.embedding_size = d["hidden_size"]
    if cfg.attention_dropout is not None:
        setattr(conf, arch.attention_dropout_key, cfg.attention_dropout)
    if cfg.hidden_dropout is not None:
        setattr(conf, arch.hidden_dropout_key, cfg.hidden_dropout)
    conf.tie_word_embeddings = True
    conf.architectures = None
    conf.name_or_path = ""
    return conf


def svd_projection(word_embeddings: torch.Tensor, width: int) -> torch.Tensor:
    """(teacher_width, width): the top right-singular directions of the teacher's token
    embeddings E, so E @ P is E's best rank-``width`` approximation in student space.
    Taken from the eigenvectors of E^T E (teacher_width^2, cheap for any vocabulary),
    which also gives a full basis when the vocabulary is smaller than ``width``."""
    e = word_embeddings.double()
    eigenvalues, eigenvectors = torch.linalg.eigh(e.T @ e)  # ascending
    order = eigenvalues.argsort(descending=True)[:width]
    chosen = eigenvectors[:, order]
    # An eigenvector's sign is arbitrary: fix it (largest entry positive) so that the
    # export, which recomputes P to carry the teacher's pooler over, gets the same basis.
    signs = chosen.gather(0, chosen.abs().argmax(0, keepdim=True)).sign()
    return (chosen * signs).float()


@torch.no_grad()
def _init_embeddings(student_emb: nn.Module, teacher_emb: nn.Module, mode: str,
                     word_path: str) -> None:
    if mode == "random":
        return
    if mode == "copy":
        student_emb.load_state_dict(teacher_emb.state_dict())
        return
    teacher_word = teacher_emb.get_submodule(word_path).weight
    width = student_emb.get_submodule(word_path).weight.shape[1]
    projection = svd_projection(teacher_word, width)
    for name, t_mod in teacher_emb.named_modules():
        if isinstance(t_mod, nn.Embedding):
            s_mod = student_emb.get_submodule(name)
            s_mod.weight.copy_((t_mod.weight.float() @ projection).to(s_mod.weight.dtype))


def build_student(cfg: StudentConfig, teacher, seed: int = 0, *,
                  calibration: Optional[Iterable[dict]] = None, world=None) -> nn.Module:
    """A masked-LM model of the teacher's family (``AutoModelForMaskedLM``-loadable),
    its MLM head tied to the input embeddings; teacher layers and embeddings copied in
    per ``cfg``, or the student pruned out of the teacher (``init: pruned``, measured on
    ``calibration``: contract-2 batches of the training shards, on ``world``'s rank 0).
    Every generator is left as it was (initialisation uses ``seed`` on the CPU generator
    alone, see distill_common.seeding.shared_seed)."""
    return initialise_student(cfg, teacher, seed, calibration=calibration, world=world)[0]


def initialise_student(cfg: StudentConfig, teacher, seed: int = 0, *,
                       calibration: Optional[Iterable[dict]] = None,
                       world=None) -> tuple[nn.Module, dict]:
    """``build_student`` and a summary of how the student was initialised (init.json)."""
    from transformers import AutoModelForMaskedLM

    arch = teacher.arch
    check_student(cfg, teacher.config, arch, teacher.path)
    conf = student_hf_config(cfg, teacher.config, arch)
    with shared_seed(seed):  # every rank builds the same student; rank streams untouched
        student = AutoModelForMaskedLM.from_config(conf)
    student.to(dtype=torch.float32)
    if cfg.init == "pruned":
        from distill_pretrain.prune import prune_into

        shape = student_dims(cfg, teacher.config, arch)
        record = {"init": "pruned", "embeddings": "pruned",
                  **prune_into(student, cfg, shape, teacher, calibration, world),
                  "mlm_head": "teacher" if teacher.has_mlm_head else "fresh"}
    else:
        record = _copy_from_teacher(student, cfg, teacher)
    _ensure_tied(student)
    student.train()
    return student, record


def _copy_from_teacher(student: nn.Module, cfg: StudentConfig, teacher) -> dict:
    """Embeddings (copy / SVD) and, when the shape allows, chosen teacher layers."""
    arch = teacher.arch
    teacher_base, student_base = teacher.base, student.base_model
    emb_mode = embedding_init_mode(cfg, teacher.config, arch)
    _init_embeddings(student_base.get_submodule(arch.embeddings),
                     teacher_base.get_submodule(arch.embeddings), emb_mode,
                     arch.word_embeddings)
    # "embeddings" is what the export reads to carry the teacher's pooler over
    record = {"init": "random", "embedding_init": emb_mode, "embeddings": emb_mode,
              "mlm_head": "fresh", "teacher_layers": None}
    if copies_teacher_layers(cfg, teacher.config, arch):
        chosen = cfg.teacher_layers or default_teacher_layers(cfg.num_layers,
                                                              teacher.total_layers)
        if max(chosen) > teacher.num_layers:
            raise RecipeValidationError(
                f"student.teacher_layers: {chosen} needs teacher layer {max(chosen)} but "
                f"the teacher was loaded with {teacher.num_layers} layers")
        t_layers, s_layers = layer_list(teacher_base, arch), layer_list(student_base, arch)
        with torch.no_grad():
            for s_index, t_number in enumerate(chosen):
                s_layers[s_index].load_state_dict(t_layers[t_number - 1].state_dict())
        if teacher.has_mlm_head and emb_mode == "copy":
            _copy_mlm_head(student, teacher.model, arch)
            record["mlm_head"] = "teacher"
        log.info("student: layers copied from teacher layers %s", chosen)
        record.update(init="teacher_layers", teacher_layers=chosen, layers={
            "selection": "teacher_layers" if cfg.teacher_layers else "even",
            "teacher_layers": chosen})
    return record


@torch.no_grad()
def _copy_mlm_head(student: nn.Module, teacher_model: nn.Module, arch: Architecture) -> None:
    # The decoder weight is tied to the (already copied) word embeddings on both sides;
    # copying the head's state dict rewrites it with the same values.
    for path in arch.mlm_head:
        student.get_submodule(path).load_state_dict(teacher_model.get_submodule(path)
                                                    .state_dict())


def _ensure_tied(student: nn.Module) -> None:
    out, inp = student.get_output_embeddings(), student.get_input_embeddings()
    if out.weight is not inp.weight:
        student.tie_weights()
    if student.get_output_embeddings().weight is not student.get_input_embeddings().weight:
        raise RuntimeError(f"{type(student).__name__}: MLM decoder is not tied to the input "
                           f"embeddings")


# --- checks ------------------------------------------------------------------------------


def check_student(cfg: StudentConfig, teacher_config, arch, teacher_folder) -> None:
    """The student can be built from this teacher."""
    d = student_dims(cfg, teacher_config, arch)
    if cfg.init == "pruned":
        from distill_pretrain.prune import check_prunable

        check_prunable(cfg, d, teacher_config, arch, teacher_folder)
        return
    t_layers, t_hidden, t_heads = dims(teacher_config, arch)
    t_inter = getattr(teacher_config, arch.intermediate_size_key)
    if d["hidden_size"] % d["num_heads"]:
        fail("student.num_heads", f"{d['num_heads']} heads do not divide hidden_size="
                                   f"{d['hidden_size']}; set student.num_heads to a divisor")
    if copies_teacher_layers(cfg, teacher_config, arch):
        same = (d["hidden_size"], d["num_heads"], d["intermediate_size"]) == \
            (t_hidden, t_heads, t_inter)
        if not same:
            fail("student.init", f"teacher_layers copies teacher layers, which needs the "
                                  f"teacher's shape (hidden {t_hidden}, heads {t_heads}, "
                                  f"intermediate {t_inter}; {teacher_folder}), got "
                                  f"{d['hidden_size']}/{d['num_heads']}/"
                                  f"{d['intermediate_size']}; use init=random for a "
                                  f"narrower student")
        if cfg.teacher_layers is not None:
            bad = [k for k in cfg.teacher_layers if not 1 <= k <= t_layers]
            if bad:
                fail("student.teacher_layers", f"layers {bad} are outside 1..{t_layers} "
                                                f"(the teacher {teacher_folder})")
        if cfg.num_layers > t_layers:
            fail("student.num_layers", f"{cfg.num_layers} layers cannot be copied from a "
                                        f"{t_layers}-layer teacher; use init=random")
    elif cfg.teacher_layers is not None:
        fail("student.teacher_layers", "is set, but the student is not initialised from "
                                        "teacher layers (its shape differs from the "
                                        "teacher's); drop it or set init=teacher_layers")
    mode = embedding_init_mode(cfg, teacher_config, arch)
    if mode == "copy" and d["hidden_size"] != t_hidden:
        fail("student.embedding_init", f"copy needs the teacher's width {t_hidden}, the "
                                        f"student has {d['hidden_size']}; use svd or random")
    if mode == "svd" and d["hidden_size"] > t_hidden:
        fail("student.embedding_init", f"svd gives at most the teacher's width {t_hidden}, "
                                        f"the student has {d['hidden_size']}; use random")
