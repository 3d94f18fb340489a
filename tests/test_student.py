"""Student construction: exact copies of the chosen teacher layers, tied MLM head,
Hugging Face round trip, narrower students with SVD embeddings, reproducible init."""

from __future__ import annotations

import pytest
import torch

from distill_pretrain.architectures import layer_list
from distill_pretrain.config import StudentConfig, TeacherConfig
from distill_pretrain.student import build_student, default_teacher_layers, student_dims
from distill_pretrain.teacher import load_teacher


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_teacher(TeacherConfig(path=str(tiny_teacher_dir)))


@pytest.fixture(scope="module")
def headless_teacher(tiny_teacher_nohead_dir):
    return load_teacher(TeacherConfig(path=str(tiny_teacher_nohead_dir)))


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_default_layers_are_evenly_spaced_like_distilbert():
    assert default_teacher_layers(6, 12) == [1, 3, 5, 8, 10, 12]
    assert default_teacher_layers(2, 4) == [1, 4]
    assert default_teacher_layers(1, 6) == [6]
    assert default_teacher_layers(4, 4) == [1, 2, 3, 4]


@pytest.mark.parametrize("chosen", [None, [3, 2]])
def test_student_copies_exactly_the_chosen_layers(teacher, chosen):
    student = build_student(StudentConfig(num_layers=2, teacher_layers=chosen), teacher)
    expected = chosen or [1, 4]
    t_layers = layer_list(teacher.base, teacher.arch)
    s_layers = layer_list(student.base_model, teacher.arch)
    assert len(s_layers) == 2
    for s_index, t_number in enumerate(expected):
        assert _same_state(s_layers[s_index], t_layers[t_number - 1])
    # and not some other layer
    others = [k for k in range(1, 5) if k != expected[0]]
    assert not any(_same_state(s_layers[0], t_layers[k - 1]) for k in others)
    assert _same_state(student.base_model.embeddings, teacher.base.embeddings)
    assert _same_state(student.cls, teacher.model.cls)  # trained head copied too
    assert student.training


def test_student_head_is_tied_and_round_trips(teacher, tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM

    student = build_student(StudentConfig(num_layers=2), teacher)
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    student.save_pretrained(tmp_path / "s")
    again = AutoModelForMaskedLM.from_pretrained(tmp_path / "s").eval()
    student.eval()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, student(input_ids=ids).logits)
    base = AutoModel.from_pretrained(tmp_path / "s")
    assert base.config.num_hidden_layers == 2


def test_narrow_student_fresh_with_svd_embeddings(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)  # a 100-token teacher, so rank 32 is a real truncation
    BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=128)
                    ).save_pretrained(tmp_path / "t")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "t")
    teacher = load_teacher(TeacherConfig(path=str(tmp_path / "t")))
    cfg = StudentConfig(num_layers=2, hidden_size=32, num_heads=4)
    student = build_student(cfg, teacher)
    assert student_dims(cfg, teacher.config, teacher.arch) == {
        "num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64}
    t_emb, s_emb = teacher.base.embeddings, student.base_model.embeddings
    t_word, s_word = t_emb.word_embeddings.weight, s_emb.word_embeddings.weight.detach()
    assert s_word.shape == (100, 32)
    # E P P^T E^T with P the top-32 right singular vectors: sign-free check of the SVD.
    _, _, vh = torch.linalg.svd(t_word.double(), full_matrices=False)
    projector = (vh[:32].T @ vh[:32]).float()
    torch.testing.assert_close(s_word @ s_word.T, t_word @ projector @ t_word.T,
                               atol=1e-5, rtol=1e-4)
    # position embeddings go through the same projection
    t_pos, s_pos = t_emb.position_embeddings.weight, s_emb.position_embeddings.weight.detach()
    torch.testing.assert_close(s_pos @ s_word.T, t_pos @ projector @ t_word.T,
                               atol=1e-5, rtol=1e-4)
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight


@pytest.mark.parametrize("init", ["random", "pruned", "auto"])
def test_default_heads_keep_the_teacher_head_size_whatever_the_init(init):
    """A narrower student with num_heads unset gets the teacher's head size whether it is
    pruned or random, so a from-scratch baseline has the pruned student's shape (it had
    hidden // 64 heads: 3 for a 224-wide student of a 32-wide-head teacher, which do not
    divide 224); a width the teacher's head size does not divide falls back to
    hidden_size // 64 heads (refused later when they do not divide it either)."""
    from transformers import BertConfig

    from distill_pretrain.architectures import architecture_of

    config = BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536)
    arch = architecture_of(config)
    heads = {hidden: student_dims(StudentConfig(num_layers=3, hidden_size=hidden,
                                                init=init), config, arch)["num_heads"]
             for hidden in (384, 256, 224, 200)}
    assert heads == {384: 12, 256: 8, 224: 7, 200: 3}
    assert student_dims(StudentConfig(num_layers=3, hidden_size=256, num_heads=4,
                                      init=init), config, arch)["num_heads"] == 4


def test_headless_teacher_gives_fresh_tied_head(headless_teacher):
    student = build_student(StudentConfig(num_layers=2), headless_teacher)
    assert type(student).__name__ == "BertForMaskedLM"
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    assert _same_state(layer_list(student.base_model, headless_teacher.arch)[1],
                       layer_list(headless_teacher.base, headless_teacher.arch)[3])


def test_random_init_is_reproducible_and_leaves_global_rng(teacher):
    cfg = StudentConfig(num_layers=2, init="random", embedding_init="random")
    state = torch.random.get_rng_state()
    a = build_student(cfg, teacher, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_student(cfg, teacher, seed=3)
    c = build_student(cfg, teacher, seed=4)
    assert _same_state(a, b)
    assert not _same_state(a, c)
    assert not _same_state(layer_list(a.base_model, teacher.arch)[0],
                           layer_list(teacher.base, teacher.arch)[0])


def test_dropout_overrides(teacher):
    student = build_student(StudentConfig(num_layers=1, attention_dropout=0.0,
                                          hidden_dropout=0.05), teacher)
    assert student.config.attention_probs_dropout_prob == 0.0
    assert student.config.hidden_dropout_prob == 0.05
