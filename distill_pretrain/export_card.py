"""The exported student's model card (README.md), written with huggingface_hub's
ModelCard: metadata a Hub page and its search read (``base_model``, ``license``,
``library_name``, ``pipeline_tag``, ``tags``), then what a user needs to trust the model:
its teacher, the objective in words, the data by source name with counts, the final
evaluation, size and speed.

It is meant to be published: no local paths, no file lists (a corpus of thousands of
files is one line per source, and at most MAX_SOURCES sources), URLs without their
credentials or query strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

MAX_SOURCES = 20

OBJECTIVE_WORDS = {
    "logit_kl": "KL divergence between the teacher's and the student's masked-LM "
                "distributions at temperature {temperature}, scaled by T² (DistilBERT's "
                "soft targets)",
    "mlm": "the student's own masked-LM cross-entropy",
    "hidden_cosine": "cosine distance between the hidden states of student layer "
                     "{student_layer} and teacher layer {teacher_layer} (DistilBERT)",
    "hidden_mse": "MSE between hidden states through a learned projection, {layer_map} "
                  "layer map (TinyBERT)",
    "attention_score_mse": "MSE between attention scores, {layer_map} layer map (TinyBERT)",
    "embedding_mse": "MSE between the embedding outputs through a learned projection "
                     "(TinyBERT)",
    "attention_kl": "KL divergence between self-attention distributions per head, student "
                    "layer {student_layer} vs teacher layer {teacher_layer} (MiniLM)",
    "value_relation_kl": "KL divergence between value relations softmax(VVᵀ/√d), student "
                         "layer {student_layer} vs teacher layer {teacher_layer} (MiniLM)",
    "qkv_relation_kl": "KL divergence between {relations} self-attention relations over "
                       "{relation_heads} relation heads, student layer {student_layer} vs "
                       "teacher layer {teacher_layer} (MiniLMv2)",
    "pooled_embedding": "{loss} loss between mean-pooled span embeddings ({span} positions "
                        "each, 0: whole sequence) of student layer {student_layer} and "
                        "teacher layer {teacher_layer} (sentence-embedding distillation)",
}


@dataclass
class CardFacts:
    """Everything the card says, gathered by the export."""
    name: str
    model_class: str
    layers: int
    hidden: int
    heads: int
    parameters: int
    size_bytes: int
    teacher_name: str
    """The Hub id when the teacher is on the Hub, else its asset or folder name."""
    teacher_on_hub: bool
    teacher_revision: Optional[str]
    teacher_layers: Optional[int]
    teacher_hidden: Optional[int]
    teacher_parameters: Optional[int]
    license: Optional[str]
    heads_plan: dict
    """HeadPlan.record()."""
    sentence_transformers: dict
    run_info: dict
    onnx_files: list[str] = field(default_factory=list)
    speed: dict = field(default_factory=dict)
    """Speed-up over the teacher by setting (``cpu_b1``...), from a report, when known."""


def source_name(spec: str) -> str:
    """A prep source as it may be published: named corpora as they are, URLs without
    userinfo, query or fragment, local paths reduced to their last part (a glob keeps
    the folder it is in)."""
    if "://" in spec:
        parts = urlsplit(spec)
        return urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))
    path = PurePosixPath(spec.replace("\\", "/"))
    parts = [p for p in path.parts if p not in ("/", "~")]
    globbed = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), None)
    if globbed is None:
        return parts[-1] if parts else spec
    return "/".join(parts[max(0, globbed - 1):])


def hub_dataset(spec: str) -> Optional[str]:
    """``hf://datasets/org/name/...`` -> ``org/name`` (the card's ``datasets`` entry)."""
    if not spec.startswith("hf://datasets/"):
        return None
    parts = spec[len("hf://datasets/"):].split("/")
    return "/".join(parts[:2]).split("@")[0] if len(parts) >= 2 else None


def pipeline_tag(facts: CardFacts) -> str:
    if facts.sentence_transformers.get("written"):
        return "sentence-similarity"
    return "fill-mask" if facts.heads_plan["mlm_head"] == "trained" else "feature-extraction"


def _objective_lines(objective: dict) -> list[str]:
    lines = []
    for name, section in objective.items():
        values = {k: v for k, v in (section or {}).items()}
        if "relations" in values:
            values["relations"] = ", ".join(f"{r[0].upper()}-{r[1].upper()}"
                                            for r in values["relations"])
        words = OBJECTIVE_WORDS.get(name, name).format_map(_Default(values))
        lines.append(f"- `{name}` (weight {values.get('weight', 1.0):g}): {words}")
    return lines


class _Default(dict):
    def __missing__(self, key):
        return "?"


def _data_lines(manifest: dict) -> list[str]:
    sources = manifest.get("sources") or []
    lines = ["| source | documents |", "| --- | --- |"]
    for entry in sources[:MAX_SOURCES]:
        spec = entry.get("source", "?") if isinstance(entry, dict) else str(entry)
        docs = entry.get("documents") if isinstance(entry, dict) else None
        lines.append(f"| {source_name(str(spec))} | {_count(docs)} |")
    if len(sources) > MAX_SOURCES:
        rest = sources[MAX_SOURCES:]
        docs = sum(e.get("documents") or 0 for e in rest if isinstance(e, dict))
        lines.append(f"| {len(rest)} more sources | {_count(docs)} |")
    lines.append("")
    for split, s in (manifest.get("splits") or {}).items():
        lines.append(f"- {split}: {_count(s.get('samples'))} sequences of "
                     f"{manifest.get('seq_len', '?')} tokens, {_count(s.get('tokens'))} "
                     f"tokens")
    return lines


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _usage_lines(facts: CardFacts) -> list[str]:
    lines = ["```python", "from transformers import AutoModel, AutoTokenizer", "",
             'model = AutoModel.from_pretrained("PATH_OR_HUB_ID")',
             'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_HUB_ID")']
    if facts.sentence_transformers.get("written"):
        lines += ["", "from sentence_transformers import SentenceTransformer", "",
                  'embeddings = SentenceTransformer("PATH_OR_HUB_ID").encode(["A sentence."])']
    if facts.onnx_files:
        lines += ["", "import onnxruntime  # ONNX Runtime, CPU",
                  f'session = onnxruntime.InferenceSession("{facts.onnx_files[0]}")',
                  'last_hidden_state = session.run(None, dict(tokenizer(["A sentence."], '
                  'return_tensors="np")))[0]']
    return lines + ["```"]


def _size_lines(facts: CardFacts) -> list[str]:
    lines = [f"- parameters: {facts.parameters / 1e6:.2f}M "
             f"({facts.size_bytes / 2**20:.1f} MiB of fp32 weights)"]
    if facts.teacher_parameters:
        lines.append(f"- teacher: {facts.teacher_parameters / 1e6:.2f}M parameters, "
                     f"{facts.teacher_parameters / facts.parameters:.2f}x the student")
    for setting, value in sorted(facts.speed.items()):  # "cpu_b32": 1.94
        where, _, batch = setting.partition("_b")
        lines.append(f"- speed-up over the teacher ({where.upper()}, batch {batch}): "
                     f"{value:.2f}x")
    if facts.onnx_files:
        lines.append(f"- ONNX: {', '.join(f'`{f}`' for f in facts.onnx_files)}")
    return lines


def card_body(facts: CardFacts) -> str:
    info = facts.run_info
    recipe = info.get("recipe", {})
    objective = {k: v for k, v in (recipe.get("objective") or {}).items() if v is not None}
    train = recipe.get("train", {})
    teacher = f"[{facts.teacher_name}](https://huggingface.co/{facts.teacher_name})" \
        if facts.teacher_on_hub else f"`{facts.teacher_name}`"
    at = f" (revision `{facts.teacher_revision[:12]}`)" if facts.teacher_revision else ""
    plan, st = facts.heads_plan, facts.sentence_transformers
    lines = [f"# {facts.name}", "",
             f"A {facts.layers}-layer, {facts.hidden}-wide, {facts.heads}-head "
             f"`{facts.model_class}` distilled task-agnostically from {teacher}{at} "
             f"({facts.teacher_layers or '?'} layers x {facts.teacher_hidden or '?'}) with "
             f"distill-encoders. Fine-tune it as you would its teacher.", "",
             "## Usage", "", *_usage_lines(facts), "",
             "## What the folder holds", "",
             f"- masked-LM head: {_mlm_words(plan['mlm_head'])}",
             f"- pooler: {plan['note']}"]
    if st.get("written"):
        lines.append(f"- sentence-transformers: the teacher's {st['pooling']} pooling"
                     + (" and L2 normalisation" if st.get("normalize") else ""))
    elif st.get("reason"):
        lines.append(f"- sentence-transformers: not carried over ({st['reason']})")
    lines += ["", "## Objective", "", *_objective_lines(objective), "",
              "## Training data", "", *_data_lines(info.get("manifest") or {}), "",
              "## Training", "",
              f"- {info.get('step', '?')} steps ({info.get('skipped_steps', 0)} skipped as "
              f"non-finite), {_count(info.get('samples'))} sequences, "
              f"{_count(info.get('tokens'))} tokens",
              f"- {info.get('precision', '?')}, {info.get('world_size', '?')} process(es), "
              f"micro-batch {train.get('micro_batch_size', '?')} x gradient accumulation "
              f"{train.get('grad_accum_steps', 1)}, peak learning rate {train.get('lr', '?')}, seed "
              f"{recipe.get('seed', '?')}", "",
              "## Final evaluation (held-out validation shards)", ""]
    final = {k: v for k, v in (info.get("final_eval") or {}).items()
             if plan["mlm_head"] != "none" or "mlm" not in k}
    lines += ["| metric | value |", "| --- | --- |",
              *[f"| {k} | {v:.4f} |" for k, v in sorted(final.items())]] if final \
        else ["(not recorded)"]
    lines += ["", "## Size and speed", "", *_size_lines(facts), "", "## License", "",
              f"{facts.license or 'Not stated by the teacher'}; the teacher's terms apply.", ""]
    return "\n".join(lines)


def _mlm_words(state: str) -> str:
    return {"trained": "trained by the objective (`AutoModelForMaskedLM` loads it)",
            "teacher": "copied from the teacher, not trained (`AutoModelForMaskedLM` loads "
                       "it)",
            "none": "none was trained, so none is saved (`AutoModelForMaskedLM` would start "
                    "one at random)"}[state]


def model_card(facts: CardFacts) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    objective = [k for k, v in (facts.run_info.get("recipe", {}).get("objective") or {})
                 .items() if v is not None]
    st = facts.sentence_transformers.get("written")
    sources = [(e.get("source") if isinstance(e, dict) else str(e))
               for e in (facts.run_info.get("manifest") or {}).get("sources") or []]
    datasets = sorted({d for d in map(hub_dataset, map(str, sources)) if d})
    data = ModelCardData(
        base_model=facts.teacher_name, license=facts.license,
        library_name="sentence-transformers" if st else "transformers",
        pipeline_tag=pipeline_tag(facts), datasets=datasets or None,
        tags=["distillation", "task-agnostic-distillation", *objective]
        + (["sentence-transformers"] if st else []) + (["onnx"] if facts.onnx_files else []))
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(facts)}"))


def teacher_license(folder: Optional[Path], fallback: Optional[str]) -> Optional[str]:
    """The ``license`` of the teacher's README front matter, else ``fallback`` (an
    asset's license), as a lower-case Hub licence id."""
    readme = Path(folder) / "README.md" if folder else None
    if readme is not None and readme.is_file():
        from huggingface_hub import ModelCard

        try:
            found = ModelCard.load(readme).data.license
        except (ValueError, OSError):  # a README without valid front matter
            found = None
        if found:
            return str(found).lower()
    return fallback.lower() if fallback and " " not in fallback else None


def report_speed(report_path: Optional[Path], model_dir: Path) -> dict:
    """``{"cpu_b1": 1.9, ...}``: the speed-ups a `distill report` measured for the model
    at ``model_dir`` (matched by path), or {}."""
    if report_path is None:
        return {}
    report = json.loads(Path(report_path).read_text())
    want = Path(model_dir).resolve()
    for row in (report.get("models") or {}).values():
        if row.get("path") and Path(row["path"]).resolve() == want:
            return dict(row.get("speedup") or {})
    return {}
