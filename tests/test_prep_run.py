"""`run_prep` end to end in this process (workers=0): shards and manifest as the trainer
reads them, dedup / holdout / validation split / token counts, resume, verify, fsspec
output, bad input, and the `distill prep` command."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from data_prep import run_prep, verify
from data_prep.config import PrepConfig
from data_prep.errors import PrepError
from data_prep.manifest import read_manifest
from data_prep.packing import strip_specials
from data_prep.shards import Output, read_shard
from distill_cli.main import main


def prep_cfg(out, sources, **kw) -> PrepConfig:
    kw = {"seq_len": 32, "docs_per_shard": 25, "min_tokens": 1, "validation_fraction": 0.2,
          "workers": 0, **kw}
    return PrepConfig(sources=[str(s) for s in sources], output_dir=str(out), **kw)


def all_sequences(out: str, manifest: dict, split: str) -> list[np.ndarray]:
    o = Output(out)
    return [s for shard in manifest["splits"][split]["shards"] for s in read_shard(o, shard["file"])]


def tokenized_docs(tokenizer_dir, texts) -> list[list[int]]:
    from transformers import AutoTokenizer

    from distill_common.textnorm import normalize_text

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [tok(normalize_text(t), add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two JSONL files with 5 exact duplicates (after whitespace normalisation)."""
    from conftest import sentences

    d = tmp_path_factory.mktemp("prep_corpus")
    texts = [" ".join(sentences(1 + i % 9, seed=i)) for i in range(120)]
    for k, part in enumerate([texts[:60], texts[60:] + [t.replace(" ", "   ") for t in texts[:5]]]):
        (d / f"part-{k}.jsonl").write_text(
            "".join(json.dumps({"id": f"p{k}-{i}", "text": t}) + "\n" for i, t in enumerate(part)))
    return d, texts


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus, tokenizer_dir):
    out = tmp_path_factory.mktemp("prep_out") / "shards"
    manifest = run_prep(prep_cfg(out, [corpus[0]]), str(tokenizer_dir))
    return out, manifest


def test_manifest_follows_the_contract(prepared, tokenizer_dir):
    from transformers import AutoTokenizer

    from distill_common.textnorm import vocab_hash

    out, manifest = prepared
    assert read_manifest(str(out)) == manifest
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert manifest["format_version"] == 1 and manifest["seq_len"] == 32
    assert manifest["dtype"] == "uint16"
    t = manifest["tokenizer"]
    assert t["vocab_hash"] == vocab_hash(tok) and t["vocab_size"] == len(tok)
    assert t["special_ids"] == {"cls": tok.cls_token_id, "sep": tok.sep_token_id,
                                "pad": tok.pad_token_id, "mask": tok.mask_token_id,
                                "unk": tok.unk_token_id}
    for split in ("train", "validation"):
        entry = manifest["splits"][split]
        assert entry["samples"] == sum(s["samples"] for s in entry["shards"]) > 0
        assert entry["tokens"] == sum(s["tokens"] for s in entry["shards"])
        for s in entry["shards"]:
            assert s["file"].startswith(f"{split}/shard-") and (out / s["file"]).is_file()
    assert manifest["sources"][0]["documents"] == 125
    assert {f["path"].rsplit("/", 1)[-1] for f in manifest["sources"][0]["files"]} == \
        {"part-0.jsonl", "part-1.jsonl"}
    assert manifest["config"]["seq_len"] == 32 and manifest["config"]["tokenizer"]


def test_shards_pack_every_kept_document_exactly_once(prepared, corpus, tokenizer_dir):
    out, manifest = prepared
    _, texts = corpus
    specials = manifest["tokenizer"]["special_ids"]
    content = []
    for split in ("train", "validation"):
        seqs = all_sequences(str(out), manifest, split)
        for i, s in enumerate(seqs):
            assert s.dtype == np.uint16
            assert s[0] == specials["cls"] and s[-1] == specials["sep"]
            assert len(s) == 32 or i == len(seqs) - 1, "only the split's last is short"
        content.append(strip_specials(seqs, [specials["cls"], specials["sep"]]))
    expected = np.concatenate([np.asarray(d) for d in tokenized_docs(tokenizer_dir, texts)])
    got = np.concatenate(content)
    assert len(got) == len(expected) == manifest["run"]["content_tokens"]
    np.testing.assert_array_equal(np.sort(got), np.sort(expected))


def test_duplicates_are_dropped_and_counted(prepared):
    _, manifest = prepared
    assert manifest["dropped"]["duplicate"] == 5
    assert manifest["documents"] == {"read": 125, "kept": 120,
                                     "train": manifest["documents"]["train"],
                                     "validation": manifest["documents"]["validation"]}
    # About 20% of whole documents, picked by hash.
    assert 10 <= manifest["documents"]["validation"] <= 40


def test_webdataset_reads_the_shards(prepared):
    import webdataset as wds

    out, manifest = prepared
    urls = [str(out / s["file"]) for s in manifest["splits"]["train"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == manifest["splits"]["train"]["samples"]
    assert len({s["__key__"] for s in samples}) == len(samples)
    assert all(isinstance(s["input_ids.npy"], np.ndarray) for s in samples)


def test_tar_headers_carry_no_time_or_owner(prepared):
    out, manifest = prepared
    with tarfile.open(out / manifest["splits"]["train"]["shards"][0]["file"]) as tar:
        for m in tar.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")


def test_token_counts_cover_the_train_split(prepared):
    out, manifest = prepared
    counts = np.load(out / "token_counts.npy")
    assert counts.dtype == np.int64 and len(counts) == manifest["tokenizer"]["vocab_size"]
    seqs = all_sequences(str(out), manifest, "train")
    expected = np.bincount(np.concatenate(seqs).astype(np.int64), minlength=len(counts))
    np.testing.assert_array_equal(counts, expected)


def test_verify_names_a_shard_with_a_flipped_byte(tmp_path, corpus, tokenizer_dir, capsys):
    out = tmp_path / "shards"
    manifest = run_prep(prep_cfg(out, [corpus[0]]), str(tokenizer_dir))
    assert verify(str(out)) == []
    victim = manifest["splits"]["train"]["shards"][1]["file"]
    data = bytearray((out / victim).read_bytes())
    data[700] ^= 0x01
    (out / victim).write_bytes(bytes(data))
    assert verify(str(out)) == [victim]
    assert main(["prep", "verify", str(out)]) == 1
    assert victim in capsys.readouterr().out


def test_same_config_gives_byte_identical_shards(tmp_path, corpus, tokenizer_dir, prepared):
    out = tmp_path / "again"
    manifest = run_prep(prep_cfg(out, [corpus[0]]), str(tokenizer_dir))
    assert manifest["splits"] == prepared[1]["splits"]


class Killed(Exception):
    pass


def test_resume_after_a_failed_run_reuses_finished_chunks(tmp_path, corpus, tokenizer_dir,
                                                          prepared, monkeypatch):
    import data_prep.run as run_module

    out = tmp_path / "shards"
    real = run_module.process_chunk
    calls, alive = [], [False]

    def dies_on_third_chunk(spec, ctx):
        calls.append(spec.index)
        if len(calls) == 3 and not alive[0]:
            raise Killed("killed")
        return real(spec, ctx)

    monkeypatch.setattr(run_module, "process_chunk", dies_on_third_chunk)
    with pytest.raises(Killed):
        run_prep(prep_cfg(out, [corpus[0]]), str(tokenizer_dir))
    assert not (out / "manifest.json").exists(), "a half-done folder must not look complete"
    (out / "train" / ".tmp-123-shard-000009.tar").write_bytes(b"partial")  # a torn write
    calls.clear()
    alive[0] = True
    manifest = run_prep(prep_cfg(out, [corpus[0]]), str(tokenizer_dir))
    assert manifest["run"]["chunks_reused"] >= 2
    assert len(calls) == manifest["run"]["chunks"] - manifest["run"]["chunks_reused"]
    assert manifest["splits"] == prepared[1]["splits"], "resumed shards differ from a clean run"
    assert not any(p.name.startswith(".tmp-") for p in (out / "train").iterdir())
    # the reused chunks' token counts come back from their done-markers
    np.testing.assert_array_equal(np.load(out / "token_counts.npy"),
                                  np.load(prepared[0] / "token_counts.npy"))


def test_resume_redoes_a_chunk_whose_shard_was_corrupted(tmp_path, corpus, tokenizer_dir,
                                                         prepared):
    out = tmp_path / "shards"
    manifest = run_prep(prep_cfg(out, [corpus[0]]), str(tokenizer_dir))
    victim = out / manifest["splits"]["train"]["shards"][0]["file"]
    victim.write_bytes(victim.read_bytes()[:-100])
    manifest = run_prep(prep_cfg(out, [corpus[0]]), str(tokenizer_dir))
    assert manifest["run"]["chunks_reused"] == manifest["run"]["chunks"] - 1
    assert manifest["splits"] == prepared[1]["splits"] and verify(str(out)) == []


def test_holdout_documents_never_reach_the_shards(tmp_path, corpus, tokenizer_dir):
    from distill_common.textnorm import doc_hash

    folder, texts = corpus
    holdout = tmp_path / "holdout.txt"
    holdout.write_text("\n".join(doc_hash(t) for t in texts[:10]) + "\np1-0\n")
    out = tmp_path / "shards"
    manifest = run_prep(prep_cfg(out, [folder], holdout=str(holdout),
                                 validation_fraction=0.0), str(tokenizer_dir))
    # texts[0..4] are also duplicated in part-1: both copies are held out.
    assert manifest["dropped"]["holdout"] == 10 + 5 + 1
    assert manifest["dropped"]["duplicate"] == 0
    kept = tokenized_docs(tokenizer_dir, texts[10:60] + texts[61:])
    got = strip_specials(all_sequences(str(out), manifest, "train"),
                         [manifest["tokenizer"]["special_ids"][k] for k in ("cls", "sep")])
    np.testing.assert_array_equal(np.sort(got), np.sort(np.concatenate(kept)))
    assert manifest["splits"]["validation"]["samples"] == 0


def test_min_tokens_drops_short_documents(tmp_path, tokenizer_dir):
    f = tmp_path / "a.txt"
    f.write_text("the city\n" + "the king of the north and the south river\n" * 1)
    manifest = run_prep(prep_cfg(tmp_path / "o", [f], min_tokens=4, validation_fraction=0),
                        str(tokenizer_dir))
    assert manifest["dropped"]["too_short"] == 1 and manifest["documents"]["train"] == 1


def test_long_document_is_split_at_sentence_ends(tmp_path, tokenizer_dir):
    from conftest import sentences

    f = tmp_path / "a.txt"
    f.write_text(" ".join(sentences(40, seed=5)) + "\n")
    manifest = run_prep(prep_cfg(tmp_path / "o", [f], seq_len=64, validation_fraction=0),
                        str(tokenizer_dir))
    seqs = all_sequences(str(tmp_path / "o"), manifest, "train")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    period = tok.convert_tokens_to_ids(".")
    # Inside sequences, piece-ending SEPs (not the closing one) follow a sentence's period.
    inner = [(s[i - 1], s[i]) for s in seqs for i in range(1, len(s) - 1) if s[i] == tok.sep_token_id]
    assert inner and all(prev == period for prev, _ in inner)


def test_memory_url_output(corpus, tokenizer_dir, prepared):
    manifest = run_prep(prep_cfg("memory://prep-test/shards", [corpus[0]]), str(tokenizer_dir))
    assert manifest["splits"] == prepared[1]["splits"]
    assert verify("memory://prep-test/shards") == []
    assert json.loads(Output("memory://prep-test/shards").read_bytes("manifest.json")) == manifest


def test_file_url_output(tmp_path, corpus, tokenizer_dir, prepared):
    manifest = run_prep(prep_cfg(f"file://{tmp_path}/shards", [corpus[0]]), str(tokenizer_dir))
    assert manifest["splits"] == prepared[1]["splits"]
    assert (tmp_path / "shards" / "manifest.json").is_file()


def test_bad_input_is_skipped_and_counted(tmp_path, tokenizer_dir):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "the king"}\nnot json\n{"x": 1}\n')
    (tmp_path / "in" / "b.txt").write_bytes(b"the city\n\xff\xfe bad\n")
    (tmp_path / "in" / "c.txt").write_text("")
    manifest = run_prep(prep_cfg(tmp_path / "o", [tmp_path / "in"], on_error="skip"),
                        str(tokenizer_dir))
    d = manifest["dropped"]
    assert (d["bad_json"], d["missing_text_field"], d["invalid_utf8"], d["empty_file"]) == \
        (1, 1, 1, 1)
    assert manifest["documents"]["kept"] == 2


def test_bad_tokenizer_folder_is_a_clear_error(tmp_path, corpus):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(PrepError, match=r"tok.*tokenizer does not load.*prep.tokenizer"):
        run_prep(prep_cfg(tmp_path / "o", [corpus[0]]), str(tmp_path / "tok"))
    with pytest.raises(PrepError, match="neither a folder, a model asset .* nor a Hugging Face Hub id"):
        run_prep(prep_cfg(tmp_path / "o", [corpus[0]]), str(tmp_path / "missing"))


def write_recipe(tmp_path, tokenizer_dir, sources) -> str:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: t\noutput_dir: {tmp_path}/run\nteacher:\n  path: {tokenizer_dir}\n"
        f"prep:\n  sources: {json.dumps([str(s) for s in sources])}\n  seq_len: 32\n"
        f"  workers: 0\n  docs_per_shard: 40\n")
    return str(recipe)


def test_cli_prep_writes_shards_under_the_run_folder(tmp_path, corpus, tokenizer_dir, capsys):
    recipe = write_recipe(tmp_path, tokenizer_dir, [corpus[0]])
    assert main(["prep", recipe, "prep.min_tokens=1"]) == 0
    assert "train and" in capsys.readouterr().out
    manifest = read_manifest(str(tmp_path / "run" / "shards"))
    assert manifest["config"]["min_tokens"] == 1
    assert main(["prep", "verify", str(tmp_path / "run" / "shards")]) == 0


@pytest.mark.parametrize("case", ["missing", "bad_json"])
def test_cli_bad_input_is_one_clean_error(tmp_path, tokenizer_dir, capsys, case):
    src = tmp_path / "nope.txt"
    if case == "bad_json":
        src = tmp_path / "a.jsonl"
        src.write_text('{"text": "fine"}\n{broken\n')
    recipe = write_recipe(tmp_path, tokenizer_dir, [src])
    assert main(["prep", recipe]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert (src.name in err) and ("a.jsonl:2" in err if case == "bad_json" else True)


def test_cli_verify_without_a_manifest(tmp_path, capsys):
    assert main(["prep", "verify", str(tmp_path)]) == 2
    assert "no manifest" in capsys.readouterr().err


def test_npy_payload_is_plain_numpy(prepared):
    out, manifest = prepared
    with tarfile.open(out / manifest["splits"]["validation"]["shards"][-1]["file"]) as tar:
        member = tar.getmembers()[-1]
        arr = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
    assert arr.ndim == 1 and arr.dtype == np.uint16 and len(arr) <= 32


def test_missing_source_is_skipped_and_counted_with_on_error_skip(tmp_path, corpus,
                                                                  tokenizer_dir):
    missing = tmp_path / "gone.jsonl"
    with pytest.raises(PrepError, match="gone.jsonl.*does not exist"):
        run_prep(prep_cfg(tmp_path / "o", [corpus[0], missing]), str(tokenizer_dir))
    manifest = run_prep(prep_cfg(tmp_path / "o", [corpus[0], missing], on_error="skip"),
                        str(tokenizer_dir))
    assert manifest["dropped"]["missing_source"] == 1
    assert "does not exist" in manifest["sources"][1]["skipped"]
    assert manifest["documents"]["kept"] == 120


def test_nothing_left_to_pack_is_an_error_not_an_empty_dataset(tmp_path, tokenizer_dir):
    f = tmp_path / "a.txt"
    f.write_text("the city\nthe king\n")
    with pytest.raises(PrepError, match=r"no document left.*too_short.*prep.min_tokens"):
        run_prep(prep_cfg(tmp_path / "o", [f], min_tokens=50), str(tokenizer_dir))
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_a_tiny_corpus_still_gets_one_validation_document(tmp_path, tokenizer_dir):
    f = tmp_path / "a.txt"
    f.write_text("the king of the north\nthe city by the river\nthe war of the state\n")
    manifest = run_prep(prep_cfg(tmp_path / "o", [f], validation_fraction=1e-9),
                        str(tokenizer_dir))
    assert manifest["documents"]["validation"] == 1 and manifest["documents"]["train"] == 2
    assert manifest["splits"]["validation"]["samples"] == 1
    off = run_prep(prep_cfg(tmp_path / "o2", [f], validation_fraction=0.0), str(tokenizer_dir))
    assert off["documents"]["validation"] == 0


def test_spilled_text_gives_the_same_shards_as_reading_the_sources(tmp_path, corpus,
                                                                   tokenizer_dir, prepared):
    """A local output spills pass 1's texts by default and removes them at the end; with
    spill_text=false pass 2 reads the sources again: the same bytes either way."""
    assert not (prepared[0] / ".prep" / "text").exists()
    out = tmp_path / "no-spill"
    (out / ".prep" / "text").mkdir(parents=True)
    (out / ".prep" / "text" / "left-by-a-crashed-run.bin").write_bytes(b"old")
    manifest = run_prep(prep_cfg(out, [corpus[0]], spill_text=False), str(tokenizer_dir))
    assert manifest["splits"] == prepared[1]["splits"]
    assert not (out / ".prep" / "text").exists()


def test_pass_two_reads_the_spill_not_the_sources(tmp_path, corpus, tokenizer_dir, prepared,
                                                  monkeypatch):
    import data_prep.chunk as chunk_module

    def no_second_read(*args, **kwargs):
        raise AssertionError("pass 2 read the source again")

    monkeypatch.setattr(chunk_module, "read_unit", no_second_read)
    manifest = run_prep(prep_cfg(tmp_path / "shards", [corpus[0]]), str(tokenizer_dir))
    assert manifest["splits"] == prepared[1]["splits"]


def test_a_missing_spill_file_falls_back_to_the_source(tmp_path, corpus, tokenizer_dir,
                                                       prepared, monkeypatch, caplog):
    import data_prep.chunk as chunk_module

    monkeypatch.setattr(chunk_module, "spill_name", lambda unit, start: ".prep/text/gone.bin")
    manifest = run_prep(prep_cfg(tmp_path / "shards", [corpus[0]]), str(tokenizer_dir))
    assert manifest["splits"] == prepared[1]["splits"]
    assert "gone.bin is missing; reading" in caplog.text
    assert not (tmp_path / "shards" / ".prep" / "text").exists()


def test_a_damaged_spill_file_is_a_clear_error(tmp_path, corpus, tokenizer_dir, monkeypatch):
    import data_prep.scan as scan_module

    real = scan_module.spill_bytes
    monkeypatch.setattr(scan_module, "spill_bytes", lambda texts: real(texts)[:-7])
    with pytest.raises(PrepError, match=r"\.prep/text/.*\.bin: damaged spill file.*rerun"):
        run_prep(prep_cfg(tmp_path / "shards", [corpus[0]]), str(tokenizer_dir))
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_spill_format_round_trip():
    from data_prep.scan import read_spill, spill_bytes

    texts = ["plain", None, "", "naïve café 😀 东京", None, "x" * 1000]
    assert read_spill(spill_bytes(texts)) == texts
    assert read_spill(spill_bytes([])) == []
    with pytest.raises(ValueError):
        read_spill(spill_bytes(texts)[:-5])


def test_both_passes_report_progress(tmp_path, corpus, tokenizer_dir, caplog):
    """Pass 1 (read, normalise, hash) has its own progress line with a rate, as pass 2
    (tokenize, pack) has: a large corpus is never silent for minutes."""
    import logging

    caplog.set_level(logging.INFO, logger="data_prep")
    run_prep(prep_cfg(tmp_path / "o", [corpus[0]], progress_every_s=0.001), str(tokenizer_dir))
    first = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith("prep pass 1 (read, normalise, hash): ")]
    assert first and first[-1].startswith("prep pass 1 (read, normalise, hash): 2/2 inputs")
    assert "docs/s" in first[-1] and "ETA" in first[-1]
    assert any(r.getMessage().startswith("prep: ") and "docs/s" in r.getMessage()
               for r in caplog.records)
