"""Two notes of the report in markdown: how each model's pooler starts fine-tuning (a
fresh one in a student and a trained one in the teacher make an unequal start; fresh in
both, an equal one), and how the distillation went (the final held-out MLM accuracy and
agreement, and the curves' plot)."""

from __future__ import annotations


def _starts(report: dict) -> dict[str, set]:
    """model -> the pooler starts of its task models (fresh / trained), where the task
    model reads a pooler at all."""
    return {name: {e.get("pooler") for e in row["tasks"].values()} & {"fresh", "trained"}
            for name, row in report["models"].items()}


def pooler_lines(report: dict) -> list[str]:
    starts = _starts(report)
    fresh = [n for n, s in starts.items() if "fresh" in s]
    trained = [n for n, s in starts.items() if "trained" in s]
    exported_without = [n for n, row in report["models"].items()
                        if row.get("export", {}).get("fresh_pooler_only_in_student")]
    if not fresh and not exported_without:
        return []
    lines = ["", "## Fine-tuning start", ""]
    if fresh and not trained:
        lines.append(f"Every model compared ({', '.join(fresh)}) starts fine-tuning with a "
                     f"fresh (random) pooler: they start alike.")
    elif fresh:
        lines.append(f"Fine-tuning starts unequal: {', '.join(fresh)} start(s) with a fresh "
                     f"(random) pooler, {', '.join(trained)} with a trained one; the gap "
                     f"includes what a trained pooler is worth.")
    for name in exported_without:
        note = report["models"][name]["export"].get("note")
        lines.append(f"- {name}: exported without the teacher's pooler, which the teacher "
                     f"has" + (f" ({note})" if note else "") + ".")
    return lines


def distillation_lines(report: dict) -> list[str]:
    curves = report.get("distillation") or {}
    if not curves:
        return []
    lines = ["", "## Distillation", "",
             "From each distilled model's pretraining metrics.jsonl: the objective parts "
             "(unweighted) and the total, and on held-out shards the student's MLM "
             "accuracy and its agreement with the teacher.", "",
             "| model | steps | final total loss | MLM accuracy | agreement |",
             "|---|---|---|---|---|"]
    for name, c in curves.items():
        series = c["series"]

        def last(tag, spec=".3f"):
            return f"{series[tag][-1][1]:{spec}}" if series.get(tag) else "-"
        steps = max((pts[-1][0] for pts in series.values() if pts), default=0)
        lines.append(f"| {name} | {steps} | {last('train/total', '.4f')} | "
                     f"{last('eval/mlm_accuracy')} | {last('eval/agreement')} |")
    plots = [p for p in report.get("plots", []) if p.startswith("distillation_")]
    return lines + [""] + [f"![{p}]({p})" for p in plots]
