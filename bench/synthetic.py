"""Inputs for the benchmarks that need no download: a BERT-uncased-sized WordPiece
tokenizer, a BERT model of any shape with random weights, Zipf-distributed token rows, and
contract-1 shards of given rows (written by prep's own shard writer).

Speed does not depend on the weights or on which words the ids stand for, only on the
shapes and on how many ids continue a word (whole-word masking), which these match:
30,522 ids of which ~20% are ``##`` pieces, like bert-base-uncased's vocabulary. A GPU
machine without network can run these as it can run the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_tokenizer(folder: Path, vocab_size: int = 30522):
    from transformers import BertTokenizerFast

    pieces = int(0.2 * (vocab_size - len(SPECIALS)))
    words = vocab_size - len(SPECIALS) - pieces
    vocab = SPECIALS + [f"w{i}" for i in range(words)] + [f"##p{i}" for i in range(pieces)]
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True,
                            model_max_length=512)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    return tok


def bert_model(folder: Path, tokenizer, *, layers: int, hidden: int, heads: int,
               intermediate: int | None = None, with_head: bool = True, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=intermediate or 4 * hidden,
                     max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    model = BertForMaskedLM(cfg) if with_head else BertModel(cfg, add_pooling_layer=False)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def zipf_rows(n: int, seq_len: int, tokenizer, seed: int = 0) -> list[np.ndarray]:
    """``n`` sequences CLS ... SEP of ids drawn with p ~ 1 / rank (natural text's
    frequency law), every 16th row shorter, as the last row of a document would be."""
    rng = np.random.default_rng(seed)
    first = len(SPECIALS)
    ranks = np.arange(1, len(tokenizer) - first + 1)
    p = 1.0 / ranks
    p /= p.sum()
    rows = []
    for i in range(n):
        length = seq_len - 2 if i % 16 else int(rng.integers(8, seq_len - 2))
        body = first + rng.choice(len(ranks), size=length, p=p)
        rows.append(np.concatenate(([tokenizer.cls_token_id], body,
                                    [tokenizer.sep_token_id])).astype(np.int64))
    return rows


def write_shards(out: Path, tokenizer, train: list[np.ndarray], validation: list[np.ndarray],
                 seq_len: int, rows_per_shard: int = 1024,
                 name: str = "synthetic") -> Path:
    """Contract-1 shards of the given rows, through prep's own writer."""
    from data_prep.shards import Output, write_shard
    from distill_common.fsio import atomic_write_json, sha256_file
    from distill_common.textnorm import vocab_hash

    output = Output(str(out))
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    splits = {}
    for split, rows in (("train", train), ("validation", validation)):
        (out / split).mkdir(parents=True, exist_ok=True)
        entries = [write_shard(output, f"{split}/shard-{k:06d}.tar", k,
                               rows[start:start + rows_per_shard], "uint16")
                   for k, start in enumerate(range(0, len(rows), rows_per_shard))]
        if split == "train":
            for row in rows:
                np.add.at(counts, row, 1)
        splits[split] = {"samples": len(rows), "tokens": int(sum(len(r) for r in rows)),
                         "shards": entries}
    np.save(out / "token_counts.npy", counts)
    special = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id,
               "pad": tokenizer.pad_token_id, "mask": tokenizer.mask_token_id,
               "unk": tokenizer.unk_token_id}
    atomic_write_json(out / "manifest.json", {
        "format_version": 1,
        "tokenizer": {"name_or_path": name, "vocab_hash": vocab_hash(tokenizer),
                      "vocab_size": len(tokenizer), "class": type(tokenizer).__name__,
                      "special_ids": special},
        "seq_len": seq_len, "dtype": "uint16", "splits": splits,
        "token_counts": {"file": "token_counts.npy",
                         "sha256": sha256_file(out / "token_counts.npy")},
        "sources": [name], "dropped": {}, "documents": {}, "config": {}})
    return out


def dump(record: dict) -> None:
    print(json.dumps(record), flush=True)
