"""int8 remedies, measured: post-training int8 in both formats with the quantizers' defaults and after edgekit's
remedy ladder, side by side in one run, on the digits CNN, the same CNN with one outlier unit
(:func:`edgekit.loading.zoo.with_outlier_unit`), a DenseNet-style pre-activation CNN (its BN cannot fold) with
and without the BN-as-Mul/Add rewrite, and keras.applications MobileNetV2 0.35 (Keras 3, 32x32 digits).
Writes its section of BENCHMARKS.md.

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


def models(work: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (model path, data path)."""
    from edgekit import _tf
    from edgekit.loading import zoo
    from edgekit.loading.data import load_digits

    digits = load_digits()
    np.savez(work / "digits.npz", x=digits.x, y=digits.y)
    cnn = zoo.train(zoo.digits_cnn(), digits, epochs=10)
    cnn.save(work / "cnn.keras")
    zoo.with_outlier_unit(cnn).save(work / "outlier.keras")
    keras = _tf.keras()
    _tf.set_seed(0)
    layers = keras.layers
    inp = keras.Input((8, 8, 1))
    x = layers.Conv2D(16, 3, padding="same")(inp)
    for _ in range(3):
        y = layers.Conv2D(16, 3, padding="same")(layers.ReLU()(layers.BatchNormalization()(x)))
        x = layers.Concatenate()([x, y])
    x = layers.GlobalAveragePooling2D()(layers.ReLU()(layers.BatchNormalization()(x)))
    preact = keras.Model(inp, layers.Dense(10, activation="softmax")(x))
    zoo.train(preact, digits, epochs=10).save(work / "preact.keras")
    keras3 = _tf.keras3()
    keras3.utils.set_random_seed(0)
    digits32 = load_digits(32, 3)
    np.savez(work / "digits32.npz", x=digits32.x, y=digits32.y)
    mnv2 = zoo.keras3_architecture("mobilenetv2")
    mnv2.compile(keras3.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    mnv2.fit(digits32.x, digits32.y, epochs=10, batch_size=32, verbose=0)
    mnv2.save(work / "mobilenetv2.keras")
    return {"digits CNN": (work / "cnn.keras", work / "digits.npz"),
            "digits CNN + outlier unit": (work / "outlier.keras", work / "digits.npz"),
            "pre-activation CNN (DenseNet-style BN)": (work / "preact.keras", work / "digits.npz"),
            "MobileNetV2 0.35 (Keras 3)": (work / "mobilenetv2.keras", work / "digits32.npz")}


def run(path: Path, data: Path) -> list[list[str]]:
    from edgekit import CompressConfig, Recipe, compress
    from edgekit.errors import BudgetError

    try:
        result = compress(path, data, None, progress=False, config=CompressConfig(recipe=Recipe(quantize="int8")))
    except BudgetError as exc:
        return [["-", "-", "-", "-", "-", "-", f"exit 3: {exc}"]]
    rows = []
    for art in result.selected.artifacts:
        ref = result.reference[art.format.value]
        default = art.remedies_tried.get("default", art.quantization_drop)
        rows.append([art.format.value, f"{default:+.2f}", art.remedy or "none needed", f"{art.quantization_drop:+.2f}",
                     f"{ref['bytes'] / art.bytes:.2f}x", f"{art.latency_us / ref['latency_us']:.2f}x",
                     ", ".join(f"{k} {v:+.2f}" for k, v in art.remedies_tried.items() if k != "default") or "-"])
    return rows


def bn_rewrite_ab(path: Path, data: Path) -> tuple[float, float, int]:
    """int8 .onnx accuracy drop vs the float model with and without the BN rewrite, and the BN nodes it removed."""
    from device_agents.runtime import Model
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


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="edgekit-remedies-"))
    built = models(work)
    lines = ["## int8 remedies", "",
             f"`.venv/bin/python benchmarks/remedies.py` on {machine()}. Each model compressed with "
             "`--quantize int8` (both formats, 1 thread); drops are what quantizing cost, in points, against the "
             "float model on the evaluation split (the default 2-point budget applies). Size and time are against "
             "the float32 artifact of the same model in the same runtime (>1 time: slower).", "",
             "| model | format | drop, defaults | remedy kept | drop, kept | float32 bytes / bytes | time vs float32 "
             "| other rungs tried (drop) |", "|---|---|---:|---|---:|---:|---:|---|"]
    for name, (path, data) in built.items():
        for row in run(path, data):
            lines.append(f"| {name} | " + " | ".join(row) + " |")
            print(name, row, flush=True)
    with_rewrite, without, left = bn_rewrite_ab(*built["pre-activation CNN (DenseNet-style BN)"])
    lines += ["", f"BatchNormalization that cannot fold into a conv, written as Mul and Add before ONNX quantization "
              f"(pre-activation CNN, all 1,797 digits, against the float model): int8 `.onnx` drop {with_rewrite:+.2f} "
              f"points with the rewrite, {without:+.2f} without it ({left} BatchNormalization nodes run in float "
              "without it)."]
    write_section("int8 remedies", "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
