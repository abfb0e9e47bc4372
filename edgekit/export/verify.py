"""Run each artifact in its own runtime (through the device agent's code) and compare with the source."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device_agents.errors import AgentError
from device_agents.runtime import Model, TensorSpec
from edgekit.config import Quantization
from edgekit.errors import ConversionError, VerificationError

# Float artifacts must reproduce the source: atol + rtol * max|source output|.
FLOAT_TOLERANCE = {Quantization.NONE: (1e-4, 1e-4), Quantization.FLOAT16: (5e-2, 5e-2)}


@dataclass
class Verification:
    runtime: str
    accuracy: float | None
    top1_agreement: float
    max_abs_diff: float
    tolerance: float | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def verify(artifact: bytes, *, name: str, quantization: Quantization, x: np.ndarray, y: np.ndarray | None,
           source_outputs: np.ndarray) -> Verification:
    """Load ``artifact`` in its runtime, run ``x``, and compare with ``source_outputs``.

    Raises :class:`VerificationError` when a float artifact's outputs stray beyond the tolerance.
    """
    try:
        model = Model.load(artifact, num_threads=None)
        out = model.predict(x)
    except AgentError as exc:
        raise ConversionError(f"{name}: the exported artifact does not run in its runtime: {exc}") from None
    if out.shape != source_outputs.shape:
        raise VerificationError(f"{name}: outputs have shape {out.shape}, the source's {source_outputs.shape}",
                                max_abs_diff=float("inf"), tolerance=0.0, artifact=name)
    diff = float(np.max(np.abs(out - source_outputs))) if out.size else 0.0
    tolerance = None
    if quantization in FLOAT_TOLERANCE:
        atol, rtol = FLOAT_TOLERANCE[quantization]
        tolerance = atol + rtol * float(np.max(np.abs(source_outputs)))
        if not diff <= tolerance:
            raise VerificationError(
                f"{name}: outputs differ from the source model by up to {diff:.3g} "
                f"(tolerance {tolerance:.3g} for {quantization.value})",
                max_abs_diff=diff, tolerance=tolerance, artifact=name)
    agreement = float(np.mean(out.argmax(1) == source_outputs.argmax(1)) * 100.0)
    accuracy = None if y is None else float(np.mean(out.argmax(1) == y) * 100.0)
    return Verification(model.runtime.value, accuracy, agreement, diff, tolerance, model.inputs, model.outputs)
