"""edgekit's int8 against its peers, side by side on the same models and the same held-out samples.

Peers, each run as its documentation shows, on the model's float32 artifact and the same 256 calibration samples:

- the TFLite converter's post-training int8 (full-integer, float I/O) and onnxruntime's ``quantize_static`` with
  its defaults (QDQ, U8S8, min-max), as edgekit's exporters call them before any rung of edgekit's (accuracy,
  speed or size) runs;
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

    .venv/bin/python benchmarks/peers.py [--models NAME,NAME]

Each model's row is kept in benchmarks/results/peers.jsonl with the commit it was measured at; ``--models``
re-measures those and keeps the others, so the long run (DenseNet121's compressions take the longest) can be done in
parts. Below each model's rows, a verdict per format against the target: edgekit within 0.3 points of the most
accurate peer, and the smallest or the fastest of the artifacts within the default 2-point budget; a gap says
whether the held-out split can tell it from noise (the paired 95% margin of two models' accuracies on the same
samples, ``edgekit.artifacts.uncertainty.drop_margin``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from _report import ROOT, commit, interleaved_us, machine, write_section  # noqa: E402

from edgekit.artifacts.uncertainty import drop_margin  # noqa: E402

MODELS = ("cnn", "squeezed", "mobilenetv3small", "mobilenetv3small-0-255", "mobilenetv2", "efficientnetb0",
          "densenet121", "transformer")
"""``cnn`` and ``squeezed`` are tf-keras CNNs on 8x8 digits; the others are Keras 3 models of the conformance suite
(``edgekit.loading.zoo``) on 32x32x3 digits, ``mobilenetv3small`` fed 0-1 pixels (its own Rescaling squeezes them),
``-0-255`` and EfficientNetB0 fed the 0-255 pixels Keras documents, and the transformer on token ids."""
EPOCHS = {"cnn": 30, "squeezed": 30, "mobilenetv3small": 30, "transformer": 8}  # the others: 12
BUDGET = 2.0  # edgekit's default max_accuracy_drop (points): "within budget" in the verdicts
SAME_TIME = 1.05  # time ratios within 5% of each other tie (see verdict)
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


def _data(name: str) -> tuple[np.ndarray, np.ndarray]:
    from edgekit.loading import zoo
    from edgekit.loading.data import load_digits

    if name == "transformer":
        tokens = zoo.token_dataset(n=1500)
        return tokens.x, tokens.y
    if name in ("cnn", "squeezed"):
        data = load_digits()
        return data.x, data.y
    data = load_digits(32, 3)
    wide = name == "mobilenetv3small-0-255" or (name in zoo.PIXELS_0_255 and name != "mobilenetv3small")
    return (data.x * 255 if wide else data.x), data.y


def _model(name: str, x: np.ndarray):  # noqa: ANN202
    """A freshly initialised model and its Keras (tf-keras for the CNNs, Keras 3 for the others)."""
    from edgekit import _tf
    from edgekit.loading import zoo

    if name not in ("cnn", "squeezed"):
        keras = _tf.keras3()
        keras.utils.set_random_seed(0)
        return zoo.keras3_architecture(name.removesuffix("-0-255"), sample=x[:200]), keras
    keras = _tf.keras()
    keras.utils.set_random_seed(0)
    layers = keras.layers
    body = [layers.Conv2D(16, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
            layers.Conv2D(32, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
            layers.GlobalAveragePooling2D(), layers.Dense(10, activation="softmax")]
    squeeze = [layers.Rescaling(1 / 127.5, -1)] if name == "squeezed" else []
    return keras.Sequential([layers.Input((8, 8, 1)), *squeeze, *body]), keras


def build(name: str, work: Path) -> tuple[Path, Path, Path]:
    """The model trained on the first four fifths of its data, saved as its user would (``.h5`` for tf-keras,
    ``.keras`` for Keras 3), and the train and held-out .npz files."""
    x_all, y_all = _data(name)
    cut = len(x_all) * 4 // 5
    np.savez(work / f"{name}-train.npz", x=x_all[:cut], y=y_all[:cut])
    np.savez(work / f"{name}-test.npz", x=x_all[cut:], y=y_all[cut:])
    x, y = x_all[:cut], y_all[:cut]
    model, keras = _model(name, x)
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=EPOCHS.get(name, 12), batch_size=32, verbose=0)
    if name != "transformer":
        _settle_batchnorm(model, x, keras.layers)
    path = work / (f"{name}.h5" if name in ("cnn", "squeezed") else f"{name}.keras")
    model.save(path)
    return path, work / f"{name}-train.npz", work / f"{name}-test.npz"


ABLATIONS = ("NNCF quantize, no bias correction",)
"""Rows that take a peer's step away to measure what it is worth: not peers, so no verdict counts them."""


def _nncf_plain(onnx_float: bytes, calibration: np.ndarray, *, bias_correction: bool = True) -> bytes:
    """NNCF's default post-training int8 (min-max, then its fast bias correction unless ``bias_correction`` is
    off: the ablation that tells whether bias correction is what puts NNCF ahead of onnxruntime's quantizer)."""
    import onnx

    from edgekit.export.accuracy_control import _nncf

    nncf = _nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    items = [calibration[i:i + 1] for i in range(len(calibration))]
    model = nncf.quantize(onnx.load_from_string(onnx_float), nncf.Dataset(items, lambda item: {"input": item}),
                          subset_size=len(items), advanced_parameters=AdvancedQuantizationParameters(
                              disable_bias_correction=not bias_correction))
    return model.SerializeToString()


def _nncf_controlled(onnx_float: bytes, calibration: np.ndarray, x: np.ndarray, y: np.ndarray) -> bytes:
    import onnx

    from edgekit.export.accuracy_control import Labelled, accuracy_controlled

    return accuracy_controlled(onnx.load_from_string(onnx_float), calibration, Labelled(x, y), max_drop=1.0,
                               input_name="input").data


def peers(path: Path, train: Path) -> tuple[dict[str, dict[str, bytes | str]], dict[str, bytes]]:
    """format -> peer -> artifact (or why it failed); format -> the float32 artifact."""
    from edgekit import Format, Quantization
    from edgekit.export import exporter
    from edgekit.export.tflite import compact, litert_quantize
    from edgekit.loading.models import load_model

    with np.load(train) as npz:
        calibration = npz["x"][:CALIBRATION]
        validation = (npz["x"][-CALIBRATION:], npz["y"][-CALIBRATION:])
    source = load_model(path).source  # the converters' own defaults: no edgekit rung (accuracy, speed, size) runs
    plain, int8 = ({fmt.value: exporter(fmt).convert(source, quantization=quantization, calibration=calibration,
                                                     int8_io=False)[0] for fmt in Format}
                   for quantization in (Quantization.NONE, Quantization.INT8))
    runs: dict[str, dict[str, bytes | str]] = {
        "tflite": {"TFLite converter int8": int8["tflite"]},
        "onnx": {"onnxruntime quantize_static": int8["onnx"]},
    }
    attempts = {
        ("tflite", "LiteRT Quantizer static_wi8_ai8"):
            lambda: compact(litert_quantize(plain["tflite"], calibration, "static_wi8_ai8")),
        ("onnx", "NNCF quantize"): lambda: _nncf_plain(plain["onnx"], calibration),
        ("onnx", ABLATIONS[0]):
            lambda: _nncf_plain(plain["onnx"], calibration, bias_correction=False),
        ("onnx", "NNCF accuracy control (1 pt)"): lambda: _nncf_controlled(plain["onnx"], calibration, *validation),
    }
    for (fmt, peer), run in attempts.items():
        try:
            runs[fmt][peer] = run()
        except Exception as exc:  # noqa: BLE001 (a failure is a result: it goes in the table)
            runs[fmt][peer] = f"failed: {type(exc).__name__}: {_last_words(exc)}"
    return runs, plain


def edgekit_int8(path: Path, train: Path) -> tuple[dict[str, bytes | str], dict[str, str], dict[str, dict]]:
    """format -> edgekit's int8 artifact (or its refusal), the remedy each kept and the rungs it tried (name ->
    drop on edgekit's evaluation split; ``None``: wrote nothing that runs)."""
    from edgekit import BudgetError, CompressConfig, Recipe, compress

    try:
        result = compress(path, train, None, progress=False, config=CompressConfig(recipe=Recipe(quantize="int8")))
    except BudgetError as exc:
        refusal = f"refused (exit 3): {str(exc)[:160]}"
        return {"tflite": refusal, "onnx": refusal}, {}, {}
    arts = {a.format.value: a for a in result.selected.artifacts}
    found: dict[str, bytes | str] = {fmt: art.data for fmt, art in arts.items()}
    for fmt, error in result.selected.format_errors.items():
        found[fmt] = f"not written: {error[:120]}"
    tried = {fmt: {name: (round(score, 2) if math.isfinite(score) else None)
                   for name, score in art.remedies_tried.items()} for fmt, art in arts.items()}
    return found, {fmt: art.remedy or "defaults" for fmt, art in arts.items()}, tried


def measure(name: str, work: Path) -> dict:
    from device_agents import Model

    path, train, test = build(name, work)
    with np.load(test) as npz:
        x, y = npz["x"], npz["y"]
    runs, float32 = peers(path, train)
    start = time.perf_counter()
    mine, remedies, tried = edgekit_int8(path, train)
    edgekit_seconds = time.perf_counter() - start
    row: dict = {"name": name, "commit": commit(), "machine": _cpus(), "edgekit_seconds": round(edgekit_seconds),
                 "n": len(y),
                 "formats": {}, "edgekit_tried": tried}
    sample = x[:1]
    for fmt, found in runs.items():
        found[f"edgekit ({remedies.get(fmt, '-')})"] = mine[fmt]
        reference = Model.load(float32[fmt], num_threads=1)
        base = reference.predict(x).argmax(1)
        cells = {"float32": {"accuracy": _accuracy(base, y), "bytes": len(float32[fmt]), "time": 1.0}}
        answers = {}
        for peer, data in found.items():
            if isinstance(data, str):
                cells[peer] = {"error": data}
                continue
            try:  # an artifact its runtime loads but cannot run is a result: it goes in the table
                model = Model.load(data, num_threads=1)
                answers[peer] = model.predict(x).argmax(1)
            except Exception as exc:  # noqa: BLE001
                cells[peer] = {"error": f"does not run: {type(exc).__name__}: {_last_words(exc)}"}
                continue
            _, _, ratio = interleaved_us(lambda m=model: m.predict(sample), lambda m=reference: m.predict(sample),
                                         blocks=8, per_block=40)
            cells[peer] = {"accuracy": _accuracy(answers[peer], y), "bytes": len(data), "time": round(ratio, 3),
                           "margin": round(drop_margin(_accuracy(answers[peer], base), len(y)), 2),
                           "sha256": hashlib.sha256(data).hexdigest(), "answers": answers[peer].tolist()}
        row["formats"][fmt] = cells
    return row


def _last_words(exc: Exception) -> str:
    """The runtime's own complaint, without its source path (onnxruntime: "... Status Message: /src...cc:75 ...")."""
    return str(exc).splitlines()[0].rsplit("] ", 1)[-1][-140:]


def _accuracy(answers: np.ndarray, y: np.ndarray) -> float:
    return round(float(np.mean(answers == y) * 100), 2)


def verdict(cells: dict[str, dict], n: int) -> str:
    """edgekit's row against the target: within 0.3 points of the most accurate peer, and the smallest or the
    fastest artifact of those within the budget; a gap is compared with the paired margin of the two models. An
    artifact byte for byte a peer's (edgekit's first rung is the converter's or onnxruntime's defaults) ties with it;
    times within 5% tie (measured: two runs of one artifact, edgekit's and its twin's, differ by up to 3%)."""
    ran = {peer: cell for peer, cell in cells.items()
           if "answers" in cell and peer != "float32" and peer not in ABLATIONS}
    ours = next((peer for peer in cells if peer.startswith("edgekit")), None)
    rivals = [peer for peer in ran if peer != ours]
    if ours not in ran or not rivals:
        return "edgekit wrote no artifact" if ours not in ran else "no peer wrote an artifact"
    mine = ran[ours]
    best = max(rivals, key=lambda peer: ran[peer]["accuracy"])
    gap = ran[best]["accuracy"] - mine["accuracy"]
    agreement = float(np.mean(np.array(mine["answers"]) == np.array(ran[best]["answers"])) * 100)
    margin = drop_margin(agreement, n)
    within = [peer for peer in ran if cells["float32"]["accuracy"] - ran[peer]["accuracy"] <= BUDGET]
    accurate = ("within 0.3 points of the most accurate peer" if gap <= 0.3 else
                f"{gap:.2f} points behind {best} ({'within' if gap <= margin else 'beyond'} the paired 95% margin, "
                f"{margin:.2f})")
    if ours not in within:
        return f"{accurate}; edgekit's artifact is not within {BUDGET:g} points on the held-out split"
    twins = [peer for peer in within if ran[peer]["sha256"] == mine["sha256"] and peer != ours]
    smallest = min(within, key=lambda peer: ran[peer]["bytes"])
    fastest = min(within, key=lambda peer: ran[peer]["time"])
    lead = [what for what, peer, same in (("smallest", smallest, mine["bytes"] <= ran[smallest]["bytes"]),
                                          ("fastest", fastest, mine["time"] <= ran[fastest]["time"] * SAME_TIME
                                           or fastest in twins)) if same]
    ranks = " and ".join(lead) if lead else f"neither the smallest ({smallest}) nor the fastest ({fastest})"
    same = f" (byte for byte {twins[0]}'s)" if twins else ""
    return f"{accurate}; {ranks} of those within {BUDGET:g} points{same}"


def _cpus() -> str:
    """This machine's cores and CPU model (``2 cores (AMD EPYC ...)``), as a row records it."""
    return machine().split(", Python")[0]


def table(rows: list[dict], head: str) -> str:
    here = _cpus()
    lines = ["| model | format | quantizer | held-out top-1 | drop vs float32 (95% margin) | bytes | time vs float32 |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        label = row["name"] if row.get("commit", head) == head else f"{row['name']} (commit {row.get('commit')})"
        if row.get("machine", here) != here:  # rows kept from another run: each row's ratios are its own machine's
            label += f" ({row['machine']})"
        for fmt, cells in row["formats"].items():
            base = cells["float32"]["accuracy"]
            for peer, cell in cells.items():
                if "error" in cell:
                    lines.append(f"| {label} | {fmt} | {peer} | {cell['error']} | | | |")
                    continue
                margin = f" (±{cell['margin']:.2f})" if "margin" in cell else ""
                lines.append(f"| {label} | {fmt} | {peer} | {cell['accuracy']:.2f} | "
                             f"{base - cell['accuracy']:+.2f}{margin} | {cell['bytes']:,} | {cell['time']:.2f}x |")
            if any("answers" in cell for cell in cells.values()):
                lines.append(f"| {label} | {fmt} | **verdict** | {verdict(cells, row['n'])} | | | |")
    return "\n".join(lines)


def ladders(rows: list[dict]) -> str:
    """The rungs each edgekit artifact that needed a remedy went through, with each rung's drop on edgekit's own
    evaluation split (the split its budget is judged on; the table's figures are on the held-out one)."""
    lines = []
    for row in rows:
        for fmt, tried in row.get("edgekit_tried", {}).items():
            if len(tried) > 1:
                steps = ", ".join(f"{name} {'fails' if drop is None else f'{drop:.2f}'}"
                                  for name, drop in tried.items())
                lines.append(f"- {row['name']} `.{fmt}`: {steps}")
    if not lines:
        return ""
    return ("\n\nedgekit's remedy ladders, each rung's drop on edgekit's own evaluation split (the table names "
            "the one kept; the speed and size rungs that followed are in the manifest):\n\n" + "\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=lambda text: [n for n in text.split(",") if n], default=list(MODELS),
                        help=f"comma-separated, of: {', '.join(MODELS)} ('' rewrites the table from the kept rows)")
    args = parser.parse_args()
    unknown = set(args.models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    kept = {row["name"]: row for row in map(json.loads, ROWS.read_text().splitlines())} if ROWS.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="edgekit-peers-") as tmp:
        for name in args.models:
            print(f"peers: {name}", flush=True)
            kept[name] = measure(name, Path(tmp))
            print(json.dumps(kept[name]), flush=True)
            ROWS.parent.mkdir(parents=True, exist_ok=True)
            ROWS.write_text("".join(json.dumps(kept[n]) + "\n" for n in MODELS if n in kept))
    rows = [kept[n] for n in MODELS if n in kept]
    seconds = ", ".join(f"{row['name']} {row['edgekit_seconds']} s" for row in rows)
    write_section("peers", (
        "## edgekit's int8 against its peers (`benchmarks/peers.py`)\n\n"
        f"Measured on {machine()} with `.venv/bin/python benchmarks/peers.py` (rows measured at another commit say "
        "so, and name their CPU when it was recorded and differs; rows older than that record were measured on 2 "
        "cores of this workplace whose CPU model may differ: each row's time ratios are measured within its own "
        "run; `--models` re-measures some and keeps the others). Each model is trained on the first four fifths of "
        "its data (scikit-learn's digits, 8x8 for the CNNs and 32x32x3 for the Keras 3 applications; token ids for "
        "the transformer) and every artifact is measured on the last fifth, which edgekit never sees; the drop's "
        "margin is the paired 95% margin against float32 on those samples; time is single-sample, one thread, "
        "against the float32 artifact of the same format in alternating blocks. `squeezed` is a CNN whose own "
        "`Rescaling(1/127.5, -1)` is fed 0-1 pixels, as Keras 3 MobileNetV3Small is in the `mobilenetv3small` "
        "rows: its inputs become [-1, -0.992] (`-0-255`: the 0-255 pixels Keras documents). edgekit runs with its "
        "defaults (a 2-point budget judged on its own evaluation split of the training data); its row names the "
        "remedy it kept; its compressions took " + seconds + ".\n\n" + table(rows, commit()) + ladders(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
