"""Inputs: which units of work a recipe's `sources` name.

A *unit* is one input file, one `datasets` folder or one named corpus; ``readers`` reads
its documents. Units are named in messages and the manifest by their ``label``: the path
or URL as found, without the query string or credentials a URL may carry.
"""

from __future__ import annotations

import glob as globlib
import os
from dataclasses import dataclass, field
from typing import Optional

from data_prep.errors import PrepError
from data_prep.lines import COMPRESSED_SUFFIXES, io_errors
from distill_common.urls import redact_url

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
HF_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")

SKIP_HINT = "or set prep.on_error=skip to skip and count it"


@dataclass(frozen=True)
class Unit:
    kind: str
    """`corpus`, `text`, `jsonl`, `parquet` or `hf_disk`."""
    location: str
    """Corpus name, local path or fsspec URL."""
    label: str
    """How ids and messages name it: the path as found, a URL without its query string
    and credentials (see distill_common.urls)."""


@dataclass
class Source:
    spec: str
    """The entry of `prep.sources` as written (record it with redact_url)."""
    units: list[Unit]
    files: list[dict] = field(default_factory=list)
    """[{"path": str, "bytes": int}] for the manifest (paths redacted)."""
    error: Optional[str] = None
    """Why it has no units (on_error=skip), for the manifest."""


@dataclass(frozen=True)
class ReadOptions:
    doc_split: str = "line"
    text_field: str = "text"
    id_field: Optional[str] = "id"
    format: str = "auto"
    max_line_bytes: int = 16 << 20
    """A longer line (or blank-line block, or Parquet text) is bad input (`too_long`)."""


# ---------------------------------------------------------------- resolving sources

def _is_named_corpus(spec: str) -> bool:
    from distill_common.corpora import NAMED_CORPORA

    return spec in NAMED_CORPORA


def _kind_of(path: str, fmt: str) -> Optional[str]:
    """File kind by `format`, or by extension for `auto`; None = not an input file."""
    if fmt != "auto":
        return fmt
    name = path.lower()
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def _is_hidden(path: str) -> bool:
    return any(part.startswith((".", "_")) for part in path.replace("\\", "/").split("/")
               if part not in ("", ".", ".."))


def _named_source(spec: str) -> Source:
    from distill_common.assets import AssetError
    from distill_common.corpora import corpus_files

    try:
        files = [{"path": str(p), "bytes": p.stat().st_size} for p in corpus_files(spec)]
    except AssetError as err:
        raise PrepError(f"prep.sources: {err}") from None
    return Source(spec, [Unit("corpus", spec, spec)], files)


def resolve_source(spec: str, opts: ReadOptions) -> Source:
    """One `prep.sources` entry -> its units, in sorted (deterministic) order."""
    import fsspec

    if _is_named_corpus(spec):
        return _named_source(spec)
    fs, path = fsspec.core.url_to_fs(spec)
    is_url = "://" in spec

    def location(p: str) -> str:
        return fs.unstrip_protocol(p) if is_url else p

    if globlib.has_magic(path):
        matches = sorted(p for p in fs.glob(path)  # like a shell: no hidden files
                         if not p.rsplit("/", 1)[-1].startswith(".") and fs.isfile(p))
        if not matches:
            raise PrepError(f"prep.sources: {spec!r} matches no file; check the pattern")
        candidates, explicit = matches, True
    elif not fs.exists(path):
        raise PrepError(f"prep.sources: {spec!r} does not exist; give a named corpus "
                        f"(wiki_summaries, bbc_news, wordnet_glosses, gcide), a file, a "
                        f"folder, a glob or an fsspec URL")
    elif fs.isdir(path):
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
        if names & set(HF_DISK_MARKERS):
            return Source(spec, [Unit("hf_disk", location(path), redact_url(spec))],
                          [{"path": redact_url(location(path)), "bytes": fs.du(path)}])
        found = sorted(fs.find(path))
        candidates = [p for p in found if not _is_hidden(os.path.relpath(p, path))]
        explicit = False
    else:
        candidates, explicit = [path], True
    units, files = [], []
    for p in candidates:
        kind = _kind_of(p, opts.format) or ("text" if explicit else None)
        if kind is None:
            continue  # a README or index file inside a corpus folder
        label = redact_url(location(p))
        units.append(Unit(kind, location(p), label))
        files.append({"path": label, "bytes": fs.size(p)})
    if not units:
        raise PrepError(f"prep.sources: {spec!r} holds no input file (.txt, .jsonl, "
                        f".parquet, optionally compressed); set prep.format to read other "
                        f"extensions")
    return Source(spec, units, files)


def resolve_sources(specs: list[str], opts: ReadOptions, on_error: str = "raise") -> list[Source]:
    """All sources; with ``on_error="skip"`` one that cannot be resolved (missing path,
    empty glob) becomes a Source without units and its ``error`` is kept."""
    sources = []
    for spec in specs:
        try:
            try:
                sources.append(resolve_source(spec, opts))
            except (ImportError, *io_errors()) as err:  # storage, network, a missing fsspec
                # backend (s3fs, gcsfs), an unknown protocol
                raise PrepError(f"prep.sources: {spec}: cannot list or read it "
                                f"({type(err).__name__}: {err}); check the path or URL, "
                                f"its credentials and the fsspec package for it") from None
        except PrepError as err:
            if on_error == "raise":
                raise
            sources.append(Source(spec, [], error=str(err)))
    return sources
