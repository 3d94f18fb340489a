"""bench/probe.py, the quality benchmark's frozen-feature probe: a sentence task is
probed on mean-pooled features, a token task per word (the first sub-word's hidden
state), each scored with the task's own metric; both learn a separable task from a tiny
random encoder's frozen features well above chance."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from test_finetune_train import (classification_rows, finetune_cfg, save_tiny_bert,
                                 token_rows, write_task)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("probe_encoder"))


def test_token_task_is_probed_per_word(tmp_path, encoder_dir):
    import pandas as pd

    from probe import _features, _predicted, _targets, probe, probe_data

    pd.DataFrame(token_rows(240)).to_parquet(tmp_path / "ner.parquet")
    task = write_task(tmp_path, "ner", "name: ner\ntype: token_classification\n"
                                       "source: {path: ner.parquet}\n"
                                       "columns: {text: tokens, label: ner_tags}\n")
    data, hp = probe_data(str(task), finetune_cfg("max_train_examples=150"))
    assert len(data.train) == 150  # the fine-tuning's capped subset
    from finetune.loading import load_encoder, load_tokenizer
    encoder, tok = load_encoder(encoder_dir), load_tokenizer(encoder_dir, data.task)
    x, split = _features(encoder, tok, data, data.train, hp)
    y = _targets(data, data.train, split)
    assert x.shape == (sum(len(ex.text) for ex in data.train), 64) and len(y) == len(x)
    assert _predicted(data, split, y) == [ex.label for ex in data.train]  # row order
    result = probe(str(encoder_dir), (data, hp), c_grid=(0.1, 1.0), max_token_rows=500)
    assert result["rows"] == 500  # a seeded subset of the training words
    assert result["test"] > 0.8  # most words are O: the heads and tails must be found too
    assert result["validation"] > 0.8


def test_sentence_task_is_probed_on_pooled_features(tmp_path, encoder_dir):
    import pandas as pd

    from probe import probe, probe_data

    pd.DataFrame(classification_rows(300)).to_csv(tmp_path / "topics.csv", index=False)
    task = write_task(tmp_path, "topics", "name: topics\nsource: {path: topics.csv}\n"
                                          "columns: {text: sentence, label: topic}\n")
    data, hp = probe_data(str(task), finetune_cfg())
    result = probe(str(encoder_dir), (data, hp), c_grid=(0.1, 1.0))
    assert result["rows"] == len(data.train)  # one row per example
    assert result["test"] > 0.6  # chance is 1/3


def test_a_layer_is_probed_as_the_encoder_cut_there(tmp_path, encoder_dir, capsys):
    """layer=k reads the hidden states after layer k: the features of the encoder cut to
    its first k layers; the last layer is the default; a layer it lacks is refused; the
    command line prints one JSON line per model with every task and layer."""
    import json

    import numpy as np
    import pandas as pd
    import torch

    from finetune.loading import load_encoder, load_tokenizer
    from probe import _features, main, probe, probe_data

    pd.DataFrame(classification_rows(120)).to_csv(tmp_path / "topics.csv", index=False)
    task = write_task(tmp_path, "topics", "name: topics\nsource: {path: topics.csv}\n"
                                          "columns: {text: sentence, label: topic}\n")
    data, hp = probe_data(str(task), finetune_cfg())
    encoder, tok = load_encoder(encoder_dir), load_tokenizer(encoder_dir, data.task)
    depth = encoder.config.num_hidden_layers
    assert depth >= 2
    last, _ = _features(encoder, tok, data, data.train[:20], hp)
    assert np.allclose(_features(encoder, tok, data, data.train[:20], hp, depth)[0], last)
    first, _ = _features(encoder, tok, data, data.train[:20], hp, 1)
    cut = load_encoder(encoder_dir)
    cut.encoder.layer = torch.nn.ModuleList(list(cut.encoder.layer)[:1])
    cut.config.num_hidden_layers = 1
    assert np.allclose(_features(cut, tok, data, data.train[:20], hp)[0], first, atol=1e-6)
    assert not np.allclose(first, last)
    with pytest.raises(ValueError, match=f"has layers 1..{depth}"):
        probe(str(encoder_dir), (data, hp), layer=depth + 1)

    assert main([str(encoder_dir), "--tasks", str(task), "--layers", f"0,{depth}",
                 "--max-train", "60"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["bench"] == "probe" and line["max_train"] == 60
    scores = line["tasks"][str(task)]
    assert set(scores) == {"0", str(depth)} and scores[str(depth)]["rows"] == 60
