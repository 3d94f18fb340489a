"""What `distill export` writes beside the Transformers files: the heads that are true
(MLM head only when trained or copied; the teacher's pooler carried over or recorded as
fresh), a sentence-transformers layout that `SentenceTransformer` loads and that embeds as
the teacher's modules say, and a model card worth publishing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import conftest
from export_fixtures import MINILM, save_st_teacher, write_checkpoint
from test_hub import COMMIT, hf_home, populate_hub_cache  # noqa: F401  (fixture)

WITH_MLM = {"hidden_mse": {"weight": 1.0}, "mlm": {"weight": 1.0}}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def teacher_pooler(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModel

    return {k: v.detach() for k, v in AutoModel.from_pretrained(folder).pooler.state_dict()
            .items()}


def st_embed(folder: Path, texts: list[str]):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)


def mean_pooled(folder: Path, texts: list[str]) -> torch.Tensor:
    """Mean pooling over real tokens, L2-normalised: what the teacher's modules say."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(folder)(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.fixture
def st_teacher_on_hub(hf_home, tokenizer_dir, tmp_path) -> str:  # noqa: F811
    """A sentence-transformers teacher (6.x layout) in the Hub cache: tiny-org/st-teacher."""
    src = save_st_teacher(tmp_path / "st_teacher", tokenizer_dir, legacy=False)
    populate_hub_cache(hf_home / "hub", "tiny-org/st-teacher", src)
    return "tiny-org/st-teacher"


def test_headless_st_teacher_same_width(tmp_path, st_teacher_on_hub, hf_home):  # noqa: F811
    """MiniLM-style objective (no MLM term): base model class, teacher's pooler copied,
    sentence-transformers layout, card naming the Hub teacher."""
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    from distill_common.assets import resolve_model_dir
    from distill_pretrain.export import export_checkpoint

    teacher_dir = resolve_model_dir(st_teacher_on_hub)
    run = write_checkpoint(tmp_path / "run", st_teacher_on_hub,
                           student={"num_layers": 2, "init": "teacher_layers"},
                           objective=MINILM)
    out = export_checkpoint(run, tmp_path / "student")

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertModel"]
    saved = weights(out)
    assert not any(k.startswith("cls.") for k in saved), "an untrained MLM head was saved"
    want = teacher_pooler(teacher_dir)
    assert torch.equal(saved["pooler.dense.weight"], want["dense.weight"])
    _, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    clf = AutoModelForSequenceClassification.from_pretrained(out, num_labels=3)
    assert torch.equal(clf.bert.pooler.dense.bias.detach(), want["dense.bias"])
    AutoModelForMaskedLM.from_pretrained(out)  # loads; its head is new, as the card says

    texts = conftest.sentences(4, seed=2)
    emb = st_embed(out, texts)
    assert emb.shape == (4, 64)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(emb, mean_pooled(out, texts), atol=1e-5)

    record = json.loads((out / "distill_run.json").read_text())["export"]
    assert (record["mlm_head"], record["pooler"]) == ("none", "teacher")
    assert record["fresh_pooler_only_in_student"] is False
    assert record["sentence_transformers"]["written"] is True

    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "tiny-org/st-teacher" and card.data.license == "mit"
    assert card.data.pipeline_tag == "sentence-similarity"
    assert card.data.library_name == "sentence-transformers"
    assert {"distillation", "attention_kl", "value_relation_kl"} <= set(card.data.tags)
    assert f"revision `{COMMIT[:12]}`" in card.text
    assert "Self-attention distributions" in card.text or "self-attention distributions" in card.text
    assert str(tmp_path) not in card.content and str(hf_home) not in card.content


def test_narrower_student_gets_the_projected_pooler_and_a_trained_mlm_head(
        tmp_path, tokenizer_dir):
    """hidden 32 < 64: SVD embeddings, so the pooler is P^T W P; the MLM head was trained
    (mlm objective) and is saved tied; the legacy sentence-transformers layout is
    carried over at the student's width."""
    from transformers import AutoModel, AutoModelForMaskedLM

    from distill_pretrain.export import export_checkpoint
    from distill_pretrain.student import svd_projection

    teacher_dir = save_st_teacher(tmp_path / "legacy_teacher", tokenizer_dir, legacy=True)
    run = write_checkpoint(tmp_path / "run", str(teacher_dir),
                           student={"num_layers": 2, "hidden_size": 32, "num_heads": 4},
                           objective=WITH_MLM)
    out = export_checkpoint(run, tmp_path / "student")

    mlm, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    assert mlm.get_output_embeddings().weight is mlm.get_input_embeddings().weight
    teacher = AutoModel.from_pretrained(teacher_dir)
    p = svd_projection(teacher.embeddings.word_embeddings.weight.detach(), 32)
    want_w = p.T @ teacher.pooler.dense.weight.detach() @ p
    saved = weights(out)
    assert saved["bert.pooler.dense.weight"].shape == (32, 32)
    assert torch.allclose(saved["bert.pooler.dense.weight"], want_w, atol=1e-5)
    assert torch.allclose(AutoModel.from_pretrained(out).pooler.dense.weight, want_w, atol=1e-5)

    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == 32 and pooling["pooling_mode_mean_tokens"]
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 256
    texts = conftest.sentences(3, seed=4)
    emb = st_embed(out, texts)
    assert emb.shape == (3, 32)
    assert torch.allclose(emb, mean_pooled(out, texts), atol=1e-5)
    record = json.loads((out / "distill_run.json").read_text())["export"]
    assert (record["mlm_head"], record["pooler"]) == ("trained", "teacher_svd")


@pytest.mark.parametrize("objective, head, tag", [
    ({"logit_kl": {"weight": 1.0}}, "trained", "fill-mask"),
    (MINILM, "teacher", "feature-extraction"),
])
def test_teacher_with_mlm_head_and_no_pooler(tmp_path, tiny_teacher_dir, objective, head, tag):
    """The tiny BertForMaskedLM teacher has no pooler weights: both models start
    fine-tuning with a fresh pooler (recorded), none is saved; its head is kept when
    trained (fill-mask) or copied into the student (not trained: feature-extraction)."""
    from huggingface_hub import ModelCard
    from transformers import AutoModelForMaskedLM

    from distill_pretrain.export import export_checkpoint

    run = write_checkpoint(tmp_path / "run", str(tiny_teacher_dir),
                           student={"num_layers": 2, "init": "teacher_layers"},
                           objective=objective)
    out = export_checkpoint(run, tmp_path / "student")
    saved = weights(out)
    assert not any("pooler" in k for k in saved)
    assert any(k.startswith("cls.predictions.transform") for k in saved)
    _, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    record = json.loads((out / "distill_run.json").read_text())["export"]
    assert (record["mlm_head"], record["pooler"], record["teacher_has_pooler"]) == \
        (head, "fresh", False)
    assert record["fresh_pooler_only_in_student"] is False
    assert record["sentence_transformers"] == {"written": False}
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == tag and card.data.library_name == "transformers"
    assert card.data.base_model == tiny_teacher_dir.name


def test_teacher_gone_at_export_is_recorded(tmp_path, tiny_teacher_dir):
    import shutil

    from distill_pretrain.export import export_checkpoint

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    run = write_checkpoint(tmp_path / "run", str(teacher), student={"num_layers": 2},
                           objective=MINILM)
    shutil.rmtree(teacher)
    out = export_checkpoint(run, tmp_path / "student")
    record = json.loads((out / "distill_run.json").read_text())["export"]
    assert record["pooler"] == "fresh" and record["teacher_has_pooler"] is None
    assert record["fresh_pooler_only_in_student"] is True
    assert "not found at export" in (out / "README.md").read_text()




def test_distill_export_onnx_matches_pytorch(tmp_path, tiny_teacher_nohead_dir):
    """`distill export CKPT OUT --onnx-int8`: ONNX Runtime's last hidden state equals
    PyTorch's (fp32, padded batch of another shape than the traced one), and the dynamic
    int8 variant stays close."""
    import onnxruntime as ort
    from transformers import AutoModel, AutoTokenizer

    from distill_cli.main import main

    run = write_checkpoint(tmp_path / "run", str(tiny_teacher_nohead_dir),
                           student={"num_layers": 2}, objective=MINILM)
    out = tmp_path / "student"
    assert main(["export", str(run), str(out), "--onnx-int8"]) == 0
    assert json.loads((out / "distill_run.json").read_text())["export"]["onnx"] == \
        ["onnx/model.onnx", "onnx/model_int8.onnx"]
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(conftest.sentences(3, seed=9) + ["short."], padding=True, return_tensors="np")
    with torch.no_grad():
        want = AutoModel.from_pretrained(out)(**{k: torch.from_numpy(v) for k, v in
                                                 enc.items()}).last_hidden_state.numpy()
    real = enc["attention_mask"].astype(bool)  # padding positions are not compared
    fp32 = ort.InferenceSession(str(out / "onnx" / "model.onnx")).run(None, dict(enc))[0]
    assert fp32.shape == want.shape and abs(fp32 - want)[real].max() < 1e-4
    int8 = ort.InferenceSession(str(out / "onnx" / "model_int8.onnx")).run(None, dict(enc))[0]
    cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(int8[real]),
                                                   torch.from_numpy(want[real]), dim=-1)
    assert cosine.min() > 0.99, cosine.min()
    assert (out / "onnx" / "model_int8.onnx").stat().st_size < \
        (out / "onnx" / "model.onnx").stat().st_size / 2


@pytest.mark.slow
def test_pretrain_from_a_hub_st_teacher_exports_everything(tmp_path, hf_home):  # noqa: F811
    """The chain a user runs: `teacher.path: ORG/NAME` from the Hub cache, a MiniLM-style
    run under DeepSpeed, the automatic export with ONNX: AutoModel, SentenceTransformer
    and ONNX Runtime load the student, and the card names the Hub teacher."""
    import sys

    import onnxruntime as ort

    from test_train import MINILM_STYLE, run, write_recipe
    from test_data_loader import save_wordpiece_tokenizer, write_shards

    tok = save_wordpiece_tokenizer(tmp_path / "tokenizer")
    teacher = save_st_teacher(tmp_path / "teacher", tok, legacy=True)
    populate_hub_cache(hf_home / "hub", "tiny-org/minilm-like", teacher)
    shards = write_shards(tmp_path / "shards", tok, seq_len=32, train_shards=2,
                          samples_per_shard=16, validation_samples=8)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml",
                          {"teacher": "tiny-org/minilm-like", "shards": shards}, out,
                          objective=MINILM_STYLE, max_steps=2, eval_every=0, save_every=0)
    proc = run([sys.executable, "-m", "distill_cli", "pretrain", str(recipe),
                "train.zero_stage=0", "train.num_workers=0", "train.export_onnx=true"],
               timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    student = out / "student"
    texts = conftest.sentences(3, seed=1)
    emb = st_embed(student, texts)
    assert emb.shape == (3, 64) and torch.allclose(emb, mean_pooled(student, texts), atol=1e-5)
    session = ort.InferenceSession(str(student / "onnx" / "model.onnx"))
    assert session.get_outputs()[0].name == "last_hidden_state"
    card = (student / "README.md").read_text()
    assert "base_model: tiny-org/minilm-like" in card and len(card.encode()) < 10_000
    assert "pipeline_tag: sentence-similarity" in card and str(tmp_path) not in card
    record = json.loads((student / "distill_run.json").read_text())["export"]
    assert (record["mlm_head"], record["pooler"]) == ("none", "teacher")


@pytest.mark.parametrize("model_type", ["roberta", "mpnet", "distilbert", "electra"])
def test_each_family_exports_its_base_model_with_the_teachers_pooler(
        model_type, tmp_path, tokenizer_dir):
    """Headless teachers of every family: the base model class is saved, with the
    teacher's pooler where the family has one; AutoModel loads it with nothing missing."""
    from transformers import AutoModel

    from distill_pretrain.export import export_checkpoint
    from test_teacher import save_tiny_family

    teacher = save_tiny_family(tmp_path / "teacher", model_type, tokenizer_dir,
                               with_head=False)
    run = write_checkpoint(tmp_path / "run", str(teacher), student={"num_layers": 2},
                           objective=MINILM)
    out = export_checkpoint(run, tmp_path / "student")
    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and type(model).__name__ == \
        type(AutoModel.from_pretrained(teacher)).__name__
    record = json.loads((out / "distill_run.json").read_text())["export"]
    if model_type in ("roberta", "mpnet"):
        assert record["pooler"] == "teacher"
        want = AutoModel.from_pretrained(teacher).pooler.dense.weight
        assert torch.equal(model.pooler.dense.weight, want)
    else:
        assert record["pooler"] == "none" and not any("pooler" in k for k in weights(out))
