"""The registry of Keras layer types edgekit accepts, and what it can do with each.

A model whose layers are not all registered here is refused before any training starts, with
an error naming the first such layer. The device-side training support of a layer is registered
separately, in :mod:`edgekit.trainable.graph`.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgekit.errors import UnsupportedLayerError


@dataclass(frozen=True)
class LayerSupport:
    """What edgekit can do with one layer type.

    ``prune``: tensorflow-model-optimization can prune its weights. ``qat``: tfmot's default
    8-bit scheme can annotate it for quantization-aware training. ``scale``: the attribute a
    thinner distillation student scales (``filters``, ``units``...), or ``None``.
    """

    prune: bool = False
    qat: bool = True
    scale: str | None = None


LAYERS: dict[str, LayerSupport] = {
    "Activation": LayerSupport(),
    "Add": LayerSupport(),
    "AveragePooling1D": LayerSupport(),
    "AveragePooling2D": LayerSupport(),
    "BatchNormalization": LayerSupport(),
    "Bidirectional": LayerSupport(qat=False),
    "Concatenate": LayerSupport(),
    "Conv1D": LayerSupport(prune=True, scale="filters"),
    "Conv2D": LayerSupport(prune=True, scale="filters"),
    "Dense": LayerSupport(prune=True, scale="units"),
    "DepthwiseConv2D": LayerSupport(),  # tfmot's prune registry lists no prunable weights for it
    "Dropout": LayerSupport(),
    "Embedding": LayerSupport(prune=True, qat=False, scale="output_dim"),
    "Flatten": LayerSupport(),
    "GlobalAveragePooling1D": LayerSupport(),
    "GlobalAveragePooling2D": LayerSupport(),
    "GlobalMaxPooling1D": LayerSupport(),
    "GlobalMaxPooling2D": LayerSupport(),
    "GRU": LayerSupport(prune=True, qat=False, scale="units"),
    "InputLayer": LayerSupport(),
    "LSTM": LayerSupport(prune=True, qat=False, scale="units"),
    "MaxPooling1D": LayerSupport(),
    "MaxPooling2D": LayerSupport(),
    "Multiply": LayerSupport(),
    "ReLU": LayerSupport(),
    "SimpleRNN": LayerSupport(prune=True, qat=False, scale="units"),
    "Reshape": LayerSupport(),
    "SeparableConv2D": LayerSupport(prune=True, scale="filters"),
    "Softmax": LayerSupport(),
    "ZeroPadding2D": LayerSupport(),
}
"""Layer class name -> what edgekit can do with it (Keras 2 and Keras 3 share these names)."""

_ALIASES = {"MaxPool1D": "MaxPooling1D", "MaxPool2D": "MaxPooling2D", "AvgPool2D": "AveragePooling2D",
            "AvgPool1D": "AveragePooling1D", "GlobalAvgPool2D": "GlobalAveragePooling2D",
            "GlobalAvgPool1D": "GlobalAveragePooling1D", "Convolution2D": "Conv2D", "Convolution1D": "Conv1D"}


def support(layer_type: str, *, layer_name: str = "?") -> LayerSupport:
    """Return the registered support of ``layer_type`` or raise :class:`UnsupportedLayerError`."""
    entry = LAYERS.get(_ALIASES.get(layer_type, layer_type))
    if entry is None:
        raise UnsupportedLayerError(
            f"layer '{layer_name}' is a {layer_type}, which edgekit does not support; "
            f"supported layers: {', '.join(sorted(LAYERS))}",
            layer_name=layer_name, layer_type=layer_type,
        )
    return entry


def iter_layers(model):  # noqa: ANN001, ANN201  (a tf-keras model; TensorFlow stays lazy)
    """Yield every leaf layer of ``model``, descending into nested models."""
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.__class__.__name__ in ("Functional", "Sequential", "Model"):
            yield from iter_layers(layer)
        else:
            yield layer


def check_model(model, *, need: str | None = None) -> None:  # noqa: ANN001
    """Raise :class:`UnsupportedLayerError` for the first layer edgekit cannot handle.

    ``need`` names a capability (``"prune"`` or ``"qat"``) every weighted layer must have.
    """
    for layer in iter_layers(model):
        entry = support(layer.__class__.__name__, layer_name=layer.name)
        if need == "qat" and not entry.qat:
            raise UnsupportedLayerError(
                f"layer '{layer.name}' is a {layer.__class__.__name__}, which quantization-aware training "
                "does not support; use post-training int8 or dynamic quantization for this model",
                layer_name=layer.name, layer_type=layer.__class__.__name__,
            )
        activation = getattr(layer, "activation", None)
        if activation is not None and getattr(activation, "__name__", "") == "<lambda>":
            raise UnsupportedLayerError(
                f"layer '{layer.name}' uses a lambda activation, which cannot be exported; use a named one",
                layer_name=layer.name, layer_type=layer.__class__.__name__,
            )
