"""Examples -> token ids once per split; batches padded only to their own longest row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from finetune.data import Example
from finetune.tasks import TaskConfig

IGNORE = -100  # HF convention: positions the loss skips


@dataclass
class EncodedSplit:
    features: list[dict[str, list[int]]]
    """Per example: input_ids, attention_mask (+ token_type_ids when the tokenizer has
    them), unpadded."""
    targets: list
    """Per example: class id, float target, or per-token tag ids (IGNORE off first
    sub-words and special tokens). A label training never saw (only in an evaluation
    split, under unseen_labels: count_as_wrong) is IGNORE too: targets of evaluation
    splits are never trained on."""
    word_starts: Optional[list[list[int]]] = None
    """Token tasks: for each word, the position of its first sub-word (truncated words
    are absent)."""
    n_words: Optional[list[int]] = None
    """Token tasks: words per example (predictions are padded back to this length)."""

    def __len__(self) -> int:
        return len(self.features)

    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) for f in self.features]


def encode_split(tokenizer, task: TaskConfig, examples: Sequence[Example],
                 labels: Optional[list[str]], max_length: int) -> EncodedSplit:
    keys = ["input_ids", "attention_mask"] + \
        (["token_type_ids"] if "token_type_ids" in tokenizer.model_input_names else [])
    if task.type == "token_classification":
        enc = tokenizer([ex.text for ex in examples], is_split_into_words=True,
                        truncation=True, max_length=max_length)
        label_id = {lab: i for i, lab in enumerate(labels)}
        targets, starts = [], []
        for i, ex in enumerate(examples):
            tags = [IGNORE] * len(enc["input_ids"][i])
            firsts: list[int] = []
            previous = None
            for pos, word in enumerate(enc.word_ids(i)):
                if word is not None and word != previous:
                    tags[pos] = label_id.get(ex.label[word], IGNORE)
                    firsts.append(pos)
                previous = word
            targets.append(tags)
            starts.append(firsts)
        n_words = [len(ex.text) for ex in examples]
    else:
        pairs = [ex.text_pair for ex in examples] if task.type == "pair_classification" \
            else None
        enc = tokenizer([ex.text for ex in examples], pairs, truncation=True,
                        max_length=max_length)
        starts = n_words = None
        if task.type == "regression":
            targets = [float(ex.label) for ex in examples]
        else:
            label_id = {lab: i for i, lab in enumerate(labels)}
            targets = [label_id.get(ex.label, IGNORE) for ex in examples]
    features = [{k: enc[k][i] for k in keys if k in enc} for i in range(len(examples))]
    return EncodedSplit(features, targets, starts, n_words)


def collate(split: EncodedSplit, indices: Sequence[int], pad_id: int,
            with_targets: bool = True) -> dict[str, torch.Tensor]:
    """A (batch, longest-in-batch) padded batch; attention_mask 0 on padding."""
    rows = [split.features[i] for i in indices]
    width = max(len(r["input_ids"]) for r in rows)
    batch = {}
    for key in rows[0]:
        fill = pad_id if key == "input_ids" else 0
        batch[key] = torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows],
                                  dtype=torch.long)
    if with_targets:
        targets = [split.targets[i] for i in indices]
        if isinstance(targets[0], list):  # token tags: (batch, width)
            batch["labels"] = torch.tensor([t + [IGNORE] * (width - len(t)) for t in targets],
                                           dtype=torch.long)
        elif isinstance(targets[0], float):
            batch["labels"] = torch.tensor(targets, dtype=torch.float32)
        else:
            batch["labels"] = torch.tensor(targets, dtype=torch.long)
    return batch
