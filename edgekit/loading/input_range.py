"""Does the data fit the model's own preprocessing? A model that rescales or normalizes its input itself
(keras.applications' ``include_preprocessing``, a ``Rescaling`` or ``Normalization`` layer first) expects inputs in
the range it was built for. Fed another range (0-1 pixels into ``Rescaling(1/127.5, -1)``, built for 0-255), the
layer squeezes the data into a sliver of its output range (MobileNetV3Small: [-1, -0.992]): a large constant plus a
tiny signal, which the model learns little from and int8 cannot represent (one quantization step is wider than the
whole signal).

>>> share_of_range(low=0.0, high=1.0, scale=1 / 127.5, offset=-1.0)
0.00392156862745098
"""

from __future__ import annotations

from typing import Any

import numpy as np

TINY_SHARE = 0.05
"""A preprocessing layer whose output the data spans less than this share of is flagged."""
PREPROCESSING = ("Rescaling", "Normalization")


def share_of_range(*, low: float, high: float, scale: float, offset: float) -> float:
    """The share of ``Rescaling(scale, offset)``'s intended output range ([0, 1], or [-1, 1] with an offset) that
    inputs in ``[low, high]`` cover."""
    intended = 2.0 if offset else 1.0
    return abs(high - low) * abs(scale) / intended


def input_range_warnings(model: Any, x: np.ndarray) -> list[str]:
    """One line per leading preprocessing layer of ``model`` that ``x`` fills less than :data:`TINY_SHARE` of, with
    the numbers; empty when the data fits (or the model has no such layer)."""
    from edgekit.loading.layers import iter_layers

    if not hasattr(model, "layers") or x.size == 0 or not np.issubdtype(x.dtype, np.floating):
        return []
    low, high = (float(v) for v in np.percentile(x, [0.1, 99.9]))
    warnings = []
    for layer in iter_layers(model):
        kind = layer.__class__.__name__
        if kind not in PREPROCESSING:
            if layer.weights or kind not in ("InputLayer",):
                break  # only the layers before the first computation see the raw data
            continue
        config = layer.get_config()
        if kind == "Rescaling":
            scale, offset = float(np.mean(config["scale"])), float(np.mean(config["offset"]))
            share = share_of_range(low=low, high=high, scale=scale, offset=offset)
            if share < TINY_SHARE:
                out_low, out_high = sorted((low * scale + offset, high * scale + offset))
                intended = "[-1, 1]" if offset else "[0, 1]"
                warnings.append(
                    f"the model's own Rescaling layer '{layer.name}' (x * {scale:.4g} + {offset:g}) maps the data "
                    f"({low:.3g} to {high:.3g}) into [{out_low:.3f}, {out_high:.3f}], {share:.1%} of the {intended} "
                    f"it was built for (inputs 0 to {abs(1 / scale) * (2 if offset else 1):.4g}): feed it data in "
                    "that range, or drop the layer")
            low, high = sorted((low * scale + offset, high * scale + offset))
        else:
            stats = _normalization_stats(layer)
            if stats is None:
                break
            mean, variance = stats
            spread = float(np.mean((high - low) / np.sqrt(np.maximum(variance, 1e-12))))
            if spread < TINY_SHARE * 4:  # a normalized range is about 4 units wide (+-2 standard deviations)
                warnings.append(
                    f"the model's own Normalization layer '{layer.name}' (mean {float(np.mean(mean)):.3g}, "
                    f"std {float(np.mean(np.sqrt(variance))):.3g}) sees data from {low:.3g} to {high:.3g}, "
                    f"{spread:.3g} standard deviations wide: feed it data like what it was adapted to")
            break
    return warnings


def _normalization_stats(layer: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """A Normalization layer's mean and variance: adapted (its weights) or given to its constructor (attributes
    without weights: keras.applications' ``include_preprocessing``, EfficientNetV2's); ``None`` when it has none."""
    try:
        return np.asarray(layer.mean, np.float64), np.asarray(layer.variance, np.float64)
    except (AttributeError, TypeError, ValueError):
        return None
