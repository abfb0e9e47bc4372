"""int8 remedies, measured: post-training int8 in both formats with the quantizers' defaults and after edgekit's
remedy ladder, side by side in one run, on the digits CNN, the same CNN with one outlier unit
(:func:`edgekit.loading.zoo.with_outlier_unit`), a DenseNet-style pre-activation CNN (its BN cannot fold) with
and without the BN-as-Mul/Add rewrite, keras.applications MobileNetV2 0.35 (Keras 3, 32x32 digits) and the
conformance suite's transformer text classifier (token ids) and EfficientNetB0 (the model that needs the
16-bit activation rung). Writes its section of BENCHMARKS.md.

    .venv/bin/python benchmarks/remedies.py
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from _report import machine, write_section  # noqa: E402

MASSIVE = ((100.0, 1.0), (1000.0, 0.25))
"""(ratio, fraction) of the massive-activation CNNs (`zoo.massive_activation_cnn`): entropy's case, percentile's."""


def models(work: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (model path, data path)."""
    from edgekit import _tf
    from edgekit.loading import zoo
    from edgekit.loading.data import load_digits

    digits = load_digits()
    np.savez(work / "digits.npz", x=digits.x, y=digits.y)
    cnn = zoo.train(zoo.digits_cnn(), digits, epochs=10)
    cnn.save(work / "cnn.keras")
    zoo.with_outlier_unit(cnn, 10000.0).save(work / "outlier.keras")
    zoo.with_rare_outlier_unit(cnn, digits.x, value=3000.0, fraction=0.05).save(work / "rare.keras")
    massive = {}
    for ratio, fraction in MASSIVE:
        model, data = zoo.massive_activation_cnn(digits, ratio=ratio, fraction=fraction)
        model.save(work / f"massive-{ratio:g}.keras")
        np.savez(work / f"massive-{ratio:g}.npz", x=data.x, y=data.y)
        massive[f"massive activation, {ratio:g}x in {fraction:.0%} of inputs"] = (
            work / f"massive-{ratio:g}.keras", work / f"massive-{ratio:g}.npz")
    _tf.set_seed(0)
    zoo.train(zoo.preactivation_cnn(16, 3), digits, epochs=10).save(work / "preact.keras")
    keras3 = _tf.keras3()
    keras3.utils.set_random_seed(0)
    digits32 = load_digits(32, 3)
    np.savez(work / "digits32.npz", x=digits32.x, y=digits32.y)
    mnv2 = zoo.keras3_architecture("mobilenetv2")
    mnv2.compile(keras3.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    mnv2.fit(digits32.x, digits32.y, epochs=10, batch_size=32, verbose=0)
    mnv2.save(work / "mobilenetv2.keras")
    tokens = zoo.token_dataset()
    np.savez(work / "tokens.npz", x=tokens.x, y=tokens.y)
    keras3.utils.set_random_seed(0)
    transformer = zoo.keras3_architecture("transformer")
    transformer.compile(keras3.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    transformer.fit(tokens.x, tokens.y, epochs=6, batch_size=32, verbose=0)
    transformer.save(work / "transformer.keras")
    from conformance import build, datasets  # the conformance suite's EfficientNetB0: 0-255 pixels, 8 epochs

    efficientnet, efficientnet_data, _ = build("efficientnetb0", work, *datasets(work))
    return {"digits CNN": (work / "cnn.keras", work / "digits.npz"),
            "digits CNN + outlier unit": (work / "outlier.keras", work / "digits.npz"),
            "digits CNN + rare outlier unit": (work / "rare.keras", work / "digits.npz"),
            **massive,
            "pre-activation CNN (DenseNet-style BN)": (work / "preact.keras", work / "digits.npz"),
            "MobileNetV2 0.35 (Keras 3)": (work / "mobilenetv2.keras", work / "digits32.npz"),
            "transformer text classifier (Keras 3)": (work / "transformer.keras", work / "tokens.npz"),
            "EfficientNetB0 (Keras 3, 0-255 pixels)": (efficientnet, efficientnet_data)}


def run(path: Path, data: Path) -> list[list[str]]:
    from edgekit import CompressConfig, Recipe, compress
    from edgekit.errors import BudgetError

    try:
        result = compress(path, data, None, progress=False, config=CompressConfig(recipe=Recipe(quantize="int8")))
    except BudgetError as exc:
        return [["-", "-", "-", "-", "-", "-", f"exit 3: {exc}", "-", "-"]]
    rows = []
    for art in result.selected.artifacts:
        ref = result.reference[art.format.value]
        default = art.remedies_tried.get("default", art.quantization_drop)
        rows.append([art.format.value, f"{default:+.2f}", art.remedy or "none needed", f"{art.quantization_drop:+.2f}",
                     f"{ref['bytes'] / art.bytes:.2f}x", f"{art.time_vs_float32:.2f}x",
                     ", ".join(f"{k} {v:+.2f}" for k, v in art.remedies_tried.items() if k != "default") or "-",
                     art.speed_remedy or "-", ", ".join(f"{k} {v:.2f}x" if np.isfinite(v) else f"{k} did not run"
                                                        for k, v in art.speed_tried.items()) or "-"])
    return rows


def bn_rewrite_ab(path: Path, data: Path) -> tuple[float, float, int]:
    """int8 .onnx accuracy drop vs the float model with and without the BN rewrite, and the BN nodes it removed."""
    from device_agents.serving.runtime import Model
    from edgekit.config import Quantization
    from edgekit.export import onnx as onnx_export
    from edgekit.loading.models import load_model

    model = load_model(path).source
    arrays = np.load(data)
    x, y = arrays["x"], arrays["y"]
    reference = float(np.mean(model.predict(x, verbose=0).argmax(1) == y) * 100)
    drops = []
    rewrite = onnx_export.affine_batchnorm
    for variant in (rewrite, lambda proto: proto):
        onnx_export.affine_batchnorm = variant
        blob, _ = onnx_export.to_onnx(model, quantization=Quantization.INT8, calibration=x[:256])
        drops.append(reference - float(np.mean(Model.load(blob).predict(x).argmax(1) == y) * 100))
        count = onnx_export.onnx_ops(blob).count("BatchNormalization")
    onnx_export.affine_batchnorm = rewrite
    return drops[0], drops[1], count


ONNX_VARIANTS = {"S8S8 QDQ": {"activations": "int8"}, "U8S8 QDQ (default)": {},
                 "U8S8 QDQ reduce_range": {"reduce_range": True}, "U8U8 QDQ": {"weights": "uint8"},
                 "U8S8 QOperator": {"onnx_format": "qoperator"}}


def onnx_variants(path: Path, data: Path, *, blocks: int = 10, calls: int = 30) -> list[str]:
    """Each ONNX int8 variant's accuracy, bytes and single-sample time against float32, timed in alternating
    blocks of ``calls`` calls within one run (one thread)."""
    import statistics
    import time

    from device_agents.serving.runtime import Model
    from edgekit.export.onnx import OnnxInt8, float_onnx
    from edgekit.export.remedies import Int8Options
    from edgekit.loading.models import load_model

    arrays = np.load(data)
    x, y = arrays["x"], arrays["y"]
    proto = float_onnx(load_model(path).source)
    blobs = {"float32": proto.SerializeToString()}
    with OnnxInt8(proto, x[:256]) as quantizer:
        for name, changes in ONNX_VARIANTS.items():
            blobs[name] = quantizer.quantize(Int8Options(**changes))
    models = {name: Model.load(blob, num_threads=1) for name, blob in blobs.items()}
    accuracy = {name: float(np.mean(m.predict(x[-400:]).argmax(1) == y[-400:]) * 100) for name, m in models.items()}
    sample, times = x[:1], {name: [] for name in models}
    for model in models.values():
        for _ in range(20):
            model.predict(sample)
    for _ in range(blocks):
        for name, model in models.items():
            start = time.perf_counter_ns()
            for _ in range(calls):
                model.predict(sample)
            times[name].append((time.perf_counter_ns() - start) / calls / 1000)
    base = statistics.median(times["float32"])
    return [f"| {name} | {accuracy[name]:.2f} | {len(blobs[name]):,} | {statistics.median(times[name]):.0f} | "
            f"{statistics.median(times[name]) / base:.2f}x |" for name in blobs]


def tflite_breakdown(path: Path, data: Path) -> str:
    """Where an int8 .tflite's bytes go, against the float32 .tflite: weight buffers, quantization parameters
    (per-channel scales, int64 zero points), tensor names, the rest."""
    from edgekit.config import Quantization
    from edgekit.export.tflite import to_tflite
    from edgekit.loading.models import load_model

    model = load_model(path).source
    x = np.load(data)["x"][:256]
    blobs = {q: to_tflite(model, quantization=q, calibration=x)[0] for q in (Quantization.NONE, Quantization.INT8)}
    from tensorflow.lite.tools import flatbuffer_utils

    parts = {}
    for q, blob in blobs.items():
        fb = flatbuffer_utils.read_model_from_bytearray(bytearray(blob))
        buffers = sum(len(b.data) for b in fb.buffers if b.data is not None)
        scales = zeros = names = 0
        for tensor in fb.subgraphs[0].tensors:
            names += len(tensor.name or b"")
            quant = tensor.quantization
            if quant is not None:
                scales += 4 * len(quant.scale if quant.scale is not None else [])
                zeros += 8 * len(quant.zeroPoint if quant.zeroPoint is not None else [])
        parts[q] = (len(blob), buffers, scales, zeros, names)
    f32, i8 = parts[Quantization.NONE], parts[Quantization.INT8]
    return (f"| {f32[0]:,} | {i8[0]:,} | {f32[0] / i8[0]:.2f}x | {i8[1]:,} | {f32[0] / i8[1]:.2f}x | {i8[2]:,} | "
            f"{i8[3]:,} | {i8[4]:,} |")


def vnni() -> str:
    """Whether this CPU has the x86 VNNI instructions (from /proc/cpuinfo), which decide U8S8's saturation."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return "The CPU's instruction set extensions could not be read."
    found = sorted(flags & {"avx512_vnni", "avx_vnni"})
    if found:
        return (f"This CPU has {' and '.join(found)}: U8S8 runs on vpdpbusd here, without the int16 saturation of "
                "AVX2's vpmaddubsw on CPUs without VNNI (where the reduce-range rung applies).")
    return "This CPU has no VNNI: U8S8 runs on AVX2's vpmaddubsw, whose int16 sums can saturate (reduce-range rung)."


def main() -> int:
    from edgekit.export.verify import BLOCK_SECONDS

    work = Path(tempfile.mkdtemp(prefix="edgekit-remedies-"))
    built = models(work)
    lines = ["## int8 remedies", "",
             f"`.venv/bin/python benchmarks/remedies.py` on {machine()}. Each model compressed with "
             "`--quantize int8` (both formats, 1 thread); drops are what quantizing cost, in points, against the "
             "float model on the evaluation split (the default 2-point budget applies). Size and time are against "
             "the float32 artifact of the same model in the same runtime (>1 time: slower; timed side by side in "
             f"alternating blocks of at least {BLOCK_SECONDS * 1000:.0f} ms, as edgekit's speed step does). The "
             "outlier unit is constantly 10,000; the rare outlier unit fires on 5% of the inputs, at a median of "
             "3,000 when it does (`zoo.with_rare_outlier_unit`). The massive activation is one value of a "
             "65,536-value tensor at a fixed position, that many times the tensor's largest other value, in that "
             "share of the inputs "
             "(`zoo.massive_activation_cnn`; digits upscaled to 32x32 with a marker channel).", "",
             "| model | format | drop, defaults | remedy kept | drop, kept | float32 bytes / bytes | time vs float32 "
             "| accuracy rungs tried (drop) | speed rung kept | speed rungs tried (time vs first int8) |",
             "|---|---|---:|---|---:|---:|---:|---|---|---|"]
    for name, (path, data) in built.items():
        for row in run(path, data):
            lines.append(f"| {name} | " + " | ".join(row) + " |")
            print(name, row, flush=True)
    with_rewrite, without, left = bn_rewrite_ab(*built["pre-activation CNN (DenseNet-style BN)"])
    lines += ["", f"BatchNormalization that cannot fold into a conv, written as Mul and Add before ONNX quantization "
              f"(pre-activation CNN, all 1,797 digits, against the float model): int8 `.onnx` drop {with_rewrite:+.2f} "
              f"points with the rewrite, {without:+.2f} without it ({left} BatchNormalization nodes run in float "
              "without it)."]
    lines += ["", "### int8 `.onnx` formats side by side", "",
              "Each model's int8 `.onnx` in every format onnxruntime's quantizer writes, from the same calibration "
              "(256 samples, min-max), one thread, timed in alternating blocks of 30 single-sample calls within one "
              f"run; accuracy on the last 400 samples. {vnni()}", ""]
    for name in ("digits CNN", "pre-activation CNN (DenseNet-style BN)", "MobileNetV2 0.35 (Keras 3)",
                 "transformer text classifier (Keras 3)"):
        lines += [f"**{name}**", "", "| variant | accuracy % | bytes | µs / sample | time vs float32 |",
                  "|---|---:|---:|---:|---:|", *onnx_variants(*built[name]), ""]
        print(name, "variants done", flush=True)
    lines += ["### int8 `.tflite` bytes", "",
              "Where the bytes of the int8 `.tflite` go (read from the flatbuffer). \"float32 / buffers only\" is "
              "the ratio the file would reach if it held nothing but its weight and bias buffers (int8 weights, "
              "int32 biases): a ratio target above it is out of reach whatever the metadata.", "",
              "| model | float32 bytes | int8 bytes | ratio | int8 weight+bias buffers | float32 / buffers only "
              "| scales | int64 zero points | tensor names |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("digits CNN", "MobileNetV2 0.35 (Keras 3)", "transformer text classifier (Keras 3)"):
        lines.append(f"| {name} " + tflite_breakdown(*built[name]))
    write_section("int8 remedies", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
