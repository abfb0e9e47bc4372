"""A model trained with mixed precision, served in float32.

Training on a GPU box often sets ``mixed_precision.set_global_policy("mixed_float16")`` (or ``mixed_bfloat16``): the
weights stay float32 variables, but each layer computes in float16 and the saved model keeps that policy. The
TFLite converter then meets float16 convolutions it has no builtin kernel for (no ``.tflite`` at all), and the
"float32" reference artifacts are float16 computations. So a model whose layers compute in a 16-bit type is
rebuilt from its own config with every dtype policy float32 and given the same weights, before anything else runs:
the same model without the float16 rounding, which is what every artifact is converted and quantized from. The CLI,
the report and the manifest say so, with the largest difference on the user's samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agents.errors import first_line
from edgekit.errors import ModelLoadError
from edgekit.loading.layers import iter_layers

__all__ = ["HALF_TYPES", "Float32Served", "float32_model", "half_policy", "refuse_keras_quantized"]

HALF_TYPES = frozenset({"float16", "bfloat16"})
"""Compute dtypes served in float32 instead (a mixed ``mixed_float16`` / ``mixed_bfloat16`` policy or a plain one)."""


@dataclass(frozen=True)
class Float32Served:
    """A 16-bit model served in float32: its policy, and the largest output difference where it was measured."""

    policy: str
    max_abs_diff: float | None  # None: not rebuilt in float32 (``measured_on`` says why); served as it is
    measured_on: str  # "64 samples of the data" | "random inputs" | why it could not be rebuilt

    def note(self) -> str:
        """What the user should hear."""
        if self.max_abs_diff is None:
            return (f"the model computes in {self.policy} (trained with mixed precision) and cannot be rebuilt in "
                    f"float32 from its config ({self.measured_on}): the TFLite converter has no float16 kernels for "
                    "its layers; save it after mixed_precision.set_global_policy('float32') and loading its weights")
        return (f"the model computes in {self.policy} (trained with mixed precision): edgekit serves it in float32 "
                f"with the same weights (the TFLite converter has no float16 kernels for its layers); outputs differ "
                f"from the {self.policy} model's by at most {self.max_abs_diff:.2g} on {self.measured_on}")


def refuse_keras_quantized(model: Any) -> None:
    """Refuse a Keras 3 model already quantized by Keras (``model.quantize("int8")``: int8/int4/float8 kernels and
    scales in Keras's own layout, dtype policies such as ``int8_from_float32``): the TFLite converter has no builtin
    kernel for its quantized matmuls (``BatchMatMulV3``) and its ONNX export comes out larger than float32. edgekit
    quantizes for the runtimes itself, from the float model."""
    if getattr(model, "inputs", None) is None:
        return
    for layer in iter_layers(model):
        mode = getattr(layer, "quantization_mode", None)
        if mode:
            policy = getattr(getattr(layer, "dtype_policy", None), "name", mode)
            raise ModelLoadError(f"the model was quantized by Keras (layer '{layer.name}': {policy}), in kernels "
                                 "device runtimes do not run; give edgekit the float model (before model.quantize()): "
                                 "it quantizes for TFLite and ONNX runtimes itself")


def half_policy(model: Any) -> str | None:
    """The name of the first 16-bit dtype policy among ``model``'s layers (``None``: every layer computes in a
    32-bit type, or the model has no layer graph)."""
    if getattr(model, "inputs", None) is None:
        return None
    for layer in iter_layers(model):  # tf-keras and Keras 3 alike
        if str(getattr(layer, "compute_dtype", "float32")) in HALF_TYPES:
            policy = getattr(layer, "dtype_policy", None)
            return str(getattr(policy, "name", layer.compute_dtype))
    return None


def _float32_config(value: Any) -> Any:
    """``value`` (a model config) with every dtype and dtype policy naming a 16-bit type replaced by float32."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "dtype" and _names_half(item):
                out[key] = "float32"
            else:
                out[key] = _float32_config(item)
        return out
    if isinstance(value, list):
        return [_float32_config(item) for item in value]
    return value


def _names_half(dtype: Any) -> bool:
    if isinstance(dtype, str):
        return dtype in HALF_TYPES or dtype.removeprefix("mixed_") in HALF_TYPES
    if isinstance(dtype, dict):  # tf-keras {"class_name": "Policy", ...}; Keras 3 {"class_name": "DTypePolicy", ...}
        return _names_half(dtype.get("config", {}).get("name"))
    return False


def float32_model(model: Any, sample: np.ndarray | None) -> tuple[Any, Float32Served | None]:
    """``model`` (tf-keras or Keras 3) rebuilt with float32 dtype policies and its weights, and what was served
    (:class:`Float32Served`, measured on ``sample`` where it fits the input, else on random inputs); ``model``
    itself and ``None`` when every layer computes in 32 bits; ``model`` itself and why, when its config cannot be
    rebuilt (a custom layer's ``from_config``).

    >>> served, was = float32_model(mixed_model, x[:64])   # doctest: +SKIP
    >>> was.policy, was.max_abs_diff < 1e-2                 # doctest: +SKIP
    ('mixed_float16', True)
    """
    policy = half_policy(model)
    if policy is None:
        return model, None
    try:
        served = type(model).from_config(_float32_config(model.get_config()))
        served.set_weights([np.asarray(w, np.float32) if np.asarray(w).dtype.kind == "f" else w
                            for w in model.get_weights()])
    except Exception as exc:  # noqa: BLE001 (a custom layer's from_config can raise anything: served as it is)
        return model, Float32Served(policy, None, first_line(exc, limit=160))
    given = tuple(model.inputs[0].shape[1:])
    fits = sample is not None and tuple(sample.shape[1:]) == given
    x = sample if fits else np.random.default_rng(0).random((8, *(d or 8 for d in given)))
    x = np.asarray(x).astype(str(getattr(model.inputs[0].dtype, "name", model.inputs[0].dtype)))
    before = np.asarray(model(x, training=False), np.float32)
    after = np.asarray(served(x, training=False), np.float32)
    return served, Float32Served(policy, float(np.max(np.abs(before - after))),
                                 f"{len(x)} samples of the data" if fits else "random inputs")
