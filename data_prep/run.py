"""`run_prep`: the driver of `distill prep`.

1. Resolve the sources into units (files, `datasets` folders, named corpora).
2. Pass 1, a task per unit: normalise + hash every document (holdout, empties, bad input).
3. Driver: exact dedup across the corpus, validation split by hash, fixed chunks.
4. Pass 2, a task per chunk: tokenize, pack, write its shards and a done-marker; chunks
   done by an earlier run with the same fingerprint are reused.
5. Driver: pack the chunks' tails into each split's last shard, sum the token counts,
   remove stale shards, write manifest.json last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from typing import Optional

import numpy as np

from data_prep.chunk import (SPLITS, ChunkContext, ChunkResult, empty_result, load_marker,
                             marker_name, process_chunk, shard_name)
from data_prep.config import OUTPUT_FIELDS, PrepConfig
from data_prep.errors import PrepError
from data_prep.executor import executor
from data_prep.lines import missing_codec
from data_prep.manifest import FORMAT_VERSION, MANIFEST, TOKEN_COUNTS
from data_prep.packing import pack_final
from data_prep.plan import (ChunkSpec, dropped_counts, mark_duplicates, plan_chunks,
                            work_order)
from data_prep.scan import (BAD_REASONS, SPILL_DIR, STATUS_CODE, STATUS_NAMES, UnitScan,
                            load_holdout, scan_unit)
from data_prep.shards import Output, npy_bytes, write_shard
from data_prep.sources import ReadOptions, Unit, resolve_sources
from data_prep.tokenizer import TokenizerSpec, load_tokenizer_spec
from distill_common.folder_lock import FolderLock
from distill_common.urls import redact_url

log = logging.getLogger(__name__)


def _scan_task(unit: Unit, shared: tuple) -> UnitScan:
    return scan_unit(unit, *shared)


def _fingerprint_base(cfg: PrepConfig, tok: TokenizerSpec) -> dict:
    return {"format_version": FORMAT_VERSION,
            # URLs redacted: a re-signed URL of the same file reuses its chunks (whose
            # fingerprints also cover every document's hash)
            "config": {f: getattr(cfg, f) for f in OUTPUT_FIELDS}
            | {"sources": [redact_url(s) for s in cfg.sources]},
            "tokenizer": tok.manifest_entry()}


def _scan_all(ex, units: list[Unit], shared: tuple, every_s: float) -> list[UnitScan]:
    from distill_common.progress import Progress

    scans: list[Optional[UnitScan]] = [None] * len(units)
    progress = Progress("prep pass 1 (read, normalise, hash)", total=len(units),
                        unit="inputs", every_s=every_s, logger=log)
    for i, scan in ex.imap_unordered(_scan_task, units, shared):
        scan.status = scan.status.copy()  # Ray hands back read-only arrays; dedup writes
        scans[i] = scan
        progress.update(1, docs=scan.n_items)
    progress.close()
    return scans


def _log_skipped(scans: list[UnitScan]) -> None:
    first: dict[str, str] = {}
    for scan in scans:
        for reason, message in scan.first_errors.items():
            first.setdefault(reason, message)
    for reason, message in first.items():
        log.warning("prep: skipping bad input (%s), first one: %s", reason, message)


def _run_chunks(ex, chunks: list[ChunkSpec], ctx: ChunkContext, out: Output,
                every_s: float) -> list[ChunkResult]:
    from distill_common.progress import Progress

    results: dict[int, ChunkResult] = {}
    todo = []
    for spec in chunks:
        if spec.kept == 0:
            results[spec.index] = empty_result(spec, ctx.tokenizer.vocab_size,
                                               ctx.tokenizer.dtype)
        elif (done := load_marker(out, spec)) is not None:
            results[spec.index] = done
        else:
            todo.append(spec)
    todo = work_order(todo)
    reused = len(chunks) - len(todo)
    if reused:
        log.info("prep: reusing %d of %d chunks finished by an earlier run", reused,
                 len(chunks))
    progress = Progress("prep", total=sum(s.kept for s in todo), unit="docs",
                        every_s=every_s, logger=log)
    for i, result in ex.imap_unordered(process_chunk, todo, ctx):
        results[todo[i].index] = result
        progress.update(sum(result.docs.values()) + result.too_short,
                        tokens=result.content_tokens)
    progress.close()
    return [results[spec.index] for spec in chunks]


def _finish_split(out: Output, split: str, results: list[ChunkResult], tok: TokenizerSpec,
                  seq_len: int, counts: np.ndarray) -> dict:
    """The split's chunk shards plus the shard packed from all tails (in chunk order)."""
    entries = [r.shards[split] for r in results if r.shards[split] is not None]
    tail = np.concatenate([r.tails[split] for r in results]) if results else np.zeros(0)
    last = pack_final(tail, seq_len, tok.cls_id, tok.sep_id)
    if last:
        n = len(results)
        entries.append(write_shard(out, shard_name(split, n), n, last, tok.dtype))
        if split == "train":
            counts += np.bincount(np.concatenate(last).astype(np.int64),
                                  minlength=tok.vocab_size)[:tok.vocab_size]
    keep = {e["file"].split("/", 1)[1] for e in entries}
    for name in out.list(split):  # shards of an earlier, different run
        if name.startswith("shard-") and name not in keep:
            out.remove(f"{split}/{name}")
    return {"samples": sum(e["samples"] for e in entries),
            "tokens": sum(e["tokens"] for e in entries),
            "documents": sum(r.docs[split] for r in results),
            "shards": entries}


def _bad_input(unit: Unit, scan: UnitScan) -> Optional[dict]:
    """What of ``unit`` was skipped as bad input: counts by reason and the first message
    of each reason; None when nothing was."""
    counts = np.bincount(scan.status, minlength=len(STATUS_NAMES))
    skipped = {name: int(counts[STATUS_CODE[name]]) for name in BAD_REASONS
               if counts[STATUS_CODE[name]]}
    if not skipped:
        return None
    return {"file": unit.label, "skipped": skipped,
            "first": {r: scan.first_errors[r] for r in skipped if r in scan.first_errors}}


def _source_entries(sources: list, scans: list[UnitScan]) -> list[dict]:
    entries, i = [], 0
    for s in sources:
        unit_scans = list(zip(s.units, scans[i:i + len(s.units)]))
        n = sum(scan.n_items for _, scan in unit_scans)
        bad = [b for u, scan in unit_scans if (b := _bad_input(u, scan)) is not None]
        entries.append({"source": redact_url(s.spec), "files": s.files, "documents": int(n)}
                       | ({"bad_input": bad} if bad else {})
                       | ({"skipped": s.error} if s.error else {}))
        i += len(s.units)
    return entries


def _recorded_config(cfg: PrepConfig, tokenizer_path: str) -> dict:
    """The config as the manifest keeps it: URLs without query strings or credentials."""
    config = dataclasses.asdict(cfg) | {"tokenizer": cfg.tokenizer or tokenizer_path}
    config["sources"] = [redact_url(s) for s in config["sources"]]
    for key in ("output_dir", "holdout", "tokenizer"):
        if config[key]:
            config[key] = redact_url(config[key])
    return config


def _finish(out: Output, cfg: PrepConfig, tok: TokenizerSpec, tokenizer_path: str,
            sources: list, scans: list[UnitScan], chunks: list[ChunkSpec],
            results: list[ChunkResult], dropped: dict) -> dict:
    """Last shards, token counts and the manifest (returned; the caller writes it)."""
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    for r in results:
        counts += r.counts
    splits = {split: _finish_split(out, split, results, tok, cfg.seq_len, counts)
              for split in SPLITS}
    counts_bytes = npy_bytes(counts)
    out.write_bytes(TOKEN_COUNTS, counts_bytes)
    current = {marker_name(c.index).split("/", 1)[1] for c in chunks}
    for name in out.list(".prep"):  # markers of chunks an earlier config had
        if name.startswith("chunk-") and name not in current:
            out.remove(f".prep/{name}")
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": tok.manifest_entry(),
        "seq_len": cfg.seq_len,
        "dtype": tok.dtype,
        "splits": splits,
        "token_counts": {"file": TOKEN_COUNTS,
                         "sha256": hashlib.sha256(counts_bytes).hexdigest()},
        "sources": _source_entries(sources, scans),
        "dropped": dropped,
        "documents": {"read": int(sum(s.n_items for s in scans)),
                      "kept": sum(splits[s]["documents"] for s in SPLITS),
                      **{s: splits[s]["documents"] for s in SPLITS}},
        "config": _recorded_config(cfg, tokenizer_path),
        "fingerprint": hashlib.sha256(
            "".join(c.fingerprint for c in chunks).encode()).hexdigest(),
    }


def run_prep(cfg: PrepConfig, tokenizer_path: str, *, ray_address: Optional[str] = None,
             workers: Optional[int] = None) -> dict:
    """Prepare shards as ``cfg`` says; returns the manifest (also written last to
    ``<output_dir>/manifest.json``). ``tokenizer_path`` is used unless ``cfg.tokenizer``
    is set (the CLI passes the recipe's ``teacher.path``). ``workers`` overrides
    ``cfg.workers`` (0 = no Ray). A local output folder is locked for the run: a second
    prep into it stops at once (FolderInUseUserError)."""
    started = time.perf_counter()
    if not cfg.output_dir:
        raise PrepError("prep.output_dir is not set; give a folder or an fsspec URL")
    out = Output(cfg.output_dir)
    if out.is_local:
        with FolderLock(out.root, what="prep"):
            return _prep(cfg, tokenizer_path, out, ray_address, workers, started)
    if "memory" not in out.fs.protocol:
        log.info("prep: %s is not a local folder and cannot be locked: start one prep at "
                 "a time into it", redact_url(out.url))
    return _prep(cfg, tokenizer_path, out, ray_address, workers, started)


def _check_codecs(units: list[Unit]) -> None:
    """A .zst / .lz4 file this install cannot decompress is a setup error, whatever
    `on_error` says (it would otherwise be read as binary text)."""
    for unit in units:
        if package := missing_codec(unit.location):
            raise PrepError(f"{unit.label}: reading it needs the Python package "
                            f"`{package}`, which is not installed; fix: `pip install "
                            f"{package}`, or decompress the file")


def _prep(cfg: PrepConfig, tokenizer_path: str, out: Output, ray_address: Optional[str],
          workers: Optional[int], started: float) -> dict:
    tok = load_tokenizer_spec(cfg.tokenizer or tokenizer_path)
    opts = ReadOptions(cfg.doc_split, cfg.text_field, cfg.id_field, cfg.format,
                       cfg.max_line_bytes)
    out.remove(MANIFEST)  # until the new manifest is written the folder is not complete
    for folder in ("train", "validation", ".prep", SPILL_DIR):
        out.remove_stale_temps(folder)
    sources = resolve_sources(list(cfg.sources), opts, cfg.on_error)
    for s in sources:
        if s.error:
            log.warning("prep: skipping source: %s", s.error)
    units = [u for s in sources for u in s.units]
    _check_codecs(units)
    holdout = load_holdout(cfg.holdout)
    workers = cfg.workers if workers is None else workers
    if workers != 0 and "memory" in out.fs.protocol:
        log.info("prep: memory:// output lives in this process only; running without Ray")
        workers = 0
    with executor(workers, ray_address) as ex:
        log.info("prep: %d sources, %d input units, %s", len(sources), len(units),
                 f"{ex.workers} Ray workers" if ex.uses_ray else "in process")
        phase = time.perf_counter()
        spill = cfg.spill_text if cfg.spill_text is not None else out.is_local
        scans = _scan_all(ex, units, (opts, holdout, cfg.docs_per_shard, cfg.on_error,
                                      out.url if spill else None), cfg.progress_every_s)
        scan_seconds, phase = time.perf_counter() - phase, time.perf_counter()
        _log_skipped(scans)
        mark_duplicates(scans)
        base = _fingerprint_base(cfg, tok)
        chunks = plan_chunks(units, scans, cfg.docs_per_shard, cfg.validation_fraction,
                             base)
        ctx = ChunkContext(opts, tok, cfg.seq_len, cfg.min_tokens, cfg.sentence_split,
                           out.url, spill)
        results = _run_chunks(ex, chunks, ctx, out, cfg.progress_every_s)
        out.remove_tree(SPILL_DIR)  # what reused chunks did not need, or a crashed run left
        chunk_seconds = time.perf_counter() - phase
        n_workers = ex.workers if ex.uses_ray else 0
    dropped = dropped_counts(scans)
    dropped["too_short"] = sum(r.too_short for r in results)
    dropped["missing_source"] = sum(1 for s in sources if s.error)
    if not any(r.docs[split] for r in results for split in SPLITS):
        raise PrepError(f"prep: no document left to pack (dropped: "
                        f"{ {k: v for k, v in dropped.items() if v} }); check prep.sources, "
                        f"prep.holdout and prep.min_tokens")
    manifest = _finish(out, cfg, tok, tokenizer_path, sources, scans, chunks, results,
                       dropped)
    manifest["run"] = {"seconds": round(time.perf_counter() - started, 3),
                       "scan_seconds": round(scan_seconds, 3),
                       "chunks_seconds": round(chunk_seconds, 3),
                       "chunk_task_seconds": round(sum(r.seconds for r in results), 3),
                       "task_cpu_seconds": round(sum(r.cpu_seconds for r in results) +
                                                 sum(s.cpu_seconds for s in scans), 3),
                       "workers": n_workers, "chunks": len(chunks),
                       "chunks_reused": sum(r.reused for r in results),
                       "content_tokens": int(sum(r.content_tokens for r in results))}
    out.write_bytes(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    splits = manifest["splits"]
    log.info("prep: %d train / %d validation sequences of %d tokens (%d + %d shards) -> %s",
             splits["train"]["samples"], splits["validation"]["samples"], cfg.seq_len,
             len(splits["train"]["shards"]), len(splits["validation"]["shards"]),
             redact_url(out.url))
    return manifest


__all__ = ["run_prep"]
