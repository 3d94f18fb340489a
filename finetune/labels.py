"""The label set of a task, from its training split, and what happens to evaluation
examples whose label (or, in a token task, one of whose tags) training never saw.

``unseen_labels`` in the task recipe: ``error`` (the default) stops with a message that
names the label and the option; ``drop`` leaves those examples out of the split they are
in; ``count_as_wrong`` keeps them, and since the classifier cannot predict a label it
never learned, each such example (token tasks: each such tag, and the entity it belongs
to) is scored as an error. What happened is recorded in ``TaskData.unseen`` and in
results.json.
"""

from __future__ import annotations

from collections import Counter

from finetune.metrics import is_span_tag
from finetune.tasks import TaskConfig, TaskError

EVAL_SPLITS = ("validation", "test")


def label_values(task: TaskConfig, examples) -> list[str]:
    if task.type == "token_classification":
        return [tag for ex in examples for tag in ex.label]
    return [ex.label for ex in examples]


def check_labels(task: TaskConfig, data) -> None:
    """Set ``data.labels`` (the classes or tags, in id order) and ``data.unseen``; apply
    ``task.unseen_labels`` to the evaluation splits."""
    if task.type == "regression":
        return
    labels = _training_labels(task, data)
    known = set(labels)
    record: dict = {"policy": task.unseen_labels}
    for split in EVAL_SPLITS:
        examples = getattr(data, split)
        if not examples:
            continue
        unseen = Counter(v for v in label_values(task, examples) if v not in known)
        if not unseen:
            continue
        affected = [ex for ex in examples if _has_unseen(task, ex, known)]
        if task.unseen_labels == "error":
            raise TaskError(_unseen_message(task, split, unseen, len(affected), labels))
        record[split] = {"labels": dict(sorted(unseen.items())), "examples": len(affected)}
        if task.unseen_labels == "drop":
            setattr(data, split, [ex for ex in examples if not _has_unseen(task, ex, known)])
    data.labels = labels
    data.unseen = record


def _training_labels(task: TaskConfig, data) -> list[str]:
    seen_in_train = Counter(label_values(task, data.train))
    if task.labels is not None:
        missing = [lab for lab in task.labels if lab not in seen_in_train]
        if missing:
            raise TaskError(f"task {task.name}: label(s) {missing} listed in `labels` never "
                            f"occur in the training split ({len(data.train)} examples); the "
                            f"classifier could not learn them. Add training examples or "
                            f"remove them from `labels`.")
        extra = sorted(set(seen_in_train) - set(task.labels))
        if extra:
            raise TaskError(f"task {task.name}: the training split has label(s) {extra} that "
                            f"are not in `labels` {task.labels}; add them or drop those rows")
        labels = list(task.labels)
    else:
        labels = sorted(seen_in_train)
    if len(labels) < 2:
        raise TaskError(f"task {task.name}: the training split has {len(labels)} distinct "
                        f"label(s) {labels}; a classifier needs at least 2")
    if task.type == "token_classification" and task.metric == "entity_f1" and \
            (plain := [lab for lab in labels if not is_span_tag(lab)]):
        raise TaskError(f"task {task.name}: metric entity_f1 scores BIO spans (O, B-X, I-X), "
                        f"but the tags include {plain[:5]}; set `metric: token_accuracy` "
                        f"for word-class tags such as part of speech")
    return labels


def _has_unseen(task: TaskConfig, example, known: set) -> bool:
    if task.type == "token_classification":
        return any(tag not in known for tag in example.label)
    return example.label not in known


def _unseen_message(task: TaskConfig, split: str, unseen: Counter, n_examples: int,
                    labels: list[str]) -> str:
    lab, n = unseen.most_common(1)[0]
    if task.type == "token_classification":
        count = f"{n} tag(s) in {n_examples} sentence(s)"
    else:
        count = f"{n} example(s)"
    return (f"task {task.name}: unseen label {lab!r} in the {split} split ({count}; all "
            f"unseen: {sorted(unseen)}): it never occurs in training, whose labels are "
            f"{labels}. Set `unseen_labels: drop` (leave those examples out) or "
            f"`unseen_labels: count_as_wrong` (keep them, scored as errors) in the task "
            f"recipe, or task.unseen_labels=drop on the command line; or add training "
            f"examples with it.")
