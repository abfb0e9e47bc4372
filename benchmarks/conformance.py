"""The conformance suite's architectures, measured: float32 and int8 bytes, accuracy drop per format,
single-sample latency of the int8 artifact against the float32 one in the same runtime (alternating
blocks, one thread). Writes its section of BENCHMARKS.md and the "Supported models" table of docs/compress.md.

    .venv/bin/python benchmarks/conformance.py [--only NAME,NAME]

Each architecture's row is kept in benchmarks/results/conformance.jsonl with the commit it was measured at;
``--only`` re-measures those architectures and keeps the other rows, so a long run can be done in parts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from _report import ROOT, commit, interleaved_us, machine, write_section  # noqa: E402


def build(name: str, work: Path, images: Path, texts: Path) -> tuple[Path, Path, Path]:
    from edgekit import _tf
    from edgekit.loading import zoo

    keras = _tf.keras3()
    keras.utils.set_random_seed(0)
    data = texts if name in zoo.TEXT_ARCHITECTURES else images
    arrays = dict(np.load(data))
    if name in zoo.PIXELS_0_255:  # their preprocessing is inside: pixels in 0-255, as Keras documents
        arrays["x"] = arrays["x"] * 255
    cut = len(arrays["x"]) * 4 // 5  # the last fifth is held out: the accuracy reported is on unseen samples
    np.savez(work / f"{name}-train.npz", x=arrays["x"][:cut], y=arrays["y"][:cut])
    np.savez(work / f"{name}-test.npz", x=arrays["x"][cut:], y=arrays["y"][cut:])
    model = zoo.keras3_architecture(name, sample=np.load(images)["x"][:200])
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(arrays["x"][:cut], arrays["y"][:cut], epochs=8, batch_size=32, verbose=0)
    model.save(work / f"{name}.keras")
    return work / f"{name}.keras", work / f"{name}-train.npz", work / f"{name}-test.npz"


EXPORTED = "model.export() savedmodel"  # the preprocessing CNN as Keras 3's model.export() writes it
ROWS = ROOT / "benchmarks" / "results" / "conformance.jsonl"


def measure(name: str, path: Path, data: Path, held_out: Path) -> dict:
    from device_agents import Model
    from edgekit import BudgetError, CompressConfig, Format, Quantization, Recipe, compress

    # the float32 artifacts, then int8 with the default budget (2 points): where plain int8 loses more, the remedy
    # ladder runs as it does for a user (a search would stop at the first recipe within the budget)
    reference = compress(path, data, None, progress=False, eval_data=held_out,
                         config=CompressConfig(recipe=Recipe(quantize=Quantization.NONE)))
    (plain,) = reference.candidates
    row = {"name": name, "source": reference.source["accuracy"], "formats": {}, "commit": commit()}
    try:
        (int8,) = compress(path, data, None, progress=False, eval_data=held_out,
                           config=CompressConfig(recipe=Recipe(quantize=Quantization.INT8))).candidates
    except BudgetError as exc:  # a refusal is a result: the table says so
        row["formats"] = {fmt.value: {"error": f"refused: {exc}"} for fmt in Format}
        return row
    sample = np.load(data)["x"][:1]
    for art in int8.artifacts:
        ref = next(a for a in plain.artifacts if a.format is art.format)
        quick, slow = Model.load(art.data, num_threads=1), Model.load(ref.data, num_threads=1)
        q_us, f_us, ratio = interleaved_us(lambda m=quick: m.predict(sample), lambda m=slow: m.predict(sample),
                                           blocks=8, per_block=40)
        row["formats"][art.format.value] = {"float_bytes": ref.bytes, "int8_bytes": art.bytes,
                                            "drop": art.accuracy_drop, "int8_us": q_us, "float_us": f_us,
                                            "ratio": ratio, "runtime": art.runtime,
                                            "remedy": art.remedy or None, "speed_remedy": art.speed_remedy or None,
                                            "size_remedy": art.size_remedy or None,
                                            "within_budget": int8.within_budget}
    for fmt, error in int8.format_errors.items():
        row["formats"][fmt] = {"error": error}
    return row


def techniques(path: Path, data: Path, held_out: Path) -> dict[str, str]:
    """Each training-based technique run for real (one fine-tuning epoch): "✔" with the held-out drop and the
    layers it left as they were, or why it did not run; on-device training: full model, else head-only."""
    from edgekit import (
        CompressConfig,
        EdgeKitError,
        Recipe,
        TrainableConfig,
        TrainingConfig,
        compress,
        export_trainable,
    )
    from edgekit.loading.models import load_model

    recipes = {"prune": Recipe(prune=0.5, quantize="int8"), "QAT": Recipe(quantize="qat"),
               "distill": Recipe(student_width=0.5, quantize="int8")}
    unavailable = load_model(path).training_unavailable  # a graph only (model.export()): no candidate can run
    out = {name: "no: " + unavailable[:70] for name in recipes} if unavailable else {}
    config = CompressConfig(max_accuracy_drop=100.0, search=tuple(recipes.values()),
                            training=TrainingConfig(finetune_epochs=1, distill_epochs=2))
    result = None if unavailable else compress(path, data, None, progress=False, eval_data=held_out, config=config)
    for (name, _), cand in zip(recipes.items(), result.candidates if result else ()):
        if cand.error:
            out[name] = "no: " + cand.error[:70]
            continue
        left = sum(len(v) for v in cand.skipped_layers.values())
        out[name] = f"✔ ({cand.worst_drop:+.1f} pts{f', {left} layers left as they were' if left else ''})"
    for mode, head_only in (("full", False), ("head-only", True)):
        try:
            export_trainable(path, None, data=data if head_only else None, progress=False,
                             config=TrainableConfig(head_only=head_only))
            out["on-device training"] = f"✔ ({mode})"
            break
        except EdgeKitError as exc:
            out["on-device training"] = "no: " + str(exc).split(";")[0][:80]
    return out


def datasets(work: Path) -> tuple[Path, Path]:
    """The suite's data in ``work``: 32x32x3 digits (images.npz) and token ids (texts.npz)."""
    from edgekit.loading import zoo
    from edgekit.loading.data import load_digits

    digits = load_digits(32, 3)
    np.savez(work / "images.npz", x=digits.x, y=digits.y)
    tokens = zoo.token_dataset(n=1200)
    np.savez(work / "texts.npz", x=tokens.x, y=tokens.y)
    return work / "images.npz", work / "texts.npz"


def main() -> int:
    from edgekit import _tf
    from edgekit.loading import zoo

    names = (*zoo.KERAS3_ARCHITECTURES, EXPORTED)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", type=lambda text: [n for n in text.split(",") if n], default=list(names),
                        help=f"comma-separated, of: {', '.join(names)} ('' rewrites the tables from the kept rows)")
    parser.add_argument("--int8-only", action="store_true",
                        help="re-measure int8 only; keep each row's techniques (docs/compress.md says their commit)")
    args = parser.parse_args()
    unknown = set(args.only) - set(names)
    if unknown:
        parser.error(f"unknown architectures {sorted(unknown)}; choose from {', '.join(names)}")
    kept = {}
    if ROWS.is_file():
        kept = {row["name"]: row for row in map(json.loads, ROWS.read_text().splitlines())}
    work = Path(tempfile.mkdtemp(prefix="edgekit-conformance-"))
    images, texts = datasets(work)
    for name in args.only:
        if name == EXPORTED:
            path, data, held_out = build("preprocessing-cnn", work, images, texts)
            _tf.keras3().models.load_model(path).export(str(work / "exported"), verbose=False)
            path = work / "exported"
        else:
            path, data, held_out = build(name, work, images, texts)
        previous = kept.get(name, {})
        kept[name] = measure(name, path, data, held_out)
        if args.int8_only and "techniques" in previous:  # the techniques' column as measured before
            kept[name]["techniques"] = previous["techniques"]
            kept[name]["techniques_commit"] = previous.get("techniques_commit", previous.get("commit"))
        else:
            kept[name]["techniques"] = techniques(path, data, held_out)
        print(kept[name], flush=True)
        ROWS.parent.mkdir(exist_ok=True)
        ROWS.write_text("".join(json.dumps(kept[n]) + "\n" for n in names if n in kept))
    rows = [kept[n] for n in names if n in kept]
    write_section("conformance", benchmark_table(rows))
    write_section("supported-models", supported_table(rows), path=ROOT / "docs" / "compress.md")
    return 0


def benchmark_table(rows: list[dict]) -> str:
    lines = ["## Conformance suite: real architectures, post-training int8", "",
             f"`.venv/bin/python benchmarks/conformance.py` on {machine()}. Keras 3 models built by Keras itself "
             "(`weights=None`), trained 8 epochs on 80% of digits at 32x32x3 or of synthetic token ids and "
             "measured on the held-out 20%; int8 with edgekit's default budget (2 points: where plain int8 loses "
             "more, the remedy ladder runs and the remedy kept is named); single-sample "
             "latency of the int8 artifact vs the float32 artifact of the same model in the same runtime, one "
             "thread, medians of 8 alternating blocks of 40 calls. Rows measured at another commit than the "
             "header's say so (`--only` re-measures some rows and keeps the others).", "",
             "| architecture | source accuracy % | format | float32 bytes | int8 bytes | ratio | accuracy drop "
             "(points) | remedy | int8 µs | float32 µs | int8 / float32 time |",
             "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    head = machine().rsplit("commit ", 1)[-1]
    for row in rows:
        label = row["name"] if row.get("commit", head) == head else f"{row['name']} (commit {row['commit']})"
        for fmt, m in row["formats"].items():
            if "error" in m:
                lines.append(f"| {label} | {row['source']:.1f} | {fmt} | - | - | - | - | - | - | - | "
                             f"not written: {m['error'].split('error: ')[-1][:90]} |")
                continue
            lines.append(f"| {label} | {row['source']:.1f} | {fmt} ({m['runtime']}) | {m['float_bytes']:,} | "
                         f"{m['int8_bytes']:,} | "
                         f"{m['float_bytes'] / m['int8_bytes']:.2f}x | {m['drop']:+.2f} | {_remedy(m)} | "
                         f"{m['int8_us']:.0f} | "
                         f"{m['float_us']:.0f} | {m['ratio']:.2f} |")
    return "\n".join(lines)


def _remedy(cell: dict) -> str:
    """The remedy kept; rows measured before the default budget ran with a 100-point one (no ladder)."""
    if "remedy" not in cell:
        return "not run (100-point budget)"
    kept = [f"{kind}: {cell[key]}" for kind, key in (("accuracy", "remedy"), ("speed", "speed_remedy"),
                                                     ("size", "size_remedy")) if cell.get(key)]
    return (", ".join(kept) or "none") + ("" if cell["within_budget"] is not False else " (over budget)")


def supported_table(rows: list[dict]) -> str:
    names = ("prune", "QAT", "distill", "on-device training")  # prune = 50% + int8, distill = width 0.5 + int8
    lines = ["| architecture (Keras 3) | TFLite (float32, float16, dynamic, int8) | ONNX (same) | "
             + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for row in rows:
        cells = []
        for fmt in ("tflite", "onnx"):
            m = row["formats"].get(fmt, {"error": "not measured"})
            cells.append("✔" if "error" not in m else "no: " + m["error"].split("error: ")[-1][:60])
        cells += [row["techniques"][name] for name in names]
        at = f" (techniques at commit {row['techniques_commit']})" if row.get("techniques_commit") else ""
        lines.append(f"| {row['name']}{at} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Generated by `benchmarks/conformance.py` (the same architectures as "
                 "`tests/compression/test_conformance.py`). "
                 "Each technique ran for real with one fine-tuning epoch (prune: 50% + int8; QAT; distill: a "
                 "0.5-width student + int8); the drop is the worst format's, on held-out data, against the source. "
                 "On-device training: the full model when every layer has an on-device gradient, else head-only. "
                 "int8 accuracy and latency per architecture are in BENCHMARKS.md.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
