"""Export and verification: exporters by format (a registry), the TFLite converter and tf2onnx with
onnxruntime's quantizer, and verification of every artifact in its own runtime.

May import: ``edgekit.loading`` and below, and ``device_agents`` (artifacts are run with the
device's own runtime code).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekit.config import Format, Quantization
from edgekit.errors import InputError


@dataclass(frozen=True)
class Exporter:
    """How one format is written: its file name and its converter.

    ``convert(model, quantization=, calibration=, int8_io=)`` gets the model to export (the QAT
    model itself for QAT) and returns the artifact's bytes and notes. ``int8(model, calibration=, int8_io=)``
    prepares the format's post-training int8 quantizer once, to be re-run with the remedies'
    options (:mod:`edgekit.export.remedies`); it is a context manager. ``speed_rungs(data)`` and
    ``size_rungs(data)``: the speed and size rungs the format adds for one int8 artifact (name, option changes),
    read from the artifact alone.
    """

    filename: str
    convert: Callable[..., tuple[bytes, list[str]]]
    int8: Callable[..., Any]
    speed_rungs: Callable[[bytes], list[tuple[str, dict[str, object]]]]
    size_rungs: Callable[[bytes], list[tuple[str, dict[str, object]]]]


def _tflite(model: Any, *, quantization: Quantization, calibration: np.ndarray,
            int8_io: bool) -> tuple[bytes, list[str]]:
    from edgekit.export.tflite import to_tflite

    return to_tflite(model, quantization=quantization, calibration=calibration, int8_io=int8_io)


def _onnx(model: Any, *, quantization: Quantization, calibration: np.ndarray,
          int8_io: bool) -> tuple[bytes, list[str]]:
    from edgekit.export.onnx import to_onnx

    data, notes = to_onnx(model, quantization=quantization, calibration=calibration)
    if int8_io and quantization in (Quantization.INT8, Quantization.QAT):
        notes.append("ONNX QDQ models keep float32 inputs/outputs; int8 I/O applies to TFLite only")
    return data, notes


def _tflite_int8(model: Any, *, calibration: np.ndarray, int8_io: bool) -> Any:
    from edgekit.export.tflite import TfliteInt8

    return TfliteInt8(model, calibration, int8_io=int8_io)


def _onnx_int8(model: Any, *, calibration: np.ndarray, int8_io: bool) -> Any:
    from edgekit.export.onnx import OnnxInt8, float_onnx

    return OnnxInt8(float_onnx(model), calibration)


def _tflite_speed_rungs(data: bytes) -> list[tuple[str, dict[str, object]]]:
    from edgekit.export.tflite import speed_rungs

    return speed_rungs(data)


def _no_speed_rungs(data: bytes) -> list[tuple[str, dict[str, object]]]:
    return []  # onnxruntime runs every quantized op type its quantizer writes


def _onnx_size_rungs(data: bytes) -> list[tuple[str, dict[str, object]]]:
    from edgekit.export.onnx import size_rungs

    return size_rungs(data)


def _no_size_rungs(data: bytes) -> list[tuple[str, dict[str, object]]]:
    return []  # the converter quantizes every weight it has an int8 kernel for


EXPORTERS: dict[Format, Exporter] = {
    Format.TFLITE: Exporter("model.tflite", _tflite, _tflite_int8, _tflite_speed_rungs, _no_size_rungs),
    Format.ONNX: Exporter("model.onnx", _onnx, _onnx_int8, _no_speed_rungs, _onnx_size_rungs),
}
"""Format -> exporter. Every :class:`Format` has one (a test checks it)."""


def exporter(fmt: Format | str) -> Exporter:
    """The registered exporter of ``fmt``; unknown formats are refused with the valid list."""
    try:
        return EXPORTERS[Format(fmt)]
    except (ValueError, KeyError):
        raise InputError(f"unknown format {fmt!r}; valid: {', '.join(f.value for f in EXPORTERS)}") from None
