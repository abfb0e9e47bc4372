"""Compression benchmark: the digits CNN and a MobileNetV2 (alpha 0.35, 96x96x3) on digits.

For each model: float32 TFLite bytes; each artifact's bytes and gzip bytes, accuracy, top-1
agreement (measured in its runtime); single-sample latency in ai-edge-litert and onnxruntime
vs the source Keras model's ``__call__``. Writes its section of BENCHMARKS.md.

    .venv/bin/python benchmarks/compress.py            # both models (about 15 minutes on 2 cores)
    .venv/bin/python benchmarks/compress.py --quick    # digits CNN only
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from _report import machine, median_us, write_section  # noqa: E402

RECIPES = ("float32", "dynamic", "float16", "int8", "qat", "prune75+int8")
TARGETS = ("int8 >= 3.9x smaller than float32 TFLite; prune75+int8 gzip >= 10x smaller than float32 TFLite; "
           "accuracy drop <= 1.0 point; int8 top-1 agreement >= 98%")


def recipes():
    from edgekit import Recipe

    return {"float32": Recipe(quantize="none"), "dynamic": Recipe(quantize="dynamic"),
            "float16": Recipe(quantize="float16"), "int8": Recipe(quantize="int8"),
            "qat": Recipe(quantize="qat"), "prune75+int8": Recipe(prune=0.75, quantize="int8")}


def bench_model(name, model, data, epochs, finetune_epochs, workdir):
    from device_agents import Model
    from edgekit import CompressConfig, TrainingConfig, compress
    from edgekit.loading import zoo
    from edgekit.loading.data import Dataset, split

    parts = split(data, seed=0)
    train = Dataset(np.concatenate([parts.finetune.x, parts.calibration.x]),
                    np.concatenate([parts.finetune.y, parts.calibration.y]), "train")
    start = time.perf_counter()
    zoo.train(model, train, epochs=epochs)
    train_s = time.perf_counter() - start
    path = os.path.join(workdir, f"{name}.keras")
    model.save(path)
    config = CompressConfig(max_accuracy_drop=100.0, search=tuple(recipes().values()),
                            training=TrainingConfig(finetune_epochs=finetune_epochs))
    result = compress(path, data, None, config=config, progress=True)
    by_name = {c.recipe.name: c for c in result.candidates}
    f32_tflite = by_name["float32"].artifacts[0].bytes
    sample = parts.evaluation.x[:1]
    keras_us = median_us(lambda: model(sample, training=False), repeats=100)
    rows = []
    for label in RECIPES:
        cand = by_name[recipes()[label].name]
        if cand.error:
            rows.append(f"| {label} | failed: {cand.error} |" + " |" * 9)
            continue
        for art in cand.artifacts:
            runtime = Model.load(art.data, num_threads=1)
            lat, p99 = median_us(lambda r=runtime: r.predict(sample))
            rows.append(
                f"| {label} | {art.format.value} | {art.bytes:,} | {art.gzip_bytes:,} | "
                f"{f32_tflite / art.bytes:.2f}x | {f32_tflite / art.gzip_bytes:.2f}x | {art.accuracy:.2f} | "
                f"{art.accuracy_drop:+.2f} | {art.top1_agreement:.2f} | {lat:.0f} / {p99:.0f} |")
    table = "\n".join([
        f"#### {name}: {result.source['params']:,} parameters, source accuracy {result.source['accuracy']:.2f}% "
        f"on {result.data_info['evaluation']} held-out samples (trained {epochs} epochs in {train_s:.0f} s)",
        "",
        f"Source Keras `__call__`, one sample: median {keras_us[0]:.0f} µs, p99 {keras_us[1]:.0f} µs.",
        "",
        "| recipe | format | bytes | gzip bytes | smaller than f32 TFLite (bytes) | (gzip) | accuracy % | "
        "drop (points) | top-1 agreement % | latency median / p99 (µs, 1 thread) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", *rows])
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="digits CNN only")
    args = parser.parse_args()
    import tempfile

    from edgekit import load_digits
    from edgekit.loading import zoo

    sections = []
    with tempfile.TemporaryDirectory() as workdir:
        sections.append(bench_model("digits CNN (8x8x1)", zoo.digits_cnn(), load_digits(), 15, 4, workdir))
        if not args.quick:
            sections.append(bench_model("MobileNetV2 alpha 0.35 (96x96x3, digits upscaled)", zoo.mobilenet_v2(),
                                        load_digits(96, 3), 12, 3, workdir))
    body = "\n".join([
        "## Compression (`benchmarks/compress.py`)", "",
        f"Command: `.venv/bin/python benchmarks/compress.py`. Machine: {machine()}.", "",
        f"Targets (issue): {TARGETS}.", "",
        "Accuracy and agreement are measured by running each artifact in its own runtime "
        "(ai-edge-litert for TFLite, onnxruntime for ONNX) on the held-out evaluation split; latency is "
        "`device_agents.Model.predict` on one sample, median over 200 calls.", "",
        *("\n" + s + "\n" for s in sections)])
    write_section("compress", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
