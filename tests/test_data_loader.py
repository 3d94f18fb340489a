"""The shard loader: disjoint reading per rank and worker, exact resume, masking rules,
manifest checks. Shards are written here by a small helper that follows contract 1, so
these tests do not depend on `distill prep`."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_common import manifest as M
from distill_pretrain import data as D
from distill_pretrain import masking as MK
from distill_pretrain import stream as S


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_shards(out: Path, tokenizer_dir: Path, *, seq_len: int = 32,
                 train_shards: int = 4, samples_per_shard: int = 12,
                 validation_samples: int = 10, seed: int = 0,
                 vocab_hash: str | None = None) -> Path:
    """Contract-1 shards of packed sentences: CLS ... SEP per sample, the last sample of
    each split shorter than seq_len, token_counts.npy, manifest.json written last."""
    import conftest
    from transformers import AutoTokenizer

    from distill_common.fsio import atomic_write_json, sha256_file
    from distill_common.textnorm import vocab_hash as compute_vocab_hash

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = np.zeros(len(tok), dtype=np.int64)
    body = seq_len - 2

    def samples(n_samples: int, text_seed: int):
        stream: list[int] = []
        rng = np.random.default_rng(text_seed)
        for sentence in conftest.sentences(n_samples * 8, seed=text_seed):
            # A made-up word per sentence gives multi-piece words (qux -> q ##u ##x).
            made_up = "".join(rng.choice(list("qxzjkv"), size=int(rng.integers(2, 5))))
            stream += tok(f"{sentence} {made_up}", add_special_tokens=False)["input_ids"]
        for i in range(n_samples):
            piece = stream[i * body:(i + 1) * body]
            if i == n_samples - 1:
                piece = piece[: body // 2]  # the split's last sample is short
            yield np.array([tok.cls_token_id, *piece, tok.sep_token_id], dtype=np.uint16)

    splits = {}
    plan = {"train": [samples_per_shard] * (train_shards - 1) + [samples_per_shard - 1],
            "validation": [validation_samples]}
    for split, sizes in plan.items():
        (out / split).mkdir(exist_ok=True)
        gen = samples(sum(sizes), seed + (0 if split == "train" else 777))
        entries = []
        for shard, size in enumerate(sizes):
            rel = f"{split}/shard-{shard:06d}.tar"
            tokens = 0
            with tarfile.open(out / rel, "w") as tar:
                for index in range(size):
                    ids = next(gen)
                    tokens += len(ids)
                    if split == "train":
                        np.add.at(counts, ids.astype(np.int64), 1)
                    payload = _npy_bytes(ids)
                    info = tarfile.TarInfo(f"{shard:06d}-{index:07d}.input_ids.npy")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
            entries.append({"file": rel, "samples": size, "tokens": tokens,
                            "sha256": sha256_file(out / rel)})
        splits[split] = {"samples": sum(sizes), "tokens": sum(e["tokens"] for e in entries),
                         "shards": entries}
    np.save(out / "token_counts.npy", counts)
    manifest = {
        "format_version": 1,
        "tokenizer": {"name_or_path": str(tokenizer_dir),
                      "vocab_hash": vocab_hash or compute_vocab_hash(tok),
                      "vocab_size": len(tok), "class": type(tok).__name__,
                      "special_ids": {"cls": tok.cls_token_id, "sep": tok.sep_token_id,
                                      "pad": tok.pad_token_id, "mask": tok.mask_token_id,
                                      "unk": tok.unk_token_id}},
        "seq_len": seq_len, "dtype": "uint16", "splits": splits,
        "token_counts": {"file": "token_counts.npy",
                         "sha256": sha256_file(out / "token_counts.npy")},
        "sources": ["tiny"], "dropped": {}, "documents": {}, "config": {},
    }
    atomic_write_json(out / "manifest.json", manifest)
    return out


def save_wordpiece_tokenizer(folder: Path) -> Path:
    """The conftest vocabulary as a working tokenizer. (conftest's ``tokenizer_dir``
    passes ``vocab_file=`` to BertTokenizerFast, which transformers 5.23 ignores: it
    comes out with the 5 special tokens only; ``vocab=`` works.)"""
    import conftest
    from transformers import BertTokenizerFast

    vocab = conftest.tiny_vocab()
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True,
                            model_max_length=512)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return save_wordpiece_tokenizer(tmp_path_factory.mktemp("wp_tokenizer"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer_dir) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"), tokenizer_dir)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) > 100
    return tok


def _stream(shards, tokenizer, whole_word=False, **kw) -> S.TrainStream:
    manifest = M.load_manifest(str(shards))
    args = dict(seq_len=manifest["seq_len"], batch_size=5, seed=3, shuffle_buffer=7,
                masker=MK.build_masker(tokenizer, manifest, whole_word=whole_word))
    args.update(kw)
    return S.TrainStream(M.shard_urls(str(shards), manifest, "train"),
                         sample_counts=M.shard_sample_counts(manifest, "train"), **args)


def _all_keys(shards: Path) -> list[str]:
    manifest = M.load_manifest(str(shards))
    return [k for url in M.shard_urls(str(shards), manifest, "train")
            for k, _ in D.read_shard(url)]


@pytest.mark.parametrize("num_shards", [4, 3])  # 3 < 2 ranks x 2 workers: split by sample
def test_two_ranks_two_workers_read_every_sample_once_per_epoch(tmp_path, tokenizer_dir,
                                                                tokenizer, num_shards):
    shards = write_shards(tmp_path / "s", tokenizer_dir, train_shards=num_shards)
    expected = _all_keys(shards)
    seen_epoch0 = []
    for rank in range(2):
        stream = _stream(shards, tokenizer, rank=rank, world_size=2, num_workers=2)
        finished = set()
        for batch in S.train_loader(stream, num_workers=2):
            meta = batch["meta"]
            seen_epoch0 += [k for k, e in zip(meta["keys"], meta["epochs"]) if e == 0]
            if max(meta["epochs"]) >= 1:
                finished.add(meta["worker"])
            if finished == {0, 1}:
                break
    counts = Counter(seen_epoch0)
    assert sorted(counts) == sorted(expected)
    assert set(counts.values()) == {1}


def test_epochs_reshuffle_and_remask(shards, tokenizer):
    stream = _stream(shards, tokenizer, batch_size=1, shuffle_buffer=50)
    n = len(_all_keys(shards))
    it = iter(stream)
    epoch0 = [next(it) for _ in range(n)]
    epoch1 = [next(it) for _ in range(n)]
    order0 = [b["meta"]["keys"][0] for b in epoch0]
    order1 = [b["meta"]["keys"][0] for b in epoch1]
    assert sorted(order0) == sorted(order1) and order0 != order1
    masks0 = {b["meta"]["keys"][0]: b["labels"] for b in epoch0}
    assert any(not torch.equal(masks0[b["meta"]["keys"][0]], b["labels"]) for b in epoch1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_stream_continues_exactly(shards, tokenizer, num_workers):
    """Consume k batches, save the position, rebuild: the next batches are identical to
    those of the uninterrupted stream (across an epoch boundary)."""
    def take(loader_iter, n, position=None):
        out = []
        for _ in range(n):
            batch, meta = S.split_meta(next(loader_iter))
            if position is not None:
                position.after(meta)
            out.append((batch, meta["keys"]))
        return out

    full = take(iter(S.train_loader(_stream(shards, tokenizer, num_workers=num_workers),
                                    num_workers)), 20)
    first = _stream(shards, tokenizer, num_workers=num_workers)
    position = S.StreamPosition(num_workers=max(1, num_workers))
    take(iter(S.train_loader(first, num_workers)), 7, position)
    saved = S.StreamPosition.from_dict(json.loads(json.dumps(position.to_dict())))
    resumed = take(iter(S.train_loader(
        _stream(shards, tokenizer, num_workers=num_workers, position=saved), num_workers)), 13)
    for (want, want_keys), (got, got_keys) in zip(full[7:], resumed):
        assert want_keys == got_keys
        for name in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(want[name], got[name]), name


def test_masking_rules(shards, tokenizer):
    manifest = M.load_manifest(str(shards))
    masker = MK.build_masker(tokenizer, manifest, mask_prob=0.15)
    special = set(manifest["tokenizer"]["special_ids"].values())
    rng = np.random.default_rng(0)
    url = M.shard_urls(str(shards), manifest, "train")[0]
    chosen = replaced = randomised = kept = 0
    for _ in range(20):
        for key, payload in D.read_shard(url):
            ids = D.decode_ids(payload, url, key, manifest["seq_len"])
            out, labels = masker(ids, rng)
            sel = labels != MK.IGNORE_INDEX
            assert not any(int(t) in special for t in ids[sel])  # specials never chosen
            assert np.array_equal(labels[sel], ids[sel])
            assert np.array_equal(out[~sel], ids[~sel])
            n_cand = sum(int(t) not in special for t in ids)
            assert sel.sum() == max(1, round(0.15 * n_cand))
            chosen += sel.sum()
            replaced += (out[sel] == masker.mask_id).sum()
            kept += (out[sel] == ids[sel]).sum()
            randomised += ((out[sel] != masker.mask_id) & (out[sel] != ids[sel])).sum()
    assert 0.75 < replaced / chosen < 0.85
    assert 0.06 < randomised / chosen < 0.14
    assert 0.06 < kept / chosen < 0.16


def test_batches_follow_contract_2(shards, tokenizer):
    manifest = M.load_manifest(str(shards))
    batches = S.validation_batches(M.shard_urls(str(shards), manifest, "validation"),
                                   seq_len=manifest["seq_len"], batch_size=4, seed=0,
                                   masker=MK.build_masker(tokenizer, manifest))
    assert sum(len(b["input_ids"]) for b in batches) == 10
    last = batches[-1]
    assert last["input_ids"].dtype == torch.long and last["labels"].dtype == torch.long
    # The split's last sample is short: padded, attention 0, label -100 on the padding.
    pad = last["attention_mask"][-1] == 0
    assert pad.any()
    assert (last["input_ids"][-1][pad] == tokenizer.pad_token_id).all()
    assert (last["labels"][-1][pad] == -100).all()


def test_whole_word_masking_takes_whole_words(shards, tokenizer):
    manifest = M.load_manifest(str(shards))
    masker = MK.build_masker(tokenizer, manifest, whole_word=True, mask_prob=0.3)
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    url = M.shard_urls(str(shards), manifest, "train")[0]
    rng = np.random.default_rng(1)
    saw_continuation = False
    for key, payload in D.read_shard(url):
        ids = D.decode_ids(payload, url, key, manifest["seq_len"])
        _, labels = masker(ids, rng)
        sel = labels != MK.IGNORE_INDEX
        for i in range(1, len(ids)):
            if vocab[int(ids[i])].startswith("##"):
                saw_continuation = True
                assert sel[i] == sel[i - 1], (key, i)  # a piece goes with its word
    assert saw_continuation


def test_frequency_smoothed_selection_prefers_rare_tokens(shards, tokenizer):
    manifest = M.load_manifest(str(shards))
    counts = D.load_token_counts(str(shards), manifest)
    uniform = MK.build_masker(tokenizer, manifest)
    smoothed = MK.build_masker(tokenizer, manifest, token_counts=counts, smoothing=0.7)
    url = M.shard_urls(str(shards), manifest, "train")[0]

    def mean_count_of_chosen(masker):
        rng = np.random.default_rng(0)
        chosen = []
        for _ in range(10):
            for key, payload in D.read_shard(url):
                ids = D.decode_ids(payload, url, key, manifest["seq_len"])
                _, labels = masker(ids, rng)
                chosen += list(counts[ids[labels != -100]])
        return np.mean(chosen)

    assert mean_count_of_chosen(smoothed) < 0.8 * mean_count_of_chosen(uniform)


def test_tokenizer_mismatch_is_refused(tmp_path, tokenizer_dir, tokenizer):
    shards = write_shards(tmp_path / "s", tokenizer_dir, vocab_hash="0" * 64)
    manifest = M.load_manifest(str(shards))
    with pytest.raises(D.DataError, match="different vocabulary"):
        D.check_tokenizer(manifest, tokenizer, str(shards), "teacher-folder")
    D.check_tokenizer(M.load_manifest(str(write_shards(tmp_path / "ok", tokenizer_dir))),
                      tokenizer, str(tmp_path / "ok"), "teacher-folder")


def test_corrupt_and_missing_shards_are_named(tmp_path, tokenizer_dir, tokenizer):
    shards = write_shards(tmp_path / "s", tokenizer_dir)
    manifest = M.load_manifest(str(shards))
    bad = shards / "train" / "shard-000001.tar"
    bad.write_bytes(bad.read_bytes()[:700] + b"\x00garbage" * 50)
    stream = _stream(shards, tokenizer, shuffle_buffer=1)
    with pytest.raises(D.DataError, match="shard-000001.tar"):
        for _ in zip(range(50), stream):
            pass
    bad.unlink()
    with pytest.raises(D.DataError, match="shard-000001.tar.*missing"):
        M.shard_urls(str(shards), manifest, "train")
    (shards / "manifest.json").unlink()
    with pytest.raises(D.DataError, match="no manifest"):
        M.load_manifest(str(shards))


def _write_plain_shard(path: Path, prefix: str, n: int) -> str:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            payload = _npy_bytes(np.arange(4, dtype=np.uint16))
            info = tarfile.TarInfo(f"{prefix}-{i:04d}.input_ids.npy")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return str(path)


def test_shards_are_interleaved_so_a_short_run_sees_every_source(tmp_path):
    # Prep writes one input chunk per shard, so a shard is often a single source: read
    # one after another, the first samples would all come from the first shard.
    parts = [S._Part(_write_plain_shard(tmp_path / f"{p}.tar", p, n), 0, n)
             for p, n in (("wiki", 5), ("bbc", 2), ("wordnet", 4))]
    keys = [key for _, key, _ in S._interleave(parts, width=8)]
    assert [k.split("-")[0] for k in keys[:6]] == ["wiki", "bbc", "wordnet"] * 2
    assert sorted(keys) == sorted(f"{p}-{i:04d}" for p, n in (("wiki", 5), ("bbc", 2),
                                                               ("wordnet", 4))
                                  for i in range(n))  # each sample exactly once
    # A window of 2 opens the third shard in the round after the second runs out.
    narrow = [key.split("-")[0] for _, key, _ in S._interleave(parts, width=2)]
    assert narrow[:7] == ["wiki", "bbc", "wiki", "bbc", "wiki", "wiki", "wordnet"]


@pytest.mark.parametrize("num_shards", [2, 3, 5])  # fewer and more shards than 4 slots
def test_every_payload_is_read_once_per_epoch(tmp_path, tokenizer_dir, tokenizer,
                                              monkeypatch, num_shards):
    """Slots sharing a shard read disjoint contiguous parts and seek past the rest: the
    shard data is not read once per reader."""
    shards = write_shards(tmp_path / "s", tokenizer_dir, train_shards=num_shards)
    expected = sorted(_all_keys(shards))
    reads = Counter()
    real = D._read_payload

    def counting(f, size):
        reads[(f.name, f.tell())] += 1
        return real(f, size)

    monkeypatch.setattr(D, "_read_payload", counting)
    keys = []
    for rank in range(2):
        stream = _stream(shards, tokenizer, rank=rank, world_size=2, num_workers=2)
        for worker in range(2):
            for slot in stream.slots_of(worker):
                keys += [k for _, k, _ in stream._epoch_samples(0, slot, width=8)]
    assert sorted(keys) == expected  # every sample once
    assert set(reads.values()) == {1} and len(reads) == len(keys)


def test_a_resume_on_another_world_size_neither_skips_nor_repeats(shards, tokenizer):
    """2 ranks (4 data slots, 2 per rank) -> 1 rank serving all 4 -> 2 ranks again:
    within epoch 0 every sample is trained on exactly once."""
    def consume(world_size, positions, batches_per_rank):
        saved = []
        seen = []
        for rank in range(world_size):
            position = S.StreamPosition.merged(positions, num_workers=1) if positions \
                else S.StreamPosition(num_workers=1)
            stream = _stream(shards, tokenizer, rank=rank, world_size=world_size,
                             num_workers=0, data_slots=4, position=position)
            it = iter(S.train_loader(stream, 0))
            for _ in range(batches_per_rank):
                batch, meta = S.split_meta(next(it))
                position.after(meta)
                seen += [k for k, e in zip(meta["keys"], meta["epochs"]) if e == 0]
            saved.append(position.to_dict())
        return saved, seen

    saved, seen = consume(2, [], 2)
    saved, more = consume(1, saved, 3)
    seen += more
    saved, more = consume(2, saved, 6)
    seen += more
    epoch0 = Counter(seen)
    assert set(epoch0.values()) == {1}
    assert sorted(epoch0) == sorted(_all_keys(shards))  # 47 samples, all of them


def test_masking_and_collation_keep_up_with_a_gpu(shards, tokenizer):
    """A sanity floor far below bench/loader_throughput.py's target, so a regression of
    the vectorised masking (a Python loop per token) fails here on any machine."""
    import time

    stream = _stream(shards, tokenizer, batch_size=16, whole_word=True)
    it = iter(stream)
    next(it)
    start = time.perf_counter()
    n = sum(len(next(it)["input_ids"]) for _ in range(40))
    assert n / (time.perf_counter() - start) > 1500


def test_an_id_outside_the_vocabulary_names_its_shard_and_sample(tmp_path, tokenizer_dir,
                                                                 tokenizer):
    shards = write_shards(tmp_path / "s", tokenizer_dir, train_shards=1, samples_per_shard=6)
    bad = shards / "train" / "shard-000000.tar"
    with tarfile.open(bad, "w") as tar:  # a shard rewritten with one id past the vocabulary
        for i in range(5):
            ids = np.arange(5, 20, dtype=np.uint16)
            ids[3] = len(tokenizer) + 7 if i == 2 else ids[3]
            payload = _npy_bytes(ids)
            info = tarfile.TarInfo(f"000000-{i:07d}.input_ids.npy")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["samples"] = 5
    (shards / "manifest.json").write_text(json.dumps(manifest))
    stream = _stream(shards, tokenizer, shuffle_buffer=1)
    with pytest.raises(D.DataError, match=r"shard-000000.tar: sample 000000-0000002: token id "
                                          rf"{len(tokenizer) + 7} outside the vocabulary"):
        next(iter(stream))
