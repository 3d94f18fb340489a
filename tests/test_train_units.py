"""Pieces of the trainer that need no process group: the LR schedule, the DeepSpeed
config, checkpoint selection, RNG capture, the metrics file."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from distill_common.config import ConfigError, load_config
from distill_common.distributed import World
from distill_common.seeding import capture_rng, restore_rng
from distill_common.tracking import Metrics, read_metrics
from distill_pretrain import checkpoint as ckpt
from distill_pretrain.engine import deepspeed_config, lr_multiplier, resolve_precision
from distill_pretrain.train_config import TrainConfig


def cfg(**kw) -> TrainConfig:
    return load_config(TrainConfig, None, [f"{k}={v}" for k, v in kw.items()])


def test_lr_schedule_warmup_then_linear_or_cosine_decay():
    linear = cfg(max_steps=110, warmup_steps=10, lr_decay="linear", min_lr_ratio=0.1)
    assert lr_multiplier(0, linear) == pytest.approx(0.1)
    assert lr_multiplier(9, linear) == pytest.approx(1.0)
    assert lr_multiplier(60, linear) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(110, linear) == pytest.approx(0.1)
    cosine = cfg(max_steps=100, lr_decay="cosine")
    assert lr_multiplier(0, cosine) == pytest.approx(1.0)
    assert lr_multiplier(50, cosine) == pytest.approx(0.5)
    assert lr_multiplier(100, cosine) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(70, cfg(lr_decay="constant")) == 1.0


def test_deepspeed_config_follows_the_recipe():
    ds = deepspeed_config(cfg(zero_stage=3, micro_batch_size=4, grad_accum_steps=2,
                              grad_clip=0.5), world_size=8, precision="bf16", on_gpu=True)
    assert ds["train_batch_size"] == 64 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    assert not ds["fp16"]["enabled"] and "optimizer" not in ds  # client torch AdamW
    offload = deepspeed_config(cfg(zero_stage=2, offload_optimizer="cpu"), 1, "fp32", False)
    # ZeRO-Offload refuses a client optimizer: DeepSpeed's own AdamW is configured.
    assert offload["optimizer"]["type"] == "AdamW"
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_config_checks_name_the_field():
    with pytest.raises(ConfigError, match="offload_params.*zero_stage 3"):
        cfg(zero_stage=2, offload_params="cpu")
    with pytest.raises(ConfigError, match="zero_stage"):
        cfg(zero_stage=4)
    with pytest.raises(ConfigError, match="mask_replace_prob"):
        cfg(mask_replace_prob=0.95, mask_random_prob=0.1)


def test_precision_auto_is_fp32_on_cpu_and_fp16_needs_a_gpu():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"  # DISTILL_CPU_BF16=1 (conftest)
    with pytest.raises(RuntimeError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cpu)


def test_bf16_on_a_cpu_without_native_bf16_trains_in_fp32(monkeypatch, caplog):
    from distill_common import distributed
    from distill_pretrain import engine

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not distributed.cpu_has_native_bf16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert distributed.cpu_has_native_bf16()
    cpu = torch.device("cpu")
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    monkeypatch.delenv(engine.CPU_BF16_ENV, raising=False)
    with caplog.at_level("WARNING", logger="distill_pretrain.engine"):
        assert resolve_precision("bf16", cpu) == "fp32"
    assert "no native bf16" in caplog.text and "train.precision=fp32" in caplog.text
    assert resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setenv(engine.CPU_BF16_ENV, "1")
    assert resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    monkeypatch.delenv(engine.CPU_BF16_ENV)
    assert resolve_precision("bf16", cpu) == "bf16"


def test_resume_candidates_are_complete_checkpoints_newest_first(tmp_path):
    root = ckpt.checkpoints_root(tmp_path)
    for step, complete in ((4, True), (8, True), (12, False)):  # 12: crashed mid-save
        folder = root / ckpt.tag_for(step)
        folder.mkdir(parents=True)
        if complete:
            (folder / ckpt.COMPLETE).write_text("{}")
    assert ckpt.candidates(tmp_path, "auto") == [root / "step-00000008", root / "step-00000004"]
    assert ckpt.candidates(tmp_path, "never") == []
    assert ckpt.candidates(tmp_path / "nothing", "auto") == []
    with pytest.raises(ckpt.CheckpointUserError, match="interrupted"):
        ckpt.candidates(tmp_path, str(root / "step-00000012"))


def test_prune_keeps_the_newest_and_drops_interrupted_saves(tmp_path):
    root = ckpt.checkpoints_root(tmp_path)
    for name in ("step-00000004", "step-00000008", "step-00000020"):
        (root / name).mkdir(parents=True)
        (root / name / ckpt.COMPLETE).write_text("{}")
    (root / ".tmp-step-00000016-beef").mkdir()  # a save killed half-way
    saver = ckpt.Checkpointer(None, World(), tmp_path, keep_last=2, record={})
    saver._prune(root / "step-00000020")
    assert sorted(p.name for p in root.iterdir()) == ["step-00000008", "step-00000020"]


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = capture_rng()
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    torch.save({"rng": state}, tmp_path / "rank-00000.pt")
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    loaded = torch.load(tmp_path / "rank-00000.pt", weights_only=True)
    restore_rng(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_metrics_file_keeps_one_curve_after_a_resume(tmp_path):
    m = Metrics(tmp_path, enabled=True, max_steps=10, tensorboard=False)
    for step in range(1, 8):
        m.log(step, {"train/total": 10.0 - step})
    m.close()
    resumed = Metrics(tmp_path, enabled=True, max_steps=10, tensorboard=False, start_step=4)
    for step in range(5, 11):
        resumed.log(step, {"train/total": 20.0 - step, "train/grad_norm": float("nan")})
    resumed.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 11))
    assert records[4]["train/total"] == 15.0 and records[4]["train/grad_norm"] == "nan"
    json.dumps(records)  # plain JSON throughout
    assert not Metrics(tmp_path / "other", enabled=False, max_steps=1).path.parent.exists()
