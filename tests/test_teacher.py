"""Teacher loading (frozen, MLM head read from the weights), capture of Q/K/V and hidden
states by hooks for every family in the table, and truncation."""

from __future__ import annotations

import json

import pytest
import torch

from distill_pretrain.architectures import ARCHITECTURES, layer_list
from distill_pretrain.capture import CapturePlan, capture, truncated
from distill_pretrain.config import TeacherConfig
from distill_pretrain.losses import attention_scores, MASKED_SCORE
from distill_pretrain.teacher import has_mlm_head, load_teacher


def _tiny_config(model_type: str):
    from transformers import AutoConfig

    common = dict(vocab_size=50, max_position_embeddings=64, pad_token_id=1)
    if model_type == "distilbert":
        return AutoConfig.for_model("distilbert", dim=32, n_layers=3, n_heads=4,
                                    hidden_dim=64, **common)
    extra = {"embedding_size": 16} if model_type == "electra" else {}  # narrower: projected
    return AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=3,
                                num_attention_heads=4, intermediate_size=64, **extra,
                                **common)


def save_tiny_family(folder, model_type: str, tokenizer_dir, with_head=True, seed=0):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    torch.manual_seed(seed)
    cfg = _tiny_config(model_type)
    model = (AutoModelForMaskedLM if with_head else AutoModel).from_config(cfg)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def _batch(vocab_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def test_teacher_with_head_is_frozen_masked_lm(tiny_teacher_dir):
    teacher = load_teacher(TeacherConfig(path=str(tiny_teacher_dir)))
    assert teacher.has_mlm_head
    assert type(teacher.model).__name__ == "BertForMaskedLM"
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert teacher.num_layers == teacher.total_layers == 4
    assert teacher.path == tiny_teacher_dir


def test_headless_teacher_detected_from_weights_not_config(tiny_teacher_nohead_dir,
                                                           tmp_path):
    teacher = load_teacher(TeacherConfig(path=str(tiny_teacher_nohead_dir)))
    assert not teacher.has_mlm_head
    assert type(teacher.model).__name__ == "BertModel"
    # A config that claims a masked-LM class does not make the weights hold a head.
    import shutil

    lying = tmp_path / "lying"
    shutil.copytree(tiny_teacher_nohead_dir, lying)
    cfg = json.loads((lying / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (lying / "config.json").write_text(json.dumps(cfg))
    assert not has_mlm_head(lying, ARCHITECTURES["bert"])
    assert not load_teacher(TeacherConfig(path=str(lying))).has_mlm_head


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_hooks_rebuild_each_familys_attention(model_type, tmp_path, tokenizer_dir):
    """Q/K (and MPNet's position bias) captured through the table rebuild the attention
    probabilities the model computes itself (eager attention, output_attentions)."""
    from transformers import AutoModelForMaskedLM

    folder = save_tiny_family(tmp_path / model_type, model_type, tokenizer_dir)
    teacher = load_teacher(TeacherConfig(path=str(folder)))
    assert teacher.has_mlm_head, model_type
    ids, mask = _batch(50)
    plan = CapturePlan.build(hidden_layers=[0, 2, 3], qkv={"query": [2], "key": [2],
                                                             "value": [2]})
    with torch.no_grad(), capture(teacher.base, teacher.arch, plan) as cap:
        out = teacher.base(input_ids=ids, attention_mask=mask)
    assert set(cap.hidden) == {0, 2, 3} and set(cap.query) == {2}
    assert cap.value[2].shape == (2, 9, 32)
    torch.testing.assert_close(cap.hidden[3], out.last_hidden_state)

    eager = AutoModelForMaskedLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = eager(input_ids=ids, attention_mask=mask, output_attentions=True,
                    output_hidden_states=True)
    scores = attention_scores(cap.query[2], cap.key[2], 4, cap.position_bias.get(2))
    probs = scores.masked_fill(~mask.bool()[:, None, None, :], MASKED_SCORE).softmax(-1)
    real = mask.bool()
    torch.testing.assert_close(probs[0], ref.attentions[1][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probs[1][:, real[1]][:, :, real[1]],
                               ref.attentions[1][1][:, real[1]][:, :, real[1]],
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cap.hidden[2], ref.hidden_states[2], atol=1e-5, rtol=1e-4)
    if model_type == "mpnet":
        assert 2 in cap.position_bias  # without it the rebuilt scores would differ


def test_truncation_gives_the_same_layer_outputs(tiny_teacher_dir):
    teacher = load_teacher(TeacherConfig(path=str(tiny_teacher_dir)))
    ids, mask = _batch(teacher.config.vocab_size)
    plan = CapturePlan.build(hidden_layers=[2], qkv={"value": [2]})
    with torch.no_grad(), capture(teacher.base, teacher.arch, plan) as full:
        teacher.base(input_ids=ids, attention_mask=mask)
    calls = []
    hook = layer_list(teacher.base, teacher.arch)[3].register_forward_hook(
        lambda *a: calls.append(1))
    with torch.no_grad(), truncated(teacher.base, teacher.arch, 2), \
            capture(teacher.base, teacher.arch, plan) as cut:
        out = teacher.base(input_ids=ids, attention_mask=mask)
    hook.remove()
    assert calls == []  # layer 4 did not run
    assert len(layer_list(teacher.base, teacher.arch)) == 4  # restored
    torch.testing.assert_close(cut.hidden[2], full.hidden[2])
    torch.testing.assert_close(out.last_hidden_state, full.hidden[2])
    torch.testing.assert_close(cut.value[2], full.value[2])

    short = load_teacher(TeacherConfig(path=str(tiny_teacher_dir)), up_to_layer=2)
    assert short.num_layers == 2 and len(layer_list(short.base, short.arch)) == 2
    with torch.no_grad():
        out2 = short.base(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out2.last_hidden_state, full.hidden[2])


def test_teacher_dtype_from_config(tiny_teacher_nohead_dir):
    teacher = load_teacher(TeacherConfig(path=str(tiny_teacher_nohead_dir), dtype="bfloat16"))
    assert next(teacher.model.parameters()).dtype == torch.bfloat16
