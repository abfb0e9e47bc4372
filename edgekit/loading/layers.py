"""What edgekit's training-based techniques do with each layer, decided per layer, never per model.

Post-training paths take any layer the converters take. Pruning, QAT and distillation apply to the
layers they can handle and leave the others as they are, with the reason (:func:`prune_skip_reason`,
:func:`qat_skip_reason`, :data:`SCALE_ATTRIBUTES`). Pruning follows the registry below, whose claims are
checked against tensorflow-model-optimization's own in the tests; QAT asks tfmot's default 8-bit
registry about each layer instance. The device-side training support of a layer is registered
separately, in :mod:`edgekit.trainable.graph`.
"""

from __future__ import annotations

from typing import Any

from edgekit.errors import UnsupportedLayerError

PRUNABLE: frozenset[str] = frozenset({
    "Conv1D", "Conv2D", "Dense", "Embedding", "GRU", "LSTM", "SeparableConv2D", "SimpleRNN",
})
"""Layer classes whose weights tensorflow-model-optimization prunes (DepthwiseConv2D is listed in tfmot's
registry with no prunable weight, so it is not here)."""

M_BY_N_LAYERS: frozenset[str] = frozenset({"Conv2D", "Dense"})
"""The layers tfmot's m-by-n (2:4) pruning handles."""

SCALE_ATTRIBUTES: dict[str, str] = {
    "Conv1D": "filters", "Conv2D": "filters", "Dense": "units", "Embedding": "output_dim", "GRU": "units",
    "LSTM": "units", "MultiHeadAttention": "key_dim", "SeparableConv2D": "filters", "SimpleRNN": "units",
}
"""Layer class -> the width a thinner distillation student scales; other layers are kept as they are."""

QAT_ACTIVATIONS: frozenset[str] = frozenset({"gelu", "linear", "relu", "sigmoid", "softmax", "swish", "tanh"})
"""Activations tfmot's default 8-bit scheme quantizes inside a layer (``QuantizeAwareActivation``)."""
QAT_ACTIVATION_LAYERS: frozenset[str] = QAT_ACTIVATIONS | {"relu6"}
"""Activations tfmot's scheme quantizes as an ``Activation`` layer (``Default8BitActivationQuantizeConfig``)."""

AUGMENTATION_LAYERS: frozenset[str] = frozenset({
    "AugMix", "CutMix", "MixUp", "RandAugment", "RandomBrightness", "RandomColorDegeneration", "RandomColorJitter",
    "RandomContrast", "RandomElasticTransform", "RandomErasing", "RandomFlip", "RandomGaussianBlur",
    "RandomGrayscale", "RandomHue", "RandomInvert", "RandomPerspective", "RandomPosterization", "RandomRotation",
    "RandomSaturation", "RandomSharpness", "RandomShear", "RandomTranslation", "RandomZoom",
})
"""Data-augmentation layers: they change their input only while training and pass it through at inference (each
checked in the tests, in Keras 3). ``RandomCrop`` is not one: it crops at inference too. Keras 3's ``model.export``
keeps their random ops in the inference graph, which TFLite has no builtin kernel for; edgekit exports the model
without them (:func:`edgekit.loading.graph.export_keras3`)."""

_KERNEL_NAMES = ("kernel", "depthwise_kernel", "pointwise_kernel", "embeddings", "recurrent_kernel")


def iter_layers(model: Any) -> Any:
    """Yield every leaf layer of a tf-keras (or Keras 3) ``model``, descending into nested models."""
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.__class__.__name__ in ("Functional", "Sequential", "Model"):
            yield from iter_layers(layer)
        else:
            yield layer


def vocabulary(model: Any) -> int | None:
    """The smallest ``input_dim`` of ``model``'s Embedding layers (the token ids every one of them takes), or
    ``None`` when it has none."""
    return min((layer.input_dim for layer in getattr(model, "layers", []) if hasattr(layer, "input_dim")),
               default=None)


def has_kernel(layer: Any) -> bool:
    """True when ``layer`` holds a kernel-like weight (what pruning would act on)."""
    return any(weight.name.split("/")[-1].split(":")[0] in _KERNEL_NAMES for weight in layer.weights)


def prune_skip_reason(layer: Any, structured: tuple[int, int] | None) -> str | None:
    """Why pruning leaves ``layer`` as it is (``None``: it is pruned; layers without kernels are not listed)."""
    kind = layer.__class__.__name__
    if kind not in PRUNABLE:
        return f"tensorflow-model-optimization prunes no weights of a {kind}"
    if structured is not None and kind not in M_BY_N_LAYERS:
        return f"{structured[0]}:{structured[1]} sparsity supports {', '.join(sorted(M_BY_N_LAYERS))} only"
    return None


def qat_skip_reason(layer: Any) -> str | None:
    """Why quantization-aware training leaves ``layer`` in float (``None``: tfmot's 8-bit scheme annotates it)."""
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_registry as registry,
    )

    kind = layer.__class__.__name__
    if kind == "InputLayer" or (kind == "BatchNormalization" and _follows(layer, _BN_FOLDED_INTO)):
        return None  # tfmot folds a BatchNormalization into the convolution or dense layer before it
    if not registry.Default8BitQuantizeRegistry().supports(layer):
        return f"tensorflow-model-optimization's 8-bit scheme does not quantize a {kind}"
    return None


_BN_FOLDED_INTO = frozenset({"Conv2D", "DepthwiseConv2D", "Dense"})


def _follows(layer: Any, kinds: frozenset[str]) -> bool:
    """True when every call of ``layer`` takes the output of one layer of ``kinds``."""
    nodes = getattr(layer, "inbound_nodes", [])
    return bool(nodes) and all(
        len(node.inbound_layers if isinstance(node.inbound_layers, list) else [node.inbound_layers]) == 1
        and (node.inbound_layers[0] if isinstance(node.inbound_layers, list) else node.inbound_layers)
        .__class__.__name__ in kinds for node in nodes)


def qat_output_only(layer: Any) -> str | None:
    """Why only ``layer``'s output is quantized during QAT (``None``: fully annotated): its activation is one tfmot's
    scheme lacks (hard-swish, relu6 inside a convolution...). Left unannotated, tfmot would still wrap it (it feeds
    an annotated layer) and fail the whole model; its weights are quantized by the converter afterwards."""
    name = activation_name(layer)
    allowed = QAT_ACTIVATION_LAYERS if layer.__class__.__name__ == "Activation" else QAT_ACTIVATIONS
    if name is None or name in allowed:
        return None
    return f"only its output is quantized: tensorflow-model-optimization's scheme lacks the activation {name}"


def activation_name(layer: Any) -> str | None:
    """The name of ``layer``'s activation function, or ``None`` when it has none."""
    return getattr(getattr(layer, "activation", None), "__name__", None)


def check_model(model: Any) -> None:
    """Raise :class:`UnsupportedLayerError` for a layer no technique can export (a lambda activation)."""
    for layer in iter_layers(model):
        activation = getattr(layer, "activation", None)
        if activation is not None and getattr(activation, "__name__", "") == "<lambda>":
            raise UnsupportedLayerError(
                f"layer '{layer.name}' uses a lambda activation, which cannot be exported; use a named one",
                layer_name=layer.name, layer_type=layer.__class__.__name__,
            )
