"""Building the student: same family and vocabulary as the teacher, a tied MLM head, and
either chosen teacher layers copied in or a fresh initialisation (any width)."""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
from torch import nn

from distill_pretrain.architectures import Architecture, dims, layer_list
from distill_pretrain.config import RecipeValidationError, StudentConfig

log = logging.getLogger(__name__)


def default_teacher_layers(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Evenly spaced from the first to the last teacher layer (1-based): 6 of 12 ->
    1,3,5,8,10,12, which is DistilBERT's every-other-layer choice."""
    if num_student_layers == 1:
        return [num_teacher_layers]
    step = (num_teacher_layers - 1) / (num_student_layers - 1)
    return [1 + int(round(i * step)) for i in range(num_student_layers)]


def student_dims(cfg: StudentConfig, teacher_config, arch: Architecture) -> dict[str, int]:
    """The student's layers, hidden size, heads and feed-forward size, defaults filled."""
    _, t_hidden, t_heads = dims(teacher_config, arch)
    t_inter = getattr(teacher_config, arch.intermediate_size_key)
    hidden = cfg.hidden_size or t_hidden
    if cfg.num_heads is not None:
        heads = cfg.num_heads
    elif hidden == t_hidden:
        heads = t_heads
    else:
        heads = max(1, hidden // 64)
    inter = cfg.intermediate_size or int(round(hidden * t_inter / t_hidden))
    return {"num_layers": cfg.num_layers, "hidden_size": hidden, "num_heads": heads,
            "intermediate_size": inter}


def copies_teacher_layers(cfg: StudentConfig, teacher_config, arch: Architecture) -> bool:
    """Whether the student is initialised from teacher layers (see StudentConfig.init)."""
    if cfg.init == "random":
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
    if arch.model_type == "electra" and d["hidden_size"] != dims(teacher_config, arch)[1]:
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


def chosen_teacher_layers(cfg: StudentConfig, teacher_config, arch: Architecture
                          ) -> Optional[list[int]]:
    """Teacher layers (1-based) copied into the student, or None when none are."""
    if not copies_teacher_layers(cfg, teacher_config, arch):
        return None
    return cfg.teacher_layers or default_teacher_layers(cfg.num_layers,
                                                        dims(teacher_config, arch)[0])


def init_record(cfg: StudentConfig, teacher_config, arch: Architecture,
                teacher_has_mlm_head: bool) -> dict:
    """How build_student initialises the student (kept in the run's record so that the
    export knows which parts started from the teacher)."""
    emb_mode = embedding_init_mode(cfg, teacher_config, arch)
    layers = chosen_teacher_layers(cfg, teacher_config, arch)
    return {"teacher_layers": layers, "embeddings": emb_mode,
            "mlm_head": "teacher" if layers and teacher_has_mlm_head and emb_mode == "copy"
            else "fresh"}


def build_student(cfg: StudentConfig, teacher, seed: int = 0) -> nn.Module:
    """A masked-LM model of the teacher's family (``AutoModelForMaskedLM``-loadable),
    its MLM head tied to the input embeddings; teacher layers and embeddings copied in
    per ``cfg``. The global RNG is left untouched (initialisation uses ``seed``)."""
    from transformers import AutoModelForMaskedLM

    from distill_pretrain.validate import check_student

    arch = teacher.arch
    check_student(cfg, teacher.config, arch, teacher.path)
    conf = student_hf_config(cfg, teacher.config, arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = AutoModelForMaskedLM.from_config(conf)
    student.to(dtype=torch.float32)
    teacher_base, student_base = teacher.base, student.base_model
    emb_mode = embedding_init_mode(cfg, teacher.config, arch)
    _init_embeddings(student_base.get_submodule(arch.embeddings),
                     teacher_base.get_submodule(arch.embeddings), emb_mode,
                     arch.word_embeddings)
    chosen = chosen_teacher_layers(cfg, teacher.config, arch)
    if chosen:
        if max(chosen) > teacher.num_layers:
            raise RecipeValidationError(
                f"student.teacher_layers: {chosen} needs teacher layer {max(chosen)} but "
                f"the teacher was loaded with {teacher.num_layers} layers")
        t_layers, s_layers = layer_list(teacher_base, arch), layer_list(student_base, arch)
        with torch.no_grad():
            for s_index, t_number in enumerate(chosen):
                s_layers[s_index].load_state_dict(t_layers[t_number - 1].state_dict())
        if init_record(cfg, teacher.config, arch, teacher.has_mlm_head)["mlm_head"] == \
                "teacher":
            _copy_mlm_head(student, teacher.model, arch)
        log.info("student: layers copied from teacher layers %s", chosen)
    _ensure_tied(student)
    student.train()
    return student


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
