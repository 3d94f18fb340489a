"""`distill export` and the automatic export at the end of `distill pretrain`: a plain
Hugging Face folder that AutoModel / AutoModelForMaskedLM load and that scores the
validation shards exactly as the trained (DeepSpeed-wrapped) module did."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from test_train import assets, curve, run, write_recipe  # noqa: F401  (fixture)


def recompute_eval(model_dir: Path, shards: Path, *, seed: int, batch_size: int,
                   world_size: int = 1) -> tuple[float, float]:
    """(MLM accuracy, sample-weighted mean of per-batch MLM loss) of an exported folder on
    the validation batches the trainer built (same masking seed, same per-rank split)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from distill_common import manifest as M
    from distill_pretrain.masking import build_masker
    from distill_pretrain.stream import validation_batches

    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    manifest = M.load_manifest(str(shards))
    masker = build_masker(tok, manifest)
    correct = count = loss_sum = samples = 0.0
    with torch.no_grad():
        for rank in range(world_size):
            for batch in validation_batches(M.shard_urls(str(shards), manifest, "validation"),
                                              seq_len=manifest["seq_len"],
                                              batch_size=batch_size, masker=masker, seed=seed,
                                              rank=rank, world_size=world_size):
                out = model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"], labels=batch["labels"])
                sel = batch["labels"] != -100
                correct += (out.logits.argmax(-1)[sel] == batch["labels"][sel]).sum().item()
                count += sel.sum().item()
                n = batch["input_ids"].shape[0]
                loss_sum += out.loss.item() * n
                samples += n
    return correct / count, loss_sum / samples


def check_exported(model_dir: Path, out: Path, shards: Path, *, world_size: int,
                   batch_size: int = 8) -> None:
    """The exported folder is the trained student: with a trained MLM head it scores the
    validation shards as the run's last evaluation did; without one (no objective trained
    it, so it is not exported) its encoder gives the checkpoint's hidden states."""
    from transformers import AutoModel, AutoModelForMaskedLM

    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (model_dir / name).is_file(), name
    from safetensors.torch import load_file
    dtypes = {str(t.dtype) for t in load_file(model_dir / "model.safetensors").values()}
    assert dtypes == {"torch.float32"}, f"export must be fp32 whatever the training precision: {dtypes}"
    base = AutoModel.from_pretrained(model_dir)
    assert type(base).__name__ == "BertModel" and base.config.num_hidden_layers == 2
    final_step = max(curve(out))
    card = (model_dir / "README.md").read_text()
    assert "distilled task-agnostically from" in card and f"- {final_step} steps" in card
    assert str(out) not in card, "the card names a local path"
    head = json.loads((model_dir / "distill_run.json").read_text())["export"]["mlm_head"]
    if head == "none":
        _same_hidden_states(base, out / "pretrain")
        assert "pipeline_tag: fill-mask" not in card
        return
    mlm = AutoModelForMaskedLM.from_pretrained(model_dir)
    assert mlm.get_output_embeddings().weight is mlm.get_input_embeddings().weight
    accuracy, mlm_loss = recompute_eval(model_dir, shards, seed=0, batch_size=batch_size,
                                        world_size=world_size)
    assert accuracy == pytest.approx(curve(out, "eval/mlm_accuracy")[final_step], abs=1e-9)
    if world_size == 1:
        assert mlm_loss == pytest.approx(curve(out, "eval/mlm_loss")[final_step], rel=1e-4)
    assert "eval/mlm_accuracy" in card and "pipeline_tag: fill-mask" in card


def _same_hidden_states(base, pretrain_dir: Path) -> None:
    """The consolidated checkpoint (every rank's partitions) and the export agree."""
    from distill_pretrain.export import load_student, resolve_checkpoint

    trained = load_student(resolve_checkpoint(pretrain_dir)).base_model.eval()
    ids = torch.randint(5, base.config.vocab_size, (3, 16), generator=torch.Generator()
                        .manual_seed(0))
    with torch.no_grad():
        want = trained(input_ids=ids).last_hidden_state
        got = base.eval()(input_ids=ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.slow
def test_single_process_run_exports_and_distill_export_matches(tmp_path, assets):
    from safetensors.torch import load_file

    from distill_cli.main import main

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", assets, out, max_steps=6, eval_every=3,
                          save_every=3)
    proc = run([sys.executable, "-m", "distill_cli", "pretrain", str(recipe),
                "train.zero_stage=0", "train.num_workers=0"], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"student: {out / 'student'}" in proc.stdout
    check_exported(out / "student", out, assets["shards"], world_size=1)
    info = json.loads((out / "student" / "distill_run.json").read_text())
    assert info["step"] == 6 and info["manifest"]["splits"]["train"]["samples"] == 95

    # `distill export` from the run folder (newest checkpoint) gives the same weights.
    assert main(["export", str(out / "pretrain"), str(tmp_path / "again")]) == 0
    want = load_file(out / "student" / "model.safetensors")
    got = load_file(tmp_path / "again" / "model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_export_refuses_a_folder_without_checkpoint(tmp_path, capsys):
    from distill_cli.main import main

    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_bf16_run_exports_fp32_weights(tmp_path, assets):
    """A bf16 run's student is exported in fp32: fine-tuning then keeps fp32 master
    weights, and the report measures every model at the same precision."""
    from safetensors.torch import load_file

    from finetune.loading import load_encoder

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", assets, out, max_steps=2, eval_every=0,
                          save_every=0)
    proc = run([sys.executable, "-m", "distill_cli", "pretrain", str(recipe),
                "train.zero_stage=0", "train.num_workers=0", "train.precision=bf16"],
               timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = load_file(out / "student" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert json.loads((out / "student" / "config.json").read_text())["dtype"] == "float32"
    assert {p.dtype for p in load_encoder(out / "student").parameters()} == {torch.float32}
