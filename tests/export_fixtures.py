"""Teachers in the shapes the export meets (sentence-transformers models in the 6.x and
the older layout, a teacher with an MLM head) and checkpoints of students built from
them by the real build_student, written in the layout `distill pretrain` writes for
ZeRO stage 0 (tests/test_export.py covers the DeepSpeed-written ones end to end)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# An objective that never trains the MLM head (MiniLM: attention and value relations).
MINILM = {"attention_kl": {"weight": 1.0}, "value_relation_kl": {"weight": 1.0}}

LEGACY_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize",
     "type": "sentence_transformers.models.Normalize"},
]


def save_st_teacher(folder: Path, tokenizer_dir: Path, legacy: bool) -> Path:
    """A 4 x 64 BertModel with a trained-looking pooler, mean pooling and normalisation,
    and a README whose front matter gives its license. ``legacy``: the files as
    all-MiniLM-L6-v2 ships them (2.x format, no 2_Normalize folder); else saved by the
    installed sentence-transformers (6.x format)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=4,
                     num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    src = folder if legacy else folder.with_name(folder.name + "-src")
    BertModel(cfg).save_pretrained(src)
    tok.save_pretrained(src)
    if legacy:
        (folder / "modules.json").write_text(json.dumps(LEGACY_MODULES, indent=2))
        (folder / "sentence_bert_config.json").write_text(
            '{"max_seq_length": 256, "do_lower_case": false}')
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": 64, "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False}))
    else:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.base.modules import Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling

        SentenceTransformer(modules=[Transformer(str(src)), Pooling(64, "mean"), Normalize()],
                            device="cpu").save(str(folder))
    (folder / "README.md").write_text("---\nlicense: mit\nlibrary_name: sentence-transformers"
                                      "\n---\n\n# A tiny sentence encoder\n")
    return folder


def write_checkpoint(out: Path, teacher_spec: str, *, student: dict, objective: dict,
                     sources: list[dict] | None = None) -> Path:
    """A finished run's checkpoint (train.output_dir ``out``): the student build_student
    makes from the teacher, its weights nudged as training would, the run record."""
    from distill_common.config import load_config, to_dict
    from distill_common.fsio import sha256_file
    from distill_pretrain.checkpoint import COMPLETE
    from distill_pretrain.student import initialise_student
    from distill_pretrain.teacher import load_teacher
    from launcher.recipe import Recipe

    overrides = [f"teacher.path={teacher_spec}", f"output_dir={out}"] + \
        [f"student.{k}={json.dumps(v)}" for k, v in student.items()] + \
        [f"objective.{k}={json.dumps(v)}" for k, v in objective.items()]
    recipe = load_config(Recipe, None, overrides)
    teacher = load_teacher(recipe.teacher)
    model, student_init = initialise_student(recipe.student, teacher, seed=0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    folder = out / "checkpoints" / "step-00000003"
    hf = folder / "hf"
    hf.mkdir(parents=True)
    torch.save({"module": {f"student.{k}": v for k, v in model.state_dict().items()}},
               folder / "mp_rank_00_model_states.pt")
    model.config.save_pretrained(hf)
    teacher.tokenizer.save_pretrained(hf)
    sources = sources if sources is not None else [
        {"source": "wiki_summaries", "files": ["/data/x/summaries.json"], "documents": 10033}]
    run_info = {
        "recipe": to_dict(recipe),
        "manifest": {"tokenizer": str(teacher.path), "seq_len": 32, "sources": sources,
                     "splits": {"train": {"samples": 96, "tokens": 3072, "shards": 4},
                                "validation": {"samples": 20, "tokens": 640, "shards": 1}}},
        "teacher": {"path": str(teacher.path), "layers": teacher.total_layers,
                    "hidden_size": teacher.hidden_size, "has_mlm_head": teacher.has_mlm_head},
        "student_init": student_init,
        "precision": "fp32", "world_size": 1, "step": 3, "skipped_steps": 0, "samples": 24,
        "tokens": 768, "final_eval": {"eval/mlm_accuracy": 0.125, "eval/agreement": 0.5}}
    (hf / "run_info.json").write_text(json.dumps(run_info))
    files = {str(p.relative_to(folder)): sha256_file(p) for p in folder.rglob("*") if p.is_file()}
    (folder / COMPLETE).write_text(json.dumps({"step": 3, "world_size": 1, "files": files}))
    return out
