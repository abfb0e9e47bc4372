"""Compression benchmark: the digits CNN, MobileNetV2 (alpha 0.35, 96x96x3) and the conformance suite's
transformer text classifier, every recipe in both formats, each against the float32 artifact of the same
format in the same runtime.

Each recipe is run as a user runs it (``edgekit compress --recipe R``: the default 2-point budget on int8 and
QAT artifacts, post-training int8 walking its remedy ladders), so the table shows which remedy each int8
artifact needed. For every artifact: bytes and gzip bytes and their ratio to the float32 artifact of its
format, accuracy and drop (measured in its runtime, held-out split), top-1 agreement, and its single-sample
time over the float32 artifact's, measured side by side in alternating blocks (edgekit's ``latency_ratio``,
one thread). Writes its section of BENCHMARKS.md.

    .venv/bin/python benchmarks/compress.py            # the three models (about 25 minutes on 2 cores)
    .venv/bin/python benchmarks/compress.py --quick    # digits CNN only
    .venv/bin/python benchmarks/compress.py --sparsity # prune+int8 at 75-90% sparsity, the two CNNs
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from _report import machine, median_us, write_section  # noqa: E402

RECIPES = ("float32", "dynamic", "float16", "int8", "qat", "prune75+int8")
TARGETS = ("int8 `.tflite` >= 3.9x and int8 `.onnx` >= 3.5x smaller than float32; prune75+int8 >= 10x smaller "
           "after gzip at <= 1 point drop; every int8 artifact at least as fast as float32 in its runtime, "
           "MobileNetV2's int8 `.tflite` at least 1.3x faster (<= 0.77x the time); the QAT `.onnx` no slower than "
           "the int8 `.onnx`")


def recipes() -> dict[str, Any]:
    from edgekit import Recipe

    return {"float32": Recipe(quantize="none"), "dynamic": Recipe(quantize="dynamic"),
            "float16": Recipe(quantize="float16"), "int8": Recipe(quantize="int8"),
            "qat": Recipe(quantize="qat"), "prune75+int8": Recipe(prune=0.75, quantize="int8")}


SPARSITIES = (0.75, 0.8, 0.85, 0.9)
"""The magnitude-pruning sparsities ``--sparsity`` compares (each followed by post-training int8)."""


def models(work: Path, *, quick: bool, text: bool = True) -> list[tuple[str, Path, Path, int]]:
    """(title, model path, data path, fine-tuning epochs) of each benchmark model, trained here."""
    from edgekit import _tf
    from edgekit.loading import zoo
    from edgekit.loading.data import Dataset, load_digits, split

    out = []
    for title, model, data, epochs, finetune in (
            ("digits CNN (8x8x1)", zoo.digits_cnn, load_digits(), 15, 4),
            ("MobileNetV2 alpha 0.35 (96x96x3, digits upscaled)", zoo.mobilenet_v2, load_digits(96, 3), 12, 3)):
        if quick and out:
            break
        parts = split(data, seed=0)  # compress's own split: the evaluation part stays unseen
        _tf.set_seed(0)
        start = time.perf_counter()
        seen = Dataset(np.concatenate([parts.finetune.x, parts.calibration.x]),
                       np.concatenate([parts.finetune.y, parts.calibration.y]), "train")
        trained = zoo.train(model(), seen, epochs=epochs)
        path = work / f"{model.__name__}.keras"
        trained.save(path)
        np.savez(work / f"{model.__name__}.npz", x=data.x, y=data.y)
        out.append((f"{title}, trained {epochs} epochs in {time.perf_counter() - start:.0f} s", path,
                    work / f"{model.__name__}.npz", finetune))
    if text and not quick:
        keras3 = _tf.keras3()
        keras3.utils.set_random_seed(0)
        tokens = zoo.token_dataset()
        np.savez(work / "tokens.npz", x=tokens.x, y=tokens.y)
        transformer = zoo.keras3_architecture("transformer")
        transformer.compile(keras3.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
        transformer.fit(tokens.x, tokens.y, epochs=6, batch_size=32, verbose=0)
        transformer.save(work / "transformer.keras")
        out.append(("transformer text classifier (Keras 3, the conformance suite's; 16 token ids)",
                    work / "transformer.keras", work / "tokens.npz", 3))
    return out


def bench_model(title: str, path: Path, data: Path, finetune: int) -> str:
    from device_agents import Model
    from edgekit import CompressConfig, TrainingConfig, compress
    from edgekit.errors import EdgeKitError
    from edgekit.export.verify import latency_ratio
    from edgekit.loading.data import load_data, split

    sample = split(load_data(data), seed=0).evaluation.x[:1]
    float32, rows, source = {}, [], None
    for label, recipe in recipes().items():
        config = CompressConfig(recipe=recipe, training=TrainingConfig(finetune_epochs=finetune))
        try:
            result = compress(path, data, None, config=config, progress=False)
        except EdgeKitError as exc:  # what the CLI would print, with its exit code
            rows.append(f"| {label} | - | exit {int(exc.exit_code)}: {str(exc)[:300]} |" + " |" * 8)
            continue
        source = result.source
        for art in result.selected.artifacts:
            fmt = art.format.value
            if label == "float32":
                float32[fmt] = art
            ref = float32[fmt]
            ratio = latency_ratio(ref.data, art.data, sample, threads=1) if art is not ref else 1.0
            remedy = " / ".join(r or "-" for r in (art.remedy, art.speed_remedy, art.size_remedy))
            rows.append(f"| {label} | {fmt} | {art.bytes:,} | {art.gzip_bytes:,} | {ref.bytes / art.bytes:.2f}x | "
                        f"{ref.gzip_bytes / art.gzip_bytes:.2f}x | {art.accuracy:.2f} | {art.accuracy_drop:+.2f} | "
                        f"{art.top1_agreement:.2f} | {ratio:.2f}x | {remedy} |")
    f32 = {}
    for fmt, art in float32.items():
        runner = Model.load(art.data, num_threads=1)
        f32[fmt] = median_us(lambda r=runner: r.predict(sample))[0]
    return "\n".join([
        f"#### {title}: {source['params']:,} parameters, source accuracy {source['accuracy']:.2f}%", "",
        "float32 single-sample time, median of 200 calls, 1 thread: "
        + ", ".join(f"`.{fmt}` {us:.0f} µs" for fmt, us in f32.items()) + ".", "",
        "| recipe | format | bytes | gzip bytes | float32 / bytes | float32 / gzip bytes | accuracy % | drop (points) "
        "| top-1 agreement % | time vs float32 | rung kept (accuracy / speed / size) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|", *rows])


def sparsity_rows(title: str, path: Path, data: Path, finetune: int) -> list[str]:
    """prune+int8 at each of :data:`SPARSITIES`: gzip bytes against float32's and the accuracy drop, per format."""
    from edgekit import CompressConfig, Recipe, TrainingConfig, compress

    search = (Recipe(quantize="none"), *(Recipe(prune=p, quantize="int8") for p in SPARSITIES))
    result = compress(path, data, None, progress=False, config=CompressConfig(
        max_accuracy_drop=100.0, search=search, training=TrainingConfig(finetune_epochs=finetune)))
    f32 = {a.format.value: a for a in result.candidates[0].artifacts}
    return [f"| {title.split(', trained')[0]} | {c.recipe.name} | {a.format.value} | {a.gzip_bytes:,} | "
            f"{f32[a.format.value].gzip_bytes / a.gzip_bytes:.2f}x | {f32[a.format.value].bytes / a.gzip_bytes:.2f}x"
            f" | {a.accuracy_drop:+.2f} |" for c in result.candidates[1:] for a in c.artifacts]


def sparsity(work: Path) -> int:
    rows = [row for spec in models(work, quick=False, text=False) for row in sparsity_rows(*spec)]
    body = "\n".join([
        "## prune+int8: sparsity against size after gzip (`benchmarks/compress.py --sparsity`)", "",
        f"Command: `.venv/bin/python benchmarks/compress.py --sparsity`. Machine: {machine()}.", "",
        "Target (issue): pruned + int8 >= 10x smaller than float32 after gzip on both benchmark models at <= 1 point "
        "drop. Magnitude pruning (tfmot, polynomial schedule) at each sparsity, then post-training int8; the drop "
        "is against the source model on the held-out split, measured in the artifact's runtime.", "",
        "| model | recipe | format | gzip bytes | float32 gzip / gzip | float32 bytes / gzip | drop (points) |",
        "|---|---|---|---:|---:|---:|---:|", *rows])
    write_section("compress-sparsity", body)
    print(body)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits CNN only")
    parser.add_argument("--sparsity", action="store_true",
                        help=f"prune+int8 at sparsities {', '.join(map(str, SPARSITIES))} on the two CNNs")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgekit-compress-bench-"))
    if args.sparsity:
        return sparsity(work)
    from edgekit.export.verify import BLOCK_SECONDS

    sections = [bench_model(*spec) for spec in models(work, quick=args.quick)]
    body = "\n".join([
        "## Compression (`benchmarks/compress.py`)", "",
        f"Command: `.venv/bin/python benchmarks/compress.py`. Machine: {machine()}.", "",
        f"Targets (issue): {TARGETS}.", "",
        "Each recipe run as `edgekit compress --recipe R` runs it: the default 2-point budget on what quantizing "
        "costs, post-training int8 walking its remedy, speed and size ladders (the last column: what it kept). "
        "Accuracy, drop (against the source model) and agreement are measured in each artifact's runtime "
        "(ai-edge-litert, onnxruntime) on the held-out evaluation split. Ratios are against the float32 artifact of "
        "the same format; `time vs float32` is the single-sample time over the float32 artifact's in the same "
        f"runtime, measured side by side in alternating blocks of at least {BLOCK_SECONDS * 1000:.0f} ms of the "
        "calling thread's CPU time (one thread; the median of the blocks' ratios; > 1: slower).", "",
        *("\n" + s + "\n" for s in sections)])
    write_section("compress", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
