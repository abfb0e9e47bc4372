"""``report.md`` and its PNG plots: the candidate table, size vs accuracy, per-layer sparsity."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgekit.artifacts.results import ArtifactResult, CandidateResult, CompressResult


def candidate_rows(result: CompressResult) -> list[dict[str, Any]]:
    """One row per (candidate, artifact), or per failed candidate."""
    rows = []
    for cand in result.candidates:
        chosen = cand is result.selected
        if cand.error is not None:
            rows.append({"recipe": cand.recipe.name, "format": "-", "error": cand.error, "selected": False,
                         "within_budget": cand.within_budget})
            continue
        for art in cand.artifacts:
            rows.append({"recipe": cand.recipe.name, "format": art.format.value, "bytes": art.bytes,
                         "gzip_bytes": art.gzip_bytes, "accuracy": art.accuracy, "drop": art.accuracy_drop,
                         "agreement": art.top1_agreement, "max_abs_diff": art.max_abs_diff,
                         "latency_us": art.latency_us, "speed": speed_text(art),
                         "within_budget": cand.within_budget, "selected": chosen, "error": None})
        for fmt, error in cand.format_errors.items():  # this format failed; the others above were written
            rows.append({"recipe": cand.recipe.name, "format": fmt, "error": f"{fmt} not written: {error}",
                         "selected": False, "within_budget": None})
    return rows


def speed_text(art: ArtifactResult) -> str:
    """Time relative to the float32 artifact in the same runtime: ``0.62x`` or ``1.40x SLOWER``."""
    ratio = art.time_vs_float32
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x SLOWER" if art.slower_than_float32 else f"{ratio:.2f}x"


def slower_notes(candidate: CandidateResult) -> list[str]:
    """One line per artifact of ``candidate`` that runs slower than the float32 artifact in the same runtime or
    is larger than it."""
    lines = []
    for a in candidate.artifacts:
        larger = (f"larger ({a.bytes:,} vs {a.float32_bytes:,} bytes)" if a.larger_than_float32 else "")
        if a.slower_than_float32:
            medians = f"{a.latency_us:.0f} vs {a.float32_latency_us:.0f} µs per sample"
            how = (f"timed side by side; medians measured apart: {medians}" if a.float32_time_ratio is not None
                   else medians)  # the ratio is the side-by-side blocks' where there are any, not the medians'
            lines.append(f"{a.format.value} {a.quantization.value} runs {a.time_vs_float32:.2f}x "
                         f"the time of the float32 {a.format.value} in {a.runtime} ({how}): it is "
                         + (f"{larger} and slower" + _left_float(a) if larger else "smaller, not faster"))
        elif larger:
            lines.append(f"{a.format.value} {a.quantization.value} is {larger} than the float32 {a.format.value}"
                         + _left_float(a) + _smaller_rung_not_kept(a))
    return lines


def _left_float(art: ArtifactResult) -> str:
    """The weights an int8 ``.onnx`` still holds float, by op type (what onnxruntime's quantizers have no rule
    for, e.g. GRU), or ""."""
    from edgekit.config import Format, Quantization

    if art.format is not Format.ONNX or art.quantization is not Quantization.INT8:
        return ""
    from google.protobuf.message import DecodeError

    from edgekit.export.onnx import float_weights

    try:
        left = float_weights(art.data)
    except DecodeError:  # not an ONNX graph (the report's own tests pass placeholder bytes)
        return ""
    if not left:
        return ""
    ops = ", ".join(f"{op} ({count:,})" for op, count in sorted(left.items(), key=lambda kv: -kv[1]))
    return f": onnxruntime's int8 left these weights float: {ops}"


def _smaller_rung_not_kept(art: ArtifactResult) -> str:
    """Why the smallest size rung that beat float32's bytes was not kept, or ""."""
    from edgekit.export.remedies import SLOWER

    rungs = [(v["bytes"], name, v) for name, v in art.size_tried.items()
             if "time" in v and art.float32_bytes is not None and v["bytes"] < art.float32_bytes]
    if not rungs:
        return ""
    size, name, tried = min(rungs)
    why = f"{tried['time']:.2f}x its time" if tried["time"] > SLOWER else f"{tried['drop']:+.2f} points"
    return f"; size rung {name} measured {size:,} bytes but was not kept at {why}"


def _default_outcome(score: float) -> str:
    return (f"lost {score:.2f} points with the quantizer's defaults" if math.isfinite(score)
            else "with the quantizer's defaults did not run in its runtime")


def remedy_notes(candidate: CandidateResult) -> list[str]:
    """One line per artifact of ``candidate`` that needed an int8 remedy to stay within the budget or to be faster,
    or that a size rung made smaller."""
    from edgekit.export.remedies import SIZE_RUNG_WORDS

    wide = "; 16-bit activations have no fast CPU kernels: for 8-bit speed try quantization-aware training (the " \
        "qat recipe)"
    lines = [f"{a.format.value} int8 {_default_outcome(a.remedies_tried['default'])}; "
             f"kept with remedy {a.remedy}, which loses {a.accuracy_drop:.2f}"
             + (wide if a.quantizer_options.get("activations") == "int16" else "")
             for a in candidate.artifacts if a.remedy]
    lines += [f"{a.format.value} int8 ran slower than float32; kept with {a.speed_remedy}, "
              f"{a.speed_tried[a.speed_remedy]:.2f}x the time" for a in candidate.artifacts if a.speed_remedy]
    return lines + [f"{a.format.value} int8 kept with {SIZE_RUNG_WORDS[a.size_remedy][0]}, "
                    f"{a.size_tried[a.size_remedy]['saved']:,} bytes smaller: {SIZE_RUNG_WORDS[a.size_remedy][1]}"
                    for a in candidate.artifacts if a.size_remedy]


def num(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _selected_lines(selected: CandidateResult) -> list[str]:
    """The selected candidate's notes, the layers a technique left alone, and its per-layer sparsity."""
    lines = []
    notes = [f"- {a.format.value}: {n}" for a in selected.artifacts for n in a.notes]
    notes += [f"- **{line}**" for line in slower_notes(selected)]
    if notes:
        lines += ["", "## Notes", "", *notes]
    skipped = [(t, k, v) for t, layers in selected.skipped_layers.items() for k, v in layers.items()]
    if skipped:
        lines += ["", "## Layers a technique left as they were", "", "| technique | layer | why |", "|---|---|---|"]
        lines += [f"| {t} | {k} | {v} |" for t, k, v in skipped]
    if selected.recipe.prunes and selected.layer_sparsity:  # nothing to show otherwise
        lines += ["", "## Per-layer sparsity (fraction of zero weights)", "", "| layer | sparsity |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in selected.layer_sparsity.items()]
    return lines


def write_report(result: CompressResult, folder: Path) -> None:
    """Write ``report.md`` plus ``size_vs_accuracy.png`` and, when pruned, ``sparsity.png``."""
    plots = []
    if _plot_size_accuracy(result, folder / "size_vs_accuracy.png"):
        plots.append(("Size vs accuracy of every candidate", "size_vs_accuracy.png"))
    if result.selected is not None and result.selected.recipe.prunes and result.selected.layer_sparsity:
        _plot_sparsity(result.selected.layer_sparsity, folder / "sparsity.png")
        plots.append(("Per-layer sparsity of the selected model", "sparsity.png"))
    src = result.source
    lines = ["# edgekit compression report", "",
             f"- source: `{src['path']}` ({src['format']}), {src['params']:,} parameters, "
             f"accuracy {src['accuracy']:.2f}% on {result.data_info['evaluation']} evaluation samples",
             f"- data: {result.data_info['name']}, {result.data_info['samples']} samples, labels: "
             f"{result.data_info['labels']}; split (seed {result.data_info['seed']}): fine-tune "
             f"{result.data_info['finetune']}, calibration {result.data_info['calibration']}, "
             f"evaluation {result.data_info['evaluation']}"
             + (f" ({result.data_info['evaluation_data']})" if "evaluation_data" in result.data_info else "")]
    if src.get("rebuild_max_abs_diff") is not None:
        lines.append("- Keras 3 model rebuilt as tf-keras; max abs output difference "
                     f"{src['rebuild_max_abs_diff']:.2g}")
    budget = result.budget
    lines.append(f"- accuracy budget: {budget.describe()}"
                 + (f"; smallest by {result.config.select_by.value}" if budget.against_source else " (the default)"))
    if result.selected is not None:
        lines.append(f"- **selected: {result.selected.recipe.name}**")
    elif any(c.within_budget is False for c in result.candidates):
        lines.append("- **no candidate met the budget**: nothing was exported")
    lines += _noise_lines(result)
    lines += [f"- **warning**: {line}" for line in result.warnings]
    lines += ["", "Accuracy and agreement are measured by running each artifact in its own runtime "
              "(ai-edge-litert for .tflite, onnxruntime for .onnx).", "", "## Candidates", "",
              "| recipe | format | bytes | gzip bytes | accuracy % (95% interval) | drop (points, 95% margin) "
              "| top-1 agreement % "
              "| max abs diff | µs / sample | vs float32 time | budget | selected |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for fmt, size in result.reference.items():
        lines.append(f"| float32 (source, reference) | {fmt} | {size['bytes']:,} | {size['gzip_bytes']:,} | "
                     f"{result.source['accuracy']:.2f} | | | | {size.get('latency_us', 0):.0f} | 1.00x | | |")
    for r in candidate_rows(result):
        budget = {True: "ok", False: "over", None: "-"}[r["within_budget"]]
        if r["error"]:
            lines.append(f"| {r['recipe']} | {r['format']} | - | - | - | - | - | - | - | - | failed: {r['error']} | |")
            continue
        lines.append(f"| {r['recipe']} | {r['format']} | {r['bytes']:,} | {r['gzip_bytes']:,} | "
                     f"{_with_interval(r['accuracy'], result.evaluated)} | "
                     f"{_with_margin(r['drop'], r['agreement'], result.evaluated)} | {r['agreement']:.2f} | "
                     f"{r['max_abs_diff']:.3g} | {r['latency_us']:.0f} | {r['speed']} | {budget} | "
                     f"{'**yes**' if r['selected'] else ''} |")
    lines += _remedy_lines(result)
    if result.selected is not None:
        lines += _selected_lines(result.selected)
    for title, name in plots:
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    (folder / "report.md").write_text("\n".join(lines) + "\n")


def _with_interval(accuracy: float | None, n: int) -> str:
    from edgekit.artifacts.uncertainty import wilson_interval

    if accuracy is None or not n:
        return num(accuracy)
    low, high = wilson_interval(accuracy, n)
    return f"{accuracy:.2f} ({low:.1f}-{high:.1f})"


def _with_margin(drop: float | None, agreement: float, n: int) -> str:
    from edgekit.artifacts.uncertainty import drop_margin

    if drop is None or not n:
        return num(drop, signed=True)
    return f"{num(drop, signed=True)} ±{drop_margin(agreement, n):.2f}"


def _noise_lines(result: CompressResult) -> list[str]:
    """How sure the accuracies are, and any verdict closer to the budget than the evaluation can tell."""
    from edgekit.artifacts.uncertainty import wilson_interval

    if not result.evaluated or result.source.get("accuracy") is None:
        return []
    low, high = wilson_interval(result.source["accuracy"], result.evaluated)
    lines = [f"- evaluation: {result.evaluated} samples; the source's accuracy {result.source['accuracy']:.2f}% has a "
             f"95% interval of {low:.2f}-{high:.2f}% (Wilson); a drop's 95% margin is "
             "1.96 x sqrt(share of samples the two models disagree on / samples) (paired)"]
    chosen = [result.selected] if result.selected is not None else [c for c in result.candidates if c.artifacts]
    lines += [f"- **within noise**: {text}" for c in chosen if (text := result.verdict_within_noise(c))]
    return lines


def _remedy_lines(result: CompressResult) -> list[str]:
    """The remedies tried on int8 artifacts: over the budget (drop per rung) or slower than float32 (time per rung)."""
    rows = [(c.recipe.name, a) for c in result.candidates for a in c.artifacts
            if a.remedies_tried or a.speed_tried or a.size_tried]
    if not rows:
        return []
    lines = ["", "## int8 remedies", "", "Post-training int8 artifacts that lost more than the budget with the "
             "quantizer's defaults (each rung's accuracy drop in points) or ran slower than the float32 artifact "
             "(each speed rung's time over the first int8 artifact's, measured side by side), each rung measured in "
             "the artifact's runtime; then the size rungs tried on an artifact within the budget (drop, bytes, time "
             "over the artifact's).", "",
             "| recipe | format | accuracy rungs (drop) | kept | speed rungs (time) | kept | size rungs | kept |",
             "|---|---|---|---|---|---|---|---|"]
    for recipe, art in rows:
        tried = ", ".join(f"{k} ({v:+.2f})" if math.isfinite(v) else f"{k} (did not run)"
                          for k, v in art.remedies_tried.items()) or "-"
        if art.search_stopped:
            tried += f"; {art.search_stopped_words}"
        speed = ", ".join(f"{k} ({v:.2f}x)" if math.isfinite(v) else f"{k} (did not run)"
                          for k, v in art.speed_tried.items()) or "-"
        kept = art.remedy or ("defaults (nothing did better)" if art.remedies_tried else "-")
        size = ", ".join(f"{k} ({_size_cell(v)})" for k, v in art.size_tried.items()) or "-"
        lines.append(f"| {recipe} | {art.format.value} | {tried} | {kept} | {speed} | {art.speed_remedy or '-'} | "
                     f"{size} | {art.size_remedy or '-'} |")
    return lines


def _size_cell(tried: dict[str, float]) -> str:
    if "bytes" not in tried:
        return "did not run"
    if "drop" not in tried:
        return f"{tried['bytes']:,} B, not smaller"
    return f"{tried['drop']:+.2f}, {tried['bytes']:,} B, {tried['time']:.2f}x"


def _plot_size_accuracy(result: CompressResult, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(c, a) for c in result.candidates if c.error is None for a in c.artifacts if a.accuracy is not None]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    metric = result.config.select_by.value
    labelled = set()
    for fmt, marker in (("tflite", "o"), ("onnx", "s")):
        pts = [(getattr(a, metric) / 1024, a.accuracy, c) for c, a in points if a.format.value == fmt]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=fmt, s=50, alpha=0.8)
            for size, acc, cand in pts:
                if cand.recipe.name not in labelled:  # one label per recipe, beside its first point
                    labelled.add(cand.recipe.name)
                    ax.annotate(cand.recipe.name, (size, acc), fontsize=7, xytext=(5, 4), textcoords="offset points")
    ax.axhline(result.source["accuracy"], color="gray", linestyle="--", linewidth=1, label="source")
    budget_line = result.budget.line(result.source["accuracy"])
    if budget_line is not None:
        ax.axhline(budget_line, color="red", linestyle=":",
                   linewidth=1, label="budget")
    if result.selected is not None:
        for a in result.selected.artifacts:
            ax.scatter([getattr(a, metric) / 1024], [a.accuracy], s=180, facecolors="none", edgecolors="green",
                       linewidths=2)
    ax.set_xscale("log")
    from matplotlib.ticker import ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel(f"{'gzip' if metric == 'gzip_bytes' else 'file'} size (KiB, log scale)")
    ax.set_ylabel("accuracy in its runtime (%)")
    ax.set_title("Candidates: size vs accuracy (circled: selected)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_sparsity(per_layer: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.35 * len(per_layer) + 1.5))
    names = list(per_layer)
    ax.barh(names, [per_layer[n] * 100 for n in names], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("zero weights (%)")
    ax.set_title("Per-layer sparsity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
