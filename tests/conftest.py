"""Shared fixtures: a tiny WordPiece tokenizer, tiny BERT teachers (with and without an
MLM head) and a small text corpus, all built in code. No network, no hub."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest

from distill_common.build_cache import extensions_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The bf16 paths stay under test on a CPU without native bf16 (tiny models: the emulated
# matmuls cost little), where a real run would fall back to fp32.
os.environ.setdefault("DISTILL_CPU_BF16", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# DeepSpeed's compiled ops are built once per machine (under the default DISTILL_CACHE),
# not once per test that gives itself a private DISTILL_CACHE (a minute or two each).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))

REPO = Path(__file__).resolve().parent.parent

WORDS = """the of and to in is was for on that with as by at from his her it an were are
which this be or has had not but their its first also after new one two three year years
people city world war state time school team game music film book river king church house
century government party country history water light small large early late north south
east west part known called used during between made many most other such some these than
when where while would there they them into over only about more under both each because
being through before since against without around among still however same several well
""".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_vocab() -> list[str]:
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"()-")
    return SPECIALS + sorted(set(WORDS)) + chars + [f"##{c}" for c in chars[:36]]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(5, 14)
        out.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from transformers import BertTokenizer

    d = tmp_path_factory.mktemp("tiny_tokenizer")
    vocab = d / "vocab.txt"
    vocab.write_text("\n".join(tiny_vocab()) + "\n")
    # transformers 5.x: BertTokenizer is the fast (tokenizers) class and takes `vocab`
    # (a path or dict); `vocab_file=` is silently ignored and leaves 5 special tokens.
    tok = BertTokenizer(vocab=str(vocab), do_lower_case=True, model_max_length=512)
    assert len(tok) == len(tiny_vocab()), len(tok)
    tok.save_pretrained(d)
    return d


def _save_tiny_bert(folder: Path, tokenizer_dir: Path, with_head: bool, layers: int = 4,
                    hidden: int = 64, heads: int = 4, seed: int = 0) -> Path:
    import torch
    from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, BertModel)

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=hidden * 2,
                     max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    model = BertForMaskedLM(cfg) if with_head else BertModel(cfg, add_pooling_layer=False)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """BertForMaskedLM, 4 layers x 64, 4 heads, with an MLM head."""
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny_teacher"), tokenizer_dir, True)


@pytest.fixture(scope="session")
def tiny_teacher_nohead_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """BertModel (no MLM head), 4 layers x 64: like the real MiniLM / MPNet assets."""
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny_teacher_nohead"), tokenizer_dir,
                           False)


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory) -> Path:
    """Three text files, one document per blank-line-separated block."""
    d = tmp_path_factory.mktemp("tiny_corpus")
    rng = random.Random(1)
    for i in range(3):
        docs = []
        for j in range(40):
            docs.append(" ".join(sentences(rng.randint(1, 8), seed=i * 1000 + j)))
        (d / f"part-{i}.txt").write_text("\n\n".join(docs) + "\n")
    return d


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """A private DISTILL_CACHE so asset tests never touch the user's cache."""
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# Under xdist (`TEST_WORKERS=2 make test`: -n 2 --dist loadfile) a test file stays on one
# worker, so its module fixtures (a Ray head, a Slurm cluster, a reference run) are built
# once; the files that start a Ray cluster count as one file, so two never run at once.
_RUN_TOGETHER = {"test_launch_ray.py": "ray", "test_prep_ray.py": "ray"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FilesAndGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return _RUN_TOGETHER.get(path.rsplit("/", 1)[-1], path)

    return FilesAndGroups(config, log)


def pytest_collection_modifyitems(config, items):
    """GPU-only tests skip with a reason where no GPU is visible; they never fail on CPU."""
    import torch

    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu":
        return
    why = ("needs a CUDA GPU (torch.cuda.is_available() is False)"
           if not torch.cuda.is_available() else "DS_ACCELERATOR=cpu keeps this run on the CPU")
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
