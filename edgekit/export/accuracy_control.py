"""Quantization with accuracy control: NNCF's ``quantize_with_accuracy_control`` as a rung of the ONNX remedy ladder.

NNCF (OpenVINO's Neural Network Compression Framework, ONNX backend, no torch) quantizes the float model, ranks its
quantized operations by the accuracy each one costs on a labelled ranking subset, and reverts them to float one
group at a time, greedily, until the accuracy drop is within ``max_drop``. On Keras 3 MobileNetV3Small fed 0-1
pixels (its own ``Rescaling`` squeezes them into [-1, -0.992]) it kept the first convolution and the first
hard-swish float and lost 0.25 points where every onnxruntime rung lost 24-79 (issue 28).

The validation data is the calibration split with its labels (disjoint from the evaluation split the budget is
judged on); without labels the float model's own predictions stand in for them (the metric is then top-1
agreement). Whatever NNCF returns is verified and scored by edgekit like every other rung.

NNCF's telemetry (``openvino-telemetry``, on by default) is switched off before NNCF is imported (:func:`_nncf`):
edgekit writes nothing outside its output and sends nothing anywhere.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

NNCF_RUNG = "nncf-accuracy-control"
"""The rung's name in the manifest's ``remedies_tried``."""
VALIDATION_BATCH = 32


@dataclass(frozen=True)
class Labelled:
    """Samples and labels for an accuracy-controlled search (``y`` is ``None`` when the user has no labels)."""

    x: np.ndarray
    y: np.ndarray | None


@dataclass(frozen=True)
class AccuracyControl:
    """What an accuracy-controlled search gets: labelled data and the drop (points) it may cost against the float
    model it quantizes."""

    validation: Labelled
    max_drop: float


@dataclass(frozen=True)
class Controlled:
    """What NNCF returned: the quantized model and the operations it kept float (their names in its graph)."""

    data: bytes
    reverted: tuple[str, ...]


def _nncf() -> Any:
    """NNCF, imported with its telemetry off. Its ``NNCF_CI`` switch is not enough: NNCF builds its
    ``openvino_telemetry.Telemetry`` before it reads the switch, and that constructor writes a client ID under
    ``~/intel``. With ``openvino_telemetry`` unimportable, NNCF uses its own stub and nothing is written or sent."""
    if "nncf" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type] (None: the import fails)
        os.environ["NNCF_CI"] = "1"
    import nncf

    return nncf


class _Reverted(logging.Handler):
    """Collects the names of the operations NNCF reports reverted to float (its log is the only place it says)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "were reverted back to the floating-point precision" in message:
            self.names = [line.strip() for line in message.splitlines()[1:] if line.strip()]


def _predict(session: Any, x: np.ndarray, input_name: str, batch: int) -> np.ndarray:
    step = batch or VALIDATION_BATCH
    usable = len(x) - len(x) % batch if batch else len(x)
    return np.concatenate([np.asarray(session.run(None, {input_name: x[i:i + step]})[0])
                           for i in range(0, usable, step)])


def _session(model: Any) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def accuracy_controlled(model: Any, calibration: np.ndarray, validation: Labelled, *, max_drop: float,
                        input_name: str, batch: int = 0) -> Controlled:
    """NNCF's accuracy-controlled int8 quantization of the float ONNX ``model`` (an ``onnx.ModelProto``): its
    top-1 accuracy on ``validation`` (percent) may drop at most ``max_drop`` points.

    ``batch``: the model's fixed batch dimension (0 when free); samples are fed in runs of that size.

    >>> controlled = accuracy_controlled(proto, calibration, Labelled(x, y), max_drop=2.0,  # doctest: +SKIP
    ...                                  input_name="input")
    """
    nncf = _nncf()
    from nncf.common.logging import nncf_logger

    step = batch or 1
    usable = len(calibration) - len(calibration) % step
    calibration_items = [calibration[i:i + step] for i in range(0, usable, step)]
    labels = validation.y
    if labels is None:  # no labels: the float model's own predictions (the metric becomes top-1 agreement)
        labels = _predict(_session(model), validation.x, input_name, batch).argmax(axis=-1)
    usable = len(validation.x) - len(validation.x) % step
    items = [(validation.x[i:i + step], labels[i:i + step]) for i in range(0, usable, step)]

    def validate(candidate: Any, data: Any) -> tuple[float, list[float]]:
        session = _session(candidate)
        correct: list[float] = []
        for x, y in data:
            predicted = np.asarray(session.run(None, {input_name: x})[0]).reshape(len(x), -1).argmax(axis=-1)
            correct.extend(100.0 * (predicted == y).astype(np.float64))
        return (float(np.mean(correct)) if correct else 0.0), correct

    reverted = _Reverted()
    level = nncf_logger.level
    nncf_logger.addHandler(reverted)
    nncf_logger.setLevel(logging.INFO)
    quiet = [h for h in nncf_logger.handlers if h is not reverted]
    for handler in quiet:
        nncf_logger.removeHandler(handler)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            quantized = nncf.quantize_with_accuracy_control(
                model, nncf.Dataset(calibration_items, lambda item: {input_name: item}),
                nncf.Dataset(items, lambda item: {input_name: item[0]}), validate,
                max_drop=max(float(max_drop), 0.0), drop_type=nncf.DropType.ABSOLUTE,
                subset_size=len(calibration_items))
    finally:
        nncf_logger.removeHandler(reverted)
        for handler in quiet:
            nncf_logger.addHandler(handler)
        nncf_logger.setLevel(level)
    return Controlled(quantized.SerializeToString(), tuple(reverted.names))
