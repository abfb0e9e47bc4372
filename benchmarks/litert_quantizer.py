"""The LiteRT Quantizer (``ai-edge-quantizer``) against the TFLite converter's int8, on the same models.

For each model edgekit exports the float32 ``.tflite``, the converter's full-int8 ``.tflite`` (its
default post-training path, the quantizer's defaults) and the converter's 16x8 ``.tflite`` (edgekit's last
int8 remedy, int16 activations). The LiteRT Quantizer then quantizes that same float32 file with three of
its recipes: ``static_wi8_ai8`` (int8 weights and activations, calibrated on 200 training samples),
``static_wi8_ai16`` (int16 activations) and ``dynamic_wi8_afp32`` (int8 weights, float activations). Every
file is measured
the same way: accuracy on held-out samples in LiteRT, bytes, and single-sample latency against the
float32 file in alternating blocks (one thread).

    .venv/bin/python benchmarks/litert_quantizer.py [--models preprocessing-cnn,mobilenetv2,...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from _report import interleaved_us, machine, write_section  # noqa: E402
from conformance import build, datasets  # noqa: E402

RECIPES = ("static_wi8_ai8", "static_wi8_ai16", "dynamic_wi8_afp32")
CONVERTER_16X8 = "converter 16x8"  # edgekit's int16-activations rung: the converter's 16x8 mode


def accuracy(data: bytes, x: np.ndarray, y: np.ndarray) -> float:
    from device_agents import Model

    return float(np.mean(Model.load(data, num_threads=1).predict(x).argmax(1) == y) * 100)


def measure(name: str, path: Path, train: Path, held_out: Path) -> dict:
    from device_agents import Model
    from device_agents.store.isolation import probe_artifact
    from edgekit import CompressConfig, Quantization, Recipe, compress
    from edgekit.export.tflite import compact, litert_quantize

    search = (Recipe(quantize=Quantization.NONE), Recipe(quantize=Quantization.INT8))
    result = compress(path, train, None, progress=False, eval_data=held_out,
                      config=CompressConfig(max_accuracy_drop=100.0, search=search, formats=("tflite",)))
    plain, int8 = (c.artifacts[0] for c in result.candidates)
    with np.load(held_out) as npz:
        x, y = npz["x"], npz["y"]
    with np.load(train) as npz:
        calibration = npz["x"][:200]  # the input dtype as is (token ids stay int32)
    variants: dict[str, bytes | str] = {"converter int8": int8.data, CONVERTER_16X8: converter_16x8(path, calibration)}
    for recipe in RECIPES:
        try:
            # compact, as edgekit ships a quantized .tflite (the converter's variants are already)
            variants[f"LiteRT Quantizer {recipe}"] = compact(litert_quantize(plain.data, calibration, recipe))
        except Exception as exc:  # noqa: BLE001 (a failure is a result: it goes in the table)
            variants[f"LiteRT Quantizer {recipe}"] = f"failed: {str(exc).splitlines()[0][:80]}"
    base = accuracy(plain.data, x, y)
    row = {"name": name, "float_bytes": plain.bytes, "float_accuracy": base, "variants": {}}
    sample = x[:1]
    reference = Model.load(plain.data, num_threads=1)
    for label, data in variants.items():
        failure = None if isinstance(data, str) else probe_artifact(data, sample)  # 16-bit graphs can abort LiteRT
        if isinstance(data, str) or failure is not None:
            row["variants"][label] = {"error": data if isinstance(data, str) else f"does not run: {failure}"}
            continue
        model = Model.load(data, num_threads=1)
        _, _, ratio = interleaved_us(lambda m=model: m.predict(sample), lambda: reference.predict(sample),
                                     blocks=8, per_block=40)
        row["variants"][label] = {"bytes": len(data), "drop": base - accuracy(data, x, y), "ratio": ratio}
    return row


def converter_16x8(path: Path, calibration: np.ndarray) -> bytes | str:
    """The model in the converter's 16x8 mode, as edgekit's last int8 remedy writes it."""
    from edgekit import load_model
    from edgekit.config import Format
    from edgekit.export import exporter
    from edgekit.export.remedies import Int8Options, IntType

    try:
        with exporter(Format.TFLITE).int8(load_model(path).model, calibration=calibration, int8_io=False) as q:
            return q.quantize(Int8Options(activations=IntType.INT16))
    except Exception as exc:  # noqa: BLE001 (a failure is a result: it goes in the table)
        return f"failed: {str(exc).splitlines()[0][:80]}"


def table(rows: list[dict]) -> str:
    labels = ["converter int8", CONVERTER_16X8, *(f"LiteRT Quantizer {r}" for r in RECIPES)]
    head = "| model | float32 bytes, accuracy | " + " | ".join(labels) + " |"
    lines = [head, "|---|---|" + "---|" * len(labels)]
    for row in rows:
        cells = []
        for label in labels:
            v = row["variants"][label]
            cells.append(v["error"] if "error" in v else
                         f"{row['float_bytes'] / v['bytes']:.2f}x smaller, {v['drop']:+.1f} pts lost, "
                         f"{v['ratio']:.2f}x the float32 time")
        lines.append(f"| {row['name']} | {row['float_bytes']:,} B, {row['float_accuracy']:.1f}% | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="preprocessing-cnn,mobilenetv2,mobilenetv3small,transformer,efficientnetb0")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgekit-aeq-"))
    images, texts = datasets(work)
    rows = []
    for name in args.models.split(","):
        path, train, held_out = build(name, work, images, texts)
        rows.append(measure(name, path, train, held_out))
        print(rows[-1], flush=True)
    body = (f"## LiteRT Quantizer against the converter's int8 (`benchmarks/litert_quantizer.py`)\n\n"
            f"`.venv/bin/python benchmarks/litert_quantizer.py --models {args.models}` on {machine()}, "
            "ai-edge-quantizer 0.10.0. The conformance suite's Keras 3 models (8 epochs on 32x32 digits or "
            "token ids, held-out fifth). Each cell: bytes against the float32 `.tflite`, accuracy points lost "
            "against it, and the single-sample latency ratio against it in LiteRT (one thread, alternating "
            "blocks). \"converter int8\" is edgekit's own int8 export with the quantizer's defaults (a 100-point "
            "budget: no remedy runs); \"converter 16x8\" is its int16-activations remedy (the converter's 16x8 "
            "mode). Every quantized file is compact, as edgekit ships it (no intermediate tensor names).\n\n"
            + table(rows))
    write_section("litert-quantizer", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
