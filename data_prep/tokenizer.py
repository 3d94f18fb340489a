"""The teacher's fast tokenizer, loaded once on the driver and shipped to workers as its
JSON definition (so workers need no access to the teacher folder)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from data_prep.errors import PrepError


@dataclass(frozen=True)
class TokenizerSpec:
    name_or_path: str
    tokenizer_class: str
    vocab_hash: str
    vocab_size: int
    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int
    unk_id: int
    definition: str = field(repr=False)
    """`tokenizers.Tokenizer` JSON."""

    @property
    def dtype(self) -> str:
        return "uint16" if self.vocab_size <= 1 << 16 else "int32"

    def special_ids(self) -> dict:
        return {"cls": self.cls_id, "sep": self.sep_id, "pad": self.pad_id,
                "mask": self.mask_id, "unk": self.unk_id}

    def manifest_entry(self) -> dict:
        return {"name_or_path": self.name_or_path, "vocab_hash": self.vocab_hash,
                "vocab_size": self.vocab_size, "class": self.tokenizer_class,
                "special_ids": self.special_ids()}


def load_tokenizer_spec(spec: str) -> TokenizerSpec:
    """A tokenizer folder or model asset name -> TokenizerSpec, or a PrepError with a fix."""
    from distill_common.assets import AssetError, resolve_model_dir
    from distill_common.textnorm import vocab_hash

    fix = ("set prep.tokenizer (or teacher.path) to a folder with tokenizer.json or "
           "vocab.txt, or to a model asset such as minilm_l6")
    try:
        folder = resolve_model_dir(spec)
    except AssetError as err:
        raise PrepError(f"prep.tokenizer: {err}; {fix}") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # transformers raises many types for a broken folder
        raise PrepError(f"{folder}: the tokenizer does not load ({type(err).__name__}: "
                        f"{err}); {fix}") from None
    if not getattr(tok, "is_fast", False):
        raise PrepError(f"{folder}: {type(tok).__name__} is not a fast (Rust) tokenizer; "
                        f"add a tokenizer.json; {fix}")
    cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    missing = [n for n, v in [("cls/bos", cls_id), ("sep/eos", sep_id),
                              ("pad", tok.pad_token_id), ("mask", tok.mask_token_id)]
               if v is None]
    if missing:
        raise PrepError(f"{folder}: the tokenizer has no {', '.join(missing)} token; an "
                        f"encoder teacher's tokenizer needs them; {fix}")
    unk = tok.unk_token_id if tok.unk_token_id is not None else tok.pad_token_id
    return TokenizerSpec(str(folder), type(tok).__name__, vocab_hash(tok), len(tok), cls_id,
                         sep_id, tok.pad_token_id, tok.mask_token_id, unk,
                         tok.backend_tokenizer.to_str())


_ENCODERS: dict = {}


def build_encoder(spec: TokenizerSpec):
    """A bare `tokenizers.Tokenizer`: no truncation, no padding, special-token text in
    documents (a literal "[SEP]") tokenized as text so only packing places separators.
    Cached per process: a Ray worker runs many chunks and parsing the JSON takes ~50 ms."""
    key = (spec.vocab_hash, len(spec.definition), hash(spec.definition))
    if key not in _ENCODERS:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(spec.definition)
        tok.no_truncation()
        tok.no_padding()
        tok.encode_special_tokens = True
        _ENCODERS.clear()
        _ENCODERS[key] = tok
    return _ENCODERS[key]
