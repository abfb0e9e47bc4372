"""The weight-name contract of the trainable artifact.

A Keras weight ``<layer>/<variable>`` is the tensor ``tensor_key(layer, variable)`` everywhere it
travels: in the artifact's ``get_weights``/``set_weights`` signatures, in ``manifest.json``
(``trainable.tensors``), in federated messages and checkpoints. :func:`keras_with_weights` maps
such tensors back onto a Keras model (to compress the final global model of a federated run).

>>> tensor_key("conv2d", "kernel")
'conv2d_kernel'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np


def tensor_key(layer_name: str, variable: str) -> str:
    """The tensor name of ``layer_name``'s weight ``variable`` (non-word characters become ``_``)."""
    return re.sub(r"\W", "_", f"{layer_name}/{variable}")


def weight_key(layer: Any, weight: Any) -> str:
    """The tensor name of a Keras ``weight`` (a variable named ``.../<variable>:0``) of ``layer``."""
    return tensor_key(layer.name, weight.name.split("/")[-1].split(":")[0])


@dataclass(frozen=True)
class TensorInfo:
    """One trainable tensor as the manifest lists it."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


def keras_with_weights(model: Any, weights: dict[str, np.ndarray]) -> Any:
    """A copy of the tf-keras ``model`` holding ``weights`` (named by :func:`weight_key`); others unchanged."""
    from edgekit.loading.models import copy_model

    copy = copy_model(model)
    for layer in copy.layers:
        values = [weights.get(weight_key(layer, w), w.numpy()) for w in layer.weights]
        if values:
            layer.set_weights(values)
    return copy
