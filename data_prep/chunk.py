"""Pass 2 (one Ray task per chunk): tokenize, split long documents, pack and write the
chunk's train and validation shards.

A chunk holds at most ``docs_per_shard`` documents' tokens in memory, whatever the corpus
size. What does not fill a whole sequence (the *tail*) goes back to the driver, which
packs all tails, in chunk order, into the last shard of each split. When its shards are
renamed into place the task writes a done-marker (``.prep/chunk-NNNNNN.npz``: tails,
token counts and the shards' sha256) that a rerun with the same fingerprint reuses.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from data_prep.errors import PrepError
from data_prep.packing import pack_stream, piece_bounds, sentence_starts, split_pieces
from data_prep.plan import DROP, TRAIN, ChunkSpec
from data_prep.scan import read_spill, spill_name
from data_prep.shards import Output, write_shard
from data_prep.readers import read_unit
from data_prep.sources import ReadOptions
from data_prep.tokenizer import TokenizerSpec, build_encoder

log = logging.getLogger(__name__)

ENCODE_BATCH = 256
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class ChunkContext:
    """What every chunk task shares (sent once)."""
    opts: ReadOptions
    tokenizer: TokenizerSpec
    seq_len: int
    min_tokens: int
    sentence_split: bool
    output_url: str
    spill: bool = False
    """Pass 1 wrote the normalised texts to the output folder (read them, not the
    sources)."""


@dataclass
class ChunkResult:
    index: int
    shards: dict
    """split -> manifest entry of its shard, or None when it had no full sequence."""
    tails: dict
    """split -> 1-D token stream left over (packed by the driver)."""
    counts: np.ndarray
    """(vocab_size,) int64 token frequencies of this chunk's train shard."""
    docs: dict
    """split -> documents packed."""
    too_short: int
    content_tokens: int
    """Document tokens (no special tokens), both splits."""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    """CPU time of the task's process (contention on a shared machine does not count)."""
    reused: bool = False


def shard_name(split: str, index: int) -> str:
    return f"{split}/shard-{index:06d}.tar"


def marker_name(index: int) -> str:
    return f".prep/chunk-{index:06d}.npz"


def _pieces(enc, ids: list, text: str, max_len: int, sentence_split: bool):
    """A document longer than ``max_len`` tokens, cut at sentence starts where it can."""
    if not sentence_split:
        return [ids]
    # only long documents pay for the offsets
    return split_pieces(ids, piece_bounds(enc.offsets, sentence_starts(text), max_len))


def _encode_batch(encoder, texts, splits, streams, docs, ctx, sep_id) -> tuple[int, int]:
    too_short = tokens = 0
    max_len, min_tokens = ctx.seq_len - 2, max(1, ctx.min_tokens)
    for text, split, enc in zip(texts, splits, encoder.encode_batch(
            texts, add_special_tokens=False)):
        ids = enc.ids  # a fresh list per access
        n = len(ids)
        if n < min_tokens:
            too_short += 1
            continue
        stream = streams[split]
        if n <= max_len:  # most documents: one piece
            stream.extend(ids)
            stream.append(sep_id)
        else:
            for piece in _pieces(enc, ids, text, max_len, ctx.sentence_split):
                stream.extend(piece)
                stream.append(sep_id)
        docs[split] += 1
        tokens += n
    return too_short, tokens


def _source_texts(spec: ChunkSpec, ctx: ChunkContext) -> Iterator[tuple[int, Optional[str]]]:
    """(assignment, text) of the chunk's items, read again from the source and normalised
    (None where dropped)."""
    from distill_common.textnorm import normalize_text

    n_items = spec.stop - spec.start
    seen = 0
    items = read_unit(spec.unit, ctx.opts, spec.start, spec.resume)
    for assign, item in zip(spec.assign, items):  # assign first: zip then stops without
        # pulling one item too many from the reader (which keeps its place for the next chunk)
        seen += 1
        if assign != DROP and item.reason is not None:  # good in pass 1, bad now
            raise PrepError(f"{item.message.split('; fix:')[0]}, but it read fine in the "
                            f"first pass: it changed during prep; rerun")
        yield assign, None if assign == DROP else normalize_text(item.text)
    if seen != n_items:
        raise PrepError(f"{spec.unit.label}: has {spec.start + seen} documents now but "
                        f"{spec.stop} when it was scanned; it changed during prep, rerun")


def _spilled_texts(spec: ChunkSpec, out: Output) -> Optional[list]:
    """The chunk's texts as pass 1 normalised them, or None without a spill file."""
    name = spill_name(spec.unit, spec.start)
    try:
        texts = read_spill(out.read_bytes(name))
    except FileNotFoundError:
        log.warning("prep: %s is missing; reading %s again", name, spec.unit.label)
        return None
    except (ValueError, UnicodeDecodeError) as err:
        raise PrepError(f"{out.path(name)}: damaged spill file ({err}); rerun prep, which "
                        f"writes it again") from None
    if len(texts) != spec.stop - spec.start or any(
            t is None for t, a in zip(texts, spec.assign) if a != DROP):
        raise PrepError(f"{out.path(name)}: holds {len(texts)} documents where the plan "
                        f"has {spec.stop - spec.start}; rerun prep, which writes it again")
    return texts


def tokenize_chunk(spec: ChunkSpec, ctx: ChunkContext, out: Optional[Output] = None
                   ) -> tuple[dict, dict, int, int]:
    """The chunk's documents -> (split -> token stream, split -> docs, too_short, tokens)."""
    encoder = build_encoder(ctx.tokenizer)
    streams = {s: [] for s in SPLITS}
    docs = {s: 0 for s in SPLITS}
    too_short = tokens = 0
    texts, splits = [], []
    spilled = _spilled_texts(spec, out) if ctx.spill and out is not None else None
    items = zip(spec.assign, spilled) if spilled is not None else _source_texts(spec, ctx)
    for assign, text in items:
        if assign == DROP:
            continue
        texts.append(text)
        splits.append("train" if assign == TRAIN else "validation")
        if len(texts) == ENCODE_BATCH:
            ts, nt = _encode_batch(encoder, texts, splits, streams, docs, ctx,
                                   ctx.tokenizer.sep_id)
            too_short, tokens, texts, splits = too_short + ts, tokens + nt, [], []
    if texts:
        ts, nt = _encode_batch(encoder, texts, splits, streams, docs, ctx,
                               ctx.tokenizer.sep_id)
        too_short, tokens = too_short + ts, tokens + nt
    dtype = np.int32 if ctx.tokenizer.dtype == "int32" else np.uint16
    arrays = {s: np.asarray(streams[s], dtype=dtype) for s in SPLITS}
    return arrays, docs, too_short, tokens


def process_chunk(spec: ChunkSpec, ctx: ChunkContext) -> ChunkResult:
    started, cpu_started = time.perf_counter(), time.process_time()
    tok = ctx.tokenizer
    out = Output(ctx.output_url)
    streams, docs, too_short, tokens = tokenize_chunk(spec, ctx, out)
    shards, tails = {}, {}
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    for split in SPLITS:
        seqs, tails[split] = pack_stream(streams[split], ctx.seq_len, tok.cls_id, tok.sep_id)
        shards[split] = None
        if len(seqs):
            shards[split] = write_shard(out, shard_name(split, spec.index), spec.index, seqs,
                                        tok.dtype)
            if split == "train":
                counts += np.bincount(seqs.ravel(), minlength=tok.vocab_size)[:tok.vocab_size]
    result = ChunkResult(spec.index, shards, tails, counts, docs, too_short, tokens,
                         time.perf_counter() - started, time.process_time() - cpu_started)
    save_marker(out, spec, result)
    if ctx.spill:
        out.remove(spill_name(spec.unit, spec.start))  # done with: free the disk
    return result


# ---------------------------------------------------------------- done-markers

def save_marker(out: Output, spec: ChunkSpec, result: ChunkResult) -> None:
    meta = {"fingerprint": spec.fingerprint, "shards": result.shards, "docs": result.docs,
            "too_short": result.too_short, "content_tokens": result.content_tokens,
            "vocab_size": len(result.counts)}
    buf = io.BytesIO()
    # Uncompressed, token counts stored sparse: compressing the dense (vocab,) counts took
    # ~8 ms per chunk, 2% of a prep run, for a file only a rerun reads.
    seen = np.flatnonzero(result.counts).astype(np.int32)
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
             train_tail=result.tails["train"], validation_tail=result.tails["validation"],
             count_ids=seen, count_values=result.counts[seen])
    out.write_bytes(marker_name(spec.index), buf.getvalue())


def load_marker(out: Output, spec: ChunkSpec) -> Optional[ChunkResult]:
    """The finished result of ``spec`` from an earlier run, if its fingerprint matches and
    its shards are there with the recorded sha256; else None (the chunk is redone)."""
    name = marker_name(spec.index)
    if not out.exists(name):
        return None
    try:
        with np.load(io.BytesIO(out.read_bytes(name))) as data:
            meta = json.loads(data["meta"].tobytes().decode())
            tails = {"train": data["train_tail"], "validation": data["validation_tail"]}
            counts = np.zeros(int(meta["vocab_size"]), dtype=np.int64)
            counts[data["count_ids"]] = data["count_values"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):  # unreadable or old
        return None
    if meta.get("fingerprint") != spec.fingerprint:
        return None
    for entry in meta["shards"].values():
        if entry is not None and (not out.exists(entry["file"])
                                  or out.sha256(entry["file"]) != entry["sha256"]):
            return None
    return ChunkResult(spec.index, meta["shards"], tails, counts, meta["docs"],
                       meta["too_short"], meta["content_tokens"], reused=True)


def empty_result(spec: ChunkSpec, vocab_size: int, dtype: str) -> ChunkResult:
    """A chunk whose documents were all dropped in pass 1: nothing to read or write."""
    np_dtype = np.int32 if dtype == "int32" else np.uint16
    return ChunkResult(spec.index, {s: None for s in SPLITS},
                       {s: np.zeros(0, dtype=np_dtype) for s in SPLITS},
                       np.zeros(vocab_size, dtype=np.int64), {s: 0 for s in SPLITS}, 0, 0,
                       reused=True)

