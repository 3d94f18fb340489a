"""Readers of the named real corpora (fetched with `distill assets fetch`).

Prep uses them as sources and fine-tuning as labelled tasks; both read a document the same
way here, so a held-out document's ``doc_hash`` matches on both sides. Order is
deterministic (sorted), ids are stable.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
from pathlib import Path
from typing import Iterator, NamedTuple

from distill_common.assets import require


class Document(NamedTuple):
    """Immutable; a NamedTuple because prep creates one per document per pass (a frozen
    dataclass costs 4x more to build)."""
    id: str
    """Stable id, e.g. ``bbc_news/business/001``."""
    text: str
    label: str | None = None
    """The class where the corpus has one (bbc_news, wiki_summaries: topic;
    rotten_tomatoes: fresh / rotten). A tagged corpus (oanc_pos) has one tag per word
    of ``text``, both space-separated: the word-list form of a token task."""


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article is cp1252
        return raw.decode("cp1252", errors="replace")


def wiki_summaries() -> Iterator[Document]:
    data = json.loads((require("wiki_summaries") / "summaries_en-us.json").read_text())
    for title in sorted(data):
        entry = data[title]
        text = (entry.get("extract") or "").strip()
        if text:
            yield Document(f"wiki_summaries/{title}", text, entry.get("topic"))


def bbc_news() -> Iterator[Document]:
    root = require("bbc_news")
    for path in sorted(root.glob("*/*.txt")):
        yield Document(f"bbc_news/{path.parent.name}/{path.stem}", _read_text(path).strip(),
                       path.parent.name)


def rotten_tomatoes() -> Iterator[Document]:
    """Review snippets, label ``fresh`` or ``rotten`` (the critic's verdict); the plot
    synopses in the same file are left out."""
    path = require("rotten_tomatoes") / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            text = (row.get("text") or "").strip()
            if row.get("category") in ("fresh", "rotten") and text:
                yield Document(f"rotten_tomatoes/{i}", text, row["category"])


def tagged_words(line: str) -> tuple[list[str], list[str]]:
    """``word/TAG word/TAG ...`` -> (words, tags). A word may hold a slash (the tag is
    after the last one); an ambiguous tag ``VBG|NN`` keeps its first reading."""
    words, tags = [], []
    for item in line.split():
        word, _, tag = item.rpartition("/")
        if not word or not tag:
            raise ValueError(f"{item!r} is not word/TAG")
        words.append(word)
        tags.append(tag.split("|")[0])
    return words, tags


OANC_TAG_FOLDS = {"``": '"', "#": "SYM"}
"""Two tags with 9 uses in 360k words (the corpus tags quotes '"' 6,000 times), folded
into their nearest class so that every seeded split has each tag in training."""


def oanc_pos() -> Iterator[Document]:
    """One sentence per line; text and label are its words and their Penn Treebank
    tags, space-separated (token tasks read both as word lists)."""
    path = require("oanc_tagged") / "tagged-en-oanc.txt"
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                words, tags = tagged_words(line)
            except ValueError as err:
                raise ValueError(f"{path} line {i}: {err}") from None
            tags = [OANC_TAG_FOLDS.get(t, t) for t in tags]
            yield Document(f"oanc_pos/{i}", " ".join(words), " ".join(tags))


def wordnet_glosses() -> Iterator[Document]:
    root = require("wordnet_glosses")
    for pos in ("noun", "verb", "adj", "adv"):
        with open(root / f"data.{pos}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:
                    continue  # license header
                offset = line[:line.index(" ")]
                gloss = line.partition(" | ")[2].strip()
                if gloss:
                    yield Document(f"wordnet_glosses/{pos}/{offset}", gloss)


_DICTD_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _DICTD_B64.index(ch)
    return n


def gcide() -> Iterator[Document]:
    root = require("gcide")
    text = gzip.open(root / "gcide.dict.dz").read()
    seen: set[tuple[int, int]] = set()
    with open(root / "gcide.index", encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or parts[0].startswith("00-database"):
                continue
            start, length = _dictd_number(parts[1]), _dictd_number(parts[2])
            if (start, length) in seen:  # several headwords can share one entry
                continue
            seen.add((start, length))
            body = text[start:start + length].decode("utf-8", errors="replace").strip()
            if body:
                yield Document(f"gcide/{start}", body)


NAMED_CORPORA = {
    "wiki_summaries": wiki_summaries,
    "bbc_news": bbc_news,
    "rotten_tomatoes": rotten_tomatoes,
    "oanc_pos": oanc_pos,
    "wordnet_glosses": wordnet_glosses,
    "gcide": gcide,
}

CORPUS_ASSETS = {"wiki_summaries": "wiki_summaries", "bbc_news": "bbc_news",
                 "rotten_tomatoes": "rotten_tomatoes", "oanc_pos": "oanc_tagged",
                 "wordnet_glosses": "wordnet_glosses", "gcide": "gcide"}
"""The asset each named corpus is read from."""


def iter_documents(name: str) -> Iterator[Document]:
    if name not in NAMED_CORPORA:
        raise KeyError(f"unknown corpus {name!r}; known: {', '.join(NAMED_CORPORA)}")
    return NAMED_CORPORA[name]()


def corpus_files(name: str) -> list[Path]:
    """The files a named corpus is read from (for manifests: names and sizes)."""
    folder = require(CORPUS_ASSETS[name])
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.name not in ("asset.json", "README.txt"))
