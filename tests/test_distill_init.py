"""The calibration sample of the shards and `distill init RECIPE OUT`: the student as
pretraining would start it (pruned, teacher layers, random) as a loadable Hugging Face
folder with init.json; and `distill pretrain` starting from a pruned student on 2 ranks.
Tiny teacher (4 x 64, 4 heads, FFN 128, MLM head) and tiny shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_common import manifest as shards
from distill_pretrain.data import decode_ids, read_shard
from distill_pretrain.calibration import CalibrationSample, calibration_for
from distill_pretrain.config import StudentConfig, TeacherConfig
from test_train import assets  # noqa: F401 - the fixture: tiny teacher, tokenizer, shards


def _shard_of_each_sequence(folder: Path) -> dict[tuple, int]:
    manifest = shards.load_manifest(str(folder))
    out = {}
    for number, url in enumerate(shards.shard_urls(str(folder), manifest, "train")):
        for key, payload in read_shard(url):
            out[tuple(decode_ids(payload, url, key, 32).tolist())] = number
    return out


def _rows(sample) -> list[tuple]:
    rows = []
    for batch in sample:
        assert (batch["labels"] == -100).all()  # unmasked: importance reads natural text
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            rows.append(tuple(ids[mask.bool()].tolist()))
    return rows


def test_calibration_sample_is_seeded_unmasked_and_spread_over_shards(assets):
    sample = CalibrationSample(str(assets["shards"]), num_samples=20, seed=0, batch_size=8)
    rows = _rows(sample)
    assert len(rows) == 20 and [len(b["input_ids"]) for b in sample] == [8, 8, 4]
    assert rows == _rows(sample)  # read again: the same sequences
    where = _shard_of_each_sequence(assets["shards"])
    assert {where[r] for r in rows} == {0, 1, 2, 3}  # 5 from each of the 4 shards
    other = _rows(CalibrationSample(str(assets["shards"]), num_samples=20, seed=1))
    assert sorted(other) == sorted(rows)  # 5 of each shard are the first 5 either way...
    assert other != rows  # ...taken in another shard order
    few = _rows(CalibrationSample(str(assets["shards"]), num_samples=6, seed=0))
    assert len({where[r] for r in few}) == 4 and len(few) == 6  # 2, 2, 1, 1
    # More than the shards hold: everything once, and a warning, not an endless loop.
    assert len(_rows(CalibrationSample(str(assets["shards"]), num_samples=500, seed=0))) == 95


def test_calibration_sample_is_full_when_a_shard_is_shorter_than_its_share(assets, tmp_path):
    """A split's last shard is often short (the real corpus's holds 5 sequences): the
    shards after it, then a second pass, make up its share."""
    import shutil
    import tarfile

    folder = tmp_path / "shards"
    shutil.copytree(assets["shards"], folder)
    short = folder / "train" / "shard-000000.tar"
    with tarfile.open(short) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})[:3]
    with tarfile.open(short, "w") as tar:
        for member, data in members:
            if member.name.split(".")[0] in keys:
                tar.addfile(member, __import__("io").BytesIO(data))
    where = _shard_of_each_sequence(folder)
    for seed in (0, 1, 2):
        rows = _rows(CalibrationSample(str(folder), num_samples=60, seed=seed))
        assert len(rows) == len(set(rows)) == 60  # none twice
        counts = [sum(where[r] == n for r in rows) for n in range(4)]
        assert counts[0] == 3 and min(counts[1:]) >= 15, counts  # each its share, 15


def test_calibration_only_for_pruned_students(assets):
    assert calibration_for(StudentConfig(init="teacher_layers"), str(assets["shards"]), 0) \
        is None
    sample = calibration_for(StudentConfig(init="pruned", calibration_samples=7),
                             str(assets["shards"]), 4)
    assert sample == CalibrationSample(str(assets["shards"]), 7, 4)


def write_recipe(path: Path, assets: dict, student: str, data_dir: Path | None = None) -> Path:
    lines = ["name: tiny-init", f"output_dir: {path.parent / 'run'}",
             f"teacher: {{path: {assets['teacher']}}}", f"student: {{{student}}}",
             "objective:", "  qkv_relation_kl: {weight: 1.0, relation_heads: 16}",
             "  mlm: {weight: 1.0}"]
    if data_dir is not None:
        lines += ["train:", f"  data_dir: {data_dir}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _load_both(folder: Path):
    from transformers import AutoModel, AutoModelForMaskedLM

    ids = torch.tensor([[2, 10, 11, 12, 3]])
    for cls in (AutoModel, AutoModelForMaskedLM):
        model = cls.from_pretrained(folder).eval()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert torch.isfinite(out[0]).all()
    return model


def test_distill_init_writes_the_pruned_student_and_what_it_kept(assets, tmp_path, capsys):
    from distill_cli.main import main
    from distill_pretrain.student import build_student
    from distill_pretrain.teacher import load_teacher

    student = "num_layers: 2, hidden_size: 48, init: pruned, calibration_samples: 40"
    recipe = write_recipe(tmp_path / "r.yaml", assets, student, assets["shards"])
    out = tmp_path / "init"
    assert main(["init", str(recipe), str(out)]) == 0
    assert "pruned, 2 x 48, 3 heads, FFN 96" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "init.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "init.json").read_text())
    assert record["init"] == "pruned" and record["mlm_head"] == "teacher"
    assert record["teacher"]["hidden_size"] == 64 and record["student"]["hidden_size"] == 48
    assert len(record["layers"]["teacher_layers"]) == 2
    assert len(record["layers"]["block_importance"]) == 4
    assert record["heads"]["formed"] == "kept" and record["heads"]["head_size"] == 16
    assert [len(g) for g in record["heads"]["teacher_heads"]] == [3, 3]
    assert record["ffn"]["kept_per_layer"] == [96, 96] and record["ffn"]["of"] == 128
    assert len(record["hidden"]["channels"]) == 48 and record["hidden"]["of"] == 64
    assert 0.75 < record["hidden"]["importance_kept"] <= 1.0
    assert record["calibration"]["sequences"] == 40
    loaded = _load_both(out)
    # The folder holds exactly the student pretraining would start from.
    cfg = StudentConfig(num_layers=2, hidden_size=48, init="pruned", calibration_samples=40)
    expected = build_student(cfg, load_teacher(TeacherConfig(path=str(assets["teacher"]))),
                             calibration=calibration_for(cfg, str(assets["shards"]), 0))
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.state_dict().items())


def test_distill_init_of_teacher_layers_and_random_students(assets, tmp_path):
    from distill_cli.main import main

    recipe = write_recipe(tmp_path / "r.yaml", assets, "num_layers: 2, init: teacher_layers")
    assert main(["init", str(recipe), str(tmp_path / "b")]) == 0
    record = json.loads((tmp_path / "b" / "init.json").read_text())
    assert record["init"] == "teacher_layers" and record["layers"]["teacher_layers"] == [1, 4]
    assert record["embedding_init"] == "copy" and record["mlm_head"] == "teacher"
    _load_both(tmp_path / "b")
    assert main(["init", str(recipe), str(tmp_path / "c"), "student.init=random",
                 "student.hidden_size=32"]) == 0
    record = json.loads((tmp_path / "c" / "init.json").read_text())
    assert record["init"] == "random" and record["embedding_init"] == "svd"
    assert record["student"]["hidden_size"] == 32
    _load_both(tmp_path / "c")


def test_distill_init_errors_are_one_clean_line(assets, tmp_path, capsys):
    from distill_cli.main import main

    recipe = write_recipe(tmp_path / "r.yaml", assets, "num_layers: 2, init: pruned",
                          tmp_path / "no-shards")
    assert main(["init", str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "manifest" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    wide = write_recipe(tmp_path / "w.yaml", assets, "num_layers: 2, hidden_size: 96, "
                                                     "init: pruned", assets["shards"])
    assert main(["init", str(wide), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: student.hidden_size: 96 is wider")


@pytest.mark.slow
def test_pretrain_starts_from_a_pruned_student_on_two_ranks(assets, tmp_path):
    from test_train import _check_ok, curve, run, torchrun_cmd
    from test_train import write_recipe as write_train_recipe

    relations = ["  qkv_relation_kl: {weight: 1.0, relation_heads: 16}",
                 "  mlm: {weight: 1.0}"]
    recipe = write_train_recipe(tmp_path / "r.yaml", assets, tmp_path, objective=relations,
                                init="pruned, hidden_size: 48, calibration_samples: 32",
                                max_steps=4, eval_every=4, save_every=4)
    proc = run(torchrun_cmd(recipe, "train.zero_stage=2"))
    _check_ok(proc)
    assert "student pruned from the teacher" in proc.stderr
    assert sorted(curve(tmp_path)) == [1, 2, 3, 4]
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["hidden_size"] == 48 and config["num_attention_heads"] == 3
    assert np.isfinite(list(curve(tmp_path).values())).all()


# The offline assets' shapes (config.json of all-mpnet-base-v2 and all-MiniLM-L6-v2).
MPNET_BASE = dict(model_type="mpnet", hidden_size=768, num_hidden_layers=12,
                  num_attention_heads=12, intermediate_size=3072, vocab_size=30527,
                  max_position_embeddings=514, relative_attention_num_buckets=32)
MINILM_L6 = dict(model_type="bert", hidden_size=384, num_hidden_layers=6,
                 num_attention_heads=12, intermediate_size=1536, vocab_size=30522)


@pytest.mark.parametrize("name, shape, student", [
    ("mpnet-6x384-pruned", MPNET_BASE, (6, 384, 6, 1536)),
    ("minilm-4x256-pruned", MINILM_L6, (4, 256, 8, 512)),
    ("minilm-3x256-pruned", MINILM_L6, (3, 256, 8, 512)),
    ("minilm-3x224-pruned", MINILM_L6, (3, 224, 7, 384)),
])
def test_shipped_pruned_recipes_fit_their_teachers(name, shape, student, tmp_path):
    """Checked against a stand-in of the asset (its config.json, weights without an MLM
    head): what `distill config validate` checks, without fetching the real model."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from launcher.recipe import load_recipe, validate_recipe
    from distill_pretrain.architectures import architecture_of
    from distill_pretrain.student import student_dims

    config = AutoConfig.for_model(**shape)
    config.save_pretrained(tmp_path)
    save_file({"embeddings.word_embeddings.weight": torch.zeros(1)},
              str(tmp_path / "model.safetensors"))
    recipe = load_recipe(name, [f"teacher.path={tmp_path}"])
    validate_recipe(recipe)
    d = student_dims(recipe.student, config, architecture_of(config))
    assert (d["num_layers"], d["hidden_size"], d["num_heads"], d["intermediate_size"]) == \
        student
    assert recipe.student.init == "pruned" and recipe.objective.hidden_cosine is not None


def test_distill_init_carries_the_teacher_pooler_as_the_export_does(assets, tmp_path):
    """The undistilled baseline starts fine-tuning with the pooler its distilled twin is
    exported with: copied at the teacher's width, cut to the kept channels when pruned
    (else the baseline's classifier reads a random pooler, the distilled one a trained
    one). A headless teacher with a trained pooler, like the real MiniLM and MPNet."""
    from transformers import AutoModel, AutoModelForSequenceClassification, BertModel

    from distill_cli.main import main
    from finetune.loading import pooler_start

    torch.manual_seed(3)
    mlm = AutoModel.from_pretrained(assets["teacher"])
    teacher_dir = tmp_path / "teacher"
    with_pooler = BertModel(mlm.config, add_pooling_layer=True)
    with_pooler.load_state_dict(mlm.state_dict(), strict=False)
    torch.nn.init.normal_(with_pooler.pooler.dense.weight)
    with_pooler.save_pretrained(teacher_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (teacher_dir / name).write_bytes((assets["teacher"] / name).read_bytes())
    pooler = with_pooler.pooler.dense
    local = dict(assets, teacher=teacher_dir)

    recipe = write_recipe(tmp_path / "b.yaml", local, "num_layers: 2, init: teacher_layers")
    assert main(["init", str(recipe), str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "init.json").read_text())["pooler"]["pooler"] == \
        "teacher"
    copied = AutoModel.from_pretrained(tmp_path / "b").pooler.dense
    assert torch.equal(copied.weight, pooler.weight) and torch.equal(copied.bias, pooler.bias)

    student = "num_layers: 2, hidden_size: 48, init: pruned, calibration_samples: 40"
    recipe = write_recipe(tmp_path / "p.yaml", local, student, assets["shards"])
    assert main(["init", str(recipe), str(tmp_path / "p")]) == 0
    record = json.loads((tmp_path / "p" / "init.json").read_text())
    assert record["pooler"]["pooler"] == "teacher_pruned"
    kept = torch.tensor(record["hidden"]["channels"])
    cut = AutoModel.from_pretrained(tmp_path / "p").pooler.dense
    assert torch.equal(cut.weight, pooler.weight[kept][:, kept])
    assert torch.equal(cut.bias, pooler.bias[kept])
    _load_both(tmp_path / "p")  # the masked-LM class still loads (pooler unused there)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "p", num_labels=3, output_loading_info=True)
    assert pooler_start(model, info) == "trained"
