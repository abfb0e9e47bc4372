"""edgekit's int8 against its peers, side by side on the same models and the same held-out samples.

Peers, each run as its documentation shows, on the model's float32 artifact and the same 256 calibration samples:

- the TFLite converter's post-training int8 (full-integer, float I/O) and onnxruntime's ``quantize_static`` with
  its defaults (QDQ, U8S8, min-max): the first rung of edgekit's ladders, so taken from ``edgekit.compress`` with a
  budget that runs no remedy;
- the LiteRT Quantizer (``ai-edge-quantizer``), recipe ``static_wi8_ai8``, on the float32 ``.tflite``;
- NNCF 3.4 (ONNX backend): ``nncf.quantize`` and ``nncf.quantize_with_accuracy_control`` (at most 1 point on a
  labelled validation split of the training data);
- edgekit: ``edgekit compress --quantize int8`` with its default budget (2 points to quantizing, judged on its own
  evaluation split of the training data: it never sees the held-out samples).

Sony's Model Compression Toolkit 2.6.1 is not run here: it requires matplotlib < 3.10, networkx < 3.6 and
pydantic < 2.12 (its wheel's metadata), which this stack's pins (matplotlib 3.11.2; networkx 3.6.1 with NNCF)
exclude; it needs a venv of its own.

Every artifact is measured the same way: top-1 accuracy on the held-out fifth, bytes, and single-sample time
against the float32 artifact of its format in alternating blocks (one thread).

    .venv/bin/python benchmarks/peers.py [--models cnn,squeezed,mobilenetv3small]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from _report import ROOT, interleaved_us, machine, write_section  # noqa: E402

MODELS = ("cnn", "squeezed", "mobilenetv3small")
ROWS = ROOT / "benchmarks" / "results" / "peers.jsonl"
CALIBRATION = 256


def _settle_batchnorm(model, x, layers_module) -> None:  # noqa: ANN001
    """Moving statistics set to the training data's: a narrow signal (a squeezing Rescaling) leaves them far
    behind the batch statistics after training (held-out accuracy 10% without this, 95.6% with it)."""
    norms = [layer for layer in model.layers if isinstance(layer, layers_module.BatchNormalization)]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    model(x[:512], training=True)
    for layer, momentum in zip(norms, momenta, strict=True):
        layer.momentum = momentum


def build(name: str, work: Path) -> tuple[Path, Path, Path]:
    """The model trained on the first four fifths of digits (8x8 for the CNNs, 32x32x3 for MobileNetV3Small, all
    0-1 pixels), saved as its user would, and the train and held-out .npz files."""
    from edgekit import _tf
    from edgekit.loading import zoo
    from edgekit.loading.data import load_digits

    data = load_digits(32, 3) if name == "mobilenetv3small" else load_digits()
    cut = len(data.x) * 4 // 5
    np.savez(work / f"{name}-train.npz", x=data.x[:cut], y=data.y[:cut])
    np.savez(work / f"{name}-test.npz", x=data.x[cut:], y=data.y[cut:])
    x, y = data.x[:cut], data.y[:cut]
    if name == "mobilenetv3small":  # Keras 3, weights=None, its own Rescaling(1/127.5, -1) fed 0-1 pixels
        keras = _tf.keras3()
        keras.utils.set_random_seed(0)
        model = zoo.keras3_architecture(name, sample=x[:200])
        epochs, path = 30, work / f"{name}.keras"
    else:
        keras = _tf.keras()
        keras.utils.set_random_seed(0)
        layers = keras.layers
        body = [layers.Conv2D(16, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
                layers.Conv2D(32, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
                layers.GlobalAveragePooling2D(), layers.Dense(10, activation="softmax")]
        squeeze = [layers.Rescaling(1 / 127.5, -1)] if name == "squeezed" else []
        model = keras.Sequential([layers.Input((8, 8, 1)), *squeeze, *body])
        epochs, path = 30, work / f"{name}.h5"
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    _settle_batchnorm(model, x, keras.layers)
    model.save(path)
    return path, work / f"{name}-train.npz", work / f"{name}-test.npz"


def _nncf_plain(onnx_float: bytes, calibration: np.ndarray) -> bytes:
    import onnx

    from edgekit.export.accuracy_control import _nncf

    nncf = _nncf()
    items = [calibration[i:i + 1] for i in range(len(calibration))]
    model = nncf.quantize(onnx.load_from_string(onnx_float), nncf.Dataset(items, lambda item: {"input": item}),
                          subset_size=len(items))
    return model.SerializeToString()


def _nncf_controlled(onnx_float: bytes, calibration: np.ndarray, x: np.ndarray, y: np.ndarray) -> bytes:
    import onnx

    from edgekit.export.accuracy_control import Labelled, accuracy_controlled

    return accuracy_controlled(onnx.load_from_string(onnx_float), calibration, Labelled(x, y), max_drop=1.0,
                               input_name="input").data


def peers(path: Path, train: Path) -> tuple[dict[str, dict[str, bytes | str]], dict[str, bytes]]:
    """format -> peer -> artifact (or why it failed); format -> the float32 artifact."""
    from edgekit import CompressConfig, Quantization, Recipe, compress
    from edgekit.export.tflite import compact, litert_quantize

    search = (Recipe(quantize=Quantization.NONE), Recipe(quantize=Quantization.INT8))
    result = compress(path, train, None, progress=False,
                      config=CompressConfig(max_accuracy_drop=100.0, search=search))  # no remedy: the defaults
    plain, int8 = ({a.format.value: a.data for a in c.artifacts} for c in result.candidates)
    with np.load(train) as npz:
        calibration = npz["x"][:CALIBRATION]
        validation = (npz["x"][-CALIBRATION:], npz["y"][-CALIBRATION:])
    runs: dict[str, dict[str, bytes | str]] = {
        "tflite": {"TFLite converter int8": int8["tflite"]},
        "onnx": {"onnxruntime quantize_static": int8["onnx"]},
    }
    attempts = {
        ("tflite", "LiteRT Quantizer static_wi8_ai8"):
            lambda: compact(litert_quantize(plain["tflite"], calibration, "static_wi8_ai8")),
        ("onnx", "NNCF quantize"): lambda: _nncf_plain(plain["onnx"], calibration),
        ("onnx", "NNCF accuracy control (1 pt)"): lambda: _nncf_controlled(plain["onnx"], calibration, *validation),
    }
    for (fmt, peer), run in attempts.items():
        try:
            runs[fmt][peer] = run()
        except Exception as exc:  # noqa: BLE001 (a failure is a result: it goes in the table)
            runs[fmt][peer] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    return runs, plain


def edgekit_int8(path: Path, train: Path) -> tuple[dict[str, bytes | str], dict[str, str]]:
    """format -> edgekit's int8 artifact (or its refusal), and the remedy each kept."""
    from edgekit import BudgetError, CompressConfig, Recipe, compress

    try:
        result = compress(path, train, None, progress=False, config=CompressConfig(recipe=Recipe(quantize="int8")))
    except BudgetError as exc:
        refusal = f"refused (exit 3): {str(exc)[:160]}"
        return {"tflite": refusal, "onnx": refusal}, {}
    arts = {a.format.value: a for a in result.selected.artifacts}
    found: dict[str, bytes | str] = {fmt: art.data for fmt, art in arts.items()}
    for fmt, error in result.selected.format_errors.items():
        found[fmt] = f"not written: {error[:120]}"
    return found, {fmt: art.remedy or "defaults" for fmt, art in arts.items()}


def measure(name: str, work: Path) -> dict:
    from device_agents import Model

    path, train, test = build(name, work)
    with np.load(test) as npz:
        x, y = npz["x"], npz["y"]
    runs, float32 = peers(path, train)
    start = time.perf_counter()
    mine, remedies = edgekit_int8(path, train)
    edgekit_seconds = time.perf_counter() - start
    row: dict = {"name": name, "edgekit_seconds": round(edgekit_seconds), "formats": {}}
    sample = x[:1]
    for fmt, found in runs.items():
        found[f"edgekit ({remedies.get(fmt, '-')})"] = mine[fmt]
        reference = Model.load(float32[fmt], num_threads=1)
        cells = {"float32": {"accuracy": _accuracy(reference, x, y), "bytes": len(float32[fmt]), "time": 1.0}}
        for peer, data in found.items():
            if isinstance(data, str):
                cells[peer] = {"error": data}
                continue
            model = Model.load(data, num_threads=1)
            _, _, ratio = interleaved_us(lambda m=model: m.predict(sample), lambda m=reference: m.predict(sample),
                                         blocks=8, per_block=40)
            cells[peer] = {"accuracy": _accuracy(model, x, y), "bytes": len(data), "time": round(ratio, 3)}
        row["formats"][fmt] = cells
    return row


def _accuracy(model, x: np.ndarray, y: np.ndarray) -> float:  # noqa: ANN001
    return round(float(np.mean(model.predict(x).argmax(1) == y) * 100), 2)


def table(rows: list[dict]) -> str:
    lines = ["| model | format | quantizer | held-out top-1 | drop vs float32 | bytes | time vs float32 |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        for fmt, cells in row["formats"].items():
            base = cells["float32"]["accuracy"]
            for peer, cell in cells.items():
                if "error" in cell:
                    lines.append(f"| {row['name']} | {fmt} | {peer} | {cell['error']} | | | |")
                    continue
                lines.append(f"| {row['name']} | {fmt} | {peer} | {cell['accuracy']:.2f} | "
                             f"{base - cell['accuracy']:+.2f} | {cell['bytes']:,} | {cell['time']:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgekit-peers-") as tmp:
        for name in args.models.split(","):
            print(f"peers: {name}", flush=True)
            rows.append(measure(name, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    ROWS.parent.mkdir(parents=True, exist_ok=True)
    ROWS.write_text("".join(json.dumps(row) + "\n" for row in rows))
    seconds = ", ".join(f"{row['name']} {row['edgekit_seconds']} s" for row in rows)
    write_section("peers", (
        "## edgekit's int8 against its peers (`benchmarks/peers.py`)\n\n"
        f"Measured on {machine()} with `.venv/bin/python benchmarks/peers.py --models {args.models}`. Each model "
        "is trained on the first four fifths of scikit-learn's digits (0-1 pixels) and every artifact is measured "
        "on the last fifth, which edgekit never sees; time is single-sample, one thread, against the float32 "
        "artifact of the same format in alternating blocks. `squeezed` is a CNN whose own "
        "`Rescaling(1/127.5, -1)` is fed 0-1 pixels, as Keras 3 MobileNetV3Small is here: its inputs become "
        "[-1, -0.992]. edgekit's row names the remedy it kept; its compressions took " + seconds + ".\n\n"
        + table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
