"""A *trainable* TFLite artifact: ``train``, ``infer``, ``get_weights``, ``set_weights`` signatures.

It converts with TFLITE_BUILTINS only (no Flex ops, which neither ai-edge-litert nor
tflite-runtime ship): backward passes are written in builtin ops (:mod:`edgekit.trainable._grad_ops`)
and weights live in resource variables.

Signatures (all tensors float32 unless said):

- ``train(x[B,...], y[B] int32, sample_weight[B], learning_rate[], mu[], momentum[], dropout[],
  dropout_noise[N]) -> {loss}``: one SGD step on the weighted cross-entropy, plus a FedProx term
  ``mu/2 * ||w - anchor||^2`` (``mu=0``: plain SGD), with heavy-ball momentum (``v = momentum * v + g;
  w -= learning_rate * v``, as ``keras.optimizers.SGD`` and ``torch.optim.SGD`` do; ``momentum=0``: plain SGD).
  ``dropout`` 1 applies the model's Dropout and Gaussian noise layers as Keras's training mode does (0: off),
  with the masks and noise drawn from ``dropout_noise``: N uniform draws in [0, 1) the caller makes
  (:func:`noise_size`; 1, unused, for a model without such layers), so a seeded caller trains reproducibly. Pad a
  short batch with ``sample_weight`` 0.
- ``infer(x[n,...]) -> {output}``: the model's outputs (probabilities if it ends in softmax).
  ``x`` is int32 token ids for a model that starts with an Embedding, float32 otherwise.
- ``get_weights() -> {tensor name: value}``; ``set_weights(**tensors) -> {count}``: replace the
  weights (and the FedProx anchor) with the given values and zero the momentum (a new start).

Two modes: full-model training, and head-only training, where the backbone (everything up to the
last Flatten / global pooling layer) becomes a separate int8 ``backbone.tflite`` and only the head
trains (on-device personalisation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_agents.errors import first_line
from edgekit import _tf
from edgekit._io import temporary_dir
from edgekit.errors import ConversionError, UnsupportedLayerError
from edgekit.trainable import _grad_ops as ops
from edgekit.trainable.contract import TensorInfo, tensor_key, weight_key

SIGNATURES = ("train", "infer", "get_weights", "set_weights")


@dataclass
class _Node:
    """One layer of the trainable graph: its trainable tensors and a forward function."""

    name: str
    inputs: list[str]
    params: list[tuple[str, np.ndarray]] = field(default_factory=list)
    forward: Callable[[list[Any], list[Any]], Any] = lambda xs, ws: xs[0]
    softmax_output: bool = False  # a final softmax, skipped when training on logits
    # the forward of the train signature when it differs (dropout, noise): (inputs, weights, the step's draws)
    train_forward: Callable[[list[Any], list[Any], _DropoutDraws], Any] | None = None
    # the shape of the uniform draws one train step takes (dropout, noise), its batch dimension None (the step's)
    noise_shape: tuple[int | None, ...] | None = None

    def noise_dims(self, batch_size: int) -> list[int]:
        """The shape of the uniform draws this node takes from one train step's ``dropout_noise`` (none: [])."""
        return [batch_size if d is None else d for d in self.noise_shape or ()]

    def noise_size(self, batch_size: int) -> int:
        """How many uniform draws this node takes from one train step's ``dropout_noise``."""
        return 0 if self.noise_shape is None else int(np.prod(self.noise_dims(batch_size)))


@dataclass
class _DropoutDraws:
    """One train step's dropout inputs: the switch, and the uniform draws each dropout or noise node takes its share
    of, in the order of the nodes."""

    switch: Any
    values: Any
    batch_size: int
    taken: int = 0

    def take(self, node: _Node) -> Any:
        """The node's uniform draws, shaped as its noise shape."""
        shape = node.noise_dims(self.batch_size)
        size = int(np.prod(shape))
        part = _tf.tf().reshape(self.values[self.taken:self.taken + size], shape)
        self.taken += size
        return part


def noise_size(nodes: list[_Node], batch_size: int) -> int:
    """The length of the train signature's ``dropout_noise``: every dropout or noise node's draws for one step, at
    least 1 (a model without such layers still has the input, unused)."""
    return max(1, sum(node.noise_size(batch_size) for node in nodes))


def _unsupported(layer: Any, why: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"layer '{layer.name}' ({layer.__class__.__name__}) cannot be trained on the device: {why}; "
        f"trainable layers: {', '.join(sorted(HANDLERS))}",
        layer_name=layer.name, layer_type=layer.__class__.__name__)


def _hard_sigmoid(x: Any) -> Any:  # Keras 3: relu6(x + 3) / 6
    return ops.relu(x + 3.0, 6.0) / 6.0


ACTIVATIONS: dict[str, Callable[[Any], Any]] = {
    "linear": lambda x: x,
    "relu": ops.relu,
    "relu6": lambda x: ops.relu(x, 6.0),
    "edgekit_relu6": lambda x: ops.relu(x, 6.0),
    "sigmoid": ops.sigmoid,
    "tanh": ops.tanh,
    "swish": lambda x: x * ops.sigmoid(x),
    "silu": lambda x: x * ops.sigmoid(x),
    "edgekit_silu": lambda x: x * ops.sigmoid(x),
    "hard_sigmoid": lambda x: ops.clip(0.2 * x + 0.5, 0.0, 1.0),  # tf-keras's definition
    "edgekit_hard_sigmoid": _hard_sigmoid,
    "edgekit_hard_silu": lambda x: x * _hard_sigmoid(x),
    "edgekit_leaky_relu": lambda x: ops.leaky_relu(x, 0.2),
}
"""Activation name -> its forward with a builtin-op backward pass (``softmax`` is handled at the output)."""


def _activation(layer: Any, name: str, *, last: bool) -> tuple[Callable[[Any], Any], bool]:
    if name is None:
        return ACTIVATIONS["linear"], False
    if name == "softmax" and last:
        return _tf.tf().nn.softmax, True
    if name not in ACTIVATIONS:
        raise _unsupported(layer, f"activation '{name}' (supported: {', '.join(sorted(ACTIVATIONS))}, "
                                  "softmax at the output)")
    return ACTIVATIONS[name], False


def _act_name(layer: Any) -> str:
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", "linear") if act is not None else "linear"


def _pads(layer: Any, in_shape: tuple, kernel: tuple[int, int], strides: tuple[int, int]) -> tuple:
    if layer.padding == "valid":
        return ((0, 0), (0, 0))
    return (ops.same_padding(in_shape[1], kernel[0], strides[0]), ops.same_padding(in_shape[2], kernel[1], strides[1]))


def _with_bias(node: _Node, layer: Any, core: Callable[[Any, list[Any]], Any], *, last: bool) -> _Node:
    act, softmax = _activation(layer, _act_name(layer), last=last)
    use_bias = getattr(layer, "use_bias", False)

    def forward(xs: list[Any], ws: list[Any]) -> Any:
        y = core(xs[0], ws)
        if use_bias:
            y = y + ws[-1]
        return act(y)

    node.forward, node.softmax_output = forward, softmax
    return node


def _dense(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    node.params = [("kernel", layer.kernel.numpy())] + ([("bias", layer.bias.numpy())] if layer.use_bias else [])
    if len(in_shape) != 2:
        raise _unsupported(layer, f"input of rank {len(in_shape)}; flatten or pool before a Dense layer")
    return _with_bias(node, layer, lambda x, ws: _tf.tf().matmul(x, ws[0]), last=last)


def _conv2d(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    if tuple(layer.dilation_rate) != (1, 1) or getattr(layer, "groups", 1) != 1:
        raise _unsupported(layer, "dilated or grouped convolution")
    strides, kernel = tuple(layer.strides), tuple(layer.kernel_size)
    pads = _pads(layer, in_shape, kernel, strides)
    node.params = [("kernel", layer.kernel.numpy())] + ([("bias", layer.bias.numpy())] if layer.use_bias else [])
    return _with_bias(node, layer, lambda x, ws: ops.conv2d(x, ws[0], strides, pads), last=last)


def _depthwise(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    if layer.depth_multiplier != 1 or tuple(layer.dilation_rate) != (1, 1):
        raise _unsupported(layer, "depth multiplier or dilation other than 1")
    strides, kernel = tuple(layer.strides), tuple(layer.kernel_size)
    pads = _pads(layer, in_shape, kernel, strides)
    node.params = [("depthwise_kernel", layer.depthwise_kernel.numpy())] + (
        [("bias", layer.bias.numpy())] if layer.use_bias else [])
    return _with_bias(node, layer, lambda x, ws: ops.depthwise_conv2d(x, ws[0], strides, pads), last=last)


def _relu_layer(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
        raise _unsupported(layer, "leaky or thresholded ReLU")
    max_value = None if layer.max_value is None else float(layer.max_value)
    node.forward = lambda xs, ws: ops.relu(xs[0], max_value)
    return node


def _activation_layer(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    act, node.softmax_output = _activation(layer, _act_name(layer), last=last)
    node.forward = lambda xs, ws: act(xs[0])
    return node


def _softmax_layer(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    if not last:
        raise _unsupported(layer, "softmax before the output")
    node.forward, node.softmax_output = (lambda xs, ws: _tf.tf().nn.softmax(xs[0])), True
    return node


def _embedding(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    if getattr(layer, "mask_zero", False):
        raise _unsupported(layer, "mask_zero=True (the layers after it would need the mask); use mask_zero=False")
    node.params = [("embeddings", layer.embeddings.numpy())]
    node.forward = lambda xs, ws: ops.embedding(xs[0], ws[0])
    return node


def _conv1d(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    """A convolution over time: the 2D convolution of a one-row image. A dilated kernel is the kernel with
    ``dilation - 1`` zeros between its taps (its gradient flows back through the pad, reshape and slice that make
    it: builtins); 'causal' padding pads the start alone, by the dilated kernel's span less one (temporal
    convolutional networks, streaming keyword spotting)."""
    if getattr(layer, "groups", 1) != 1:
        raise _unsupported(layer, "grouped 1D convolution")
    (stride,), (kernel,), (dilation,) = tuple(layer.strides), tuple(layer.kernel_size), tuple(layer.dilation_rate)
    span = (kernel - 1) * dilation + 1
    pads = ((0, 0), {"valid": (0, 0), "causal": (span - 1, 0)}.get(layer.padding)
                    or ops.same_padding(in_shape[1], span, stride))
    node.params = [("kernel", layer.kernel.numpy())] + ([("bias", layer.bias.numpy())] if layer.use_bias else [])
    tf = _tf.tf()

    def dilated(w: Any) -> Any:
        if dilation == 1:
            return w
        taps = tf.reshape(tf.pad(tf.expand_dims(w, 1), [[0, 0], [0, dilation - 1], [0, 0], [0, 0]]),
                          [kernel * dilation, *w.shape[1:]])
        return tf.slice(taps, [0, 0, 0], [span, *w.shape[1:]])

    return _with_bias(node, layer, lambda x, ws: ops.from_2d(
        ops.conv2d(ops.as_2d(x), tf.expand_dims(dilated(ws[0]), 0), (1, stride), pads)), last=last)


def _max_pool1d(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    (pool,), (stride,) = tuple(layer.pool_size), tuple(layer.strides)
    pads = ((0, 0), (0, 0) if layer.padding == "valid" else ops.same_padding(in_shape[1], pool, stride))
    node.forward = lambda xs, ws: ops.from_2d(ops.max_pool(ops.as_2d(xs[0]), (1, pool), (1, stride), pads))
    return node


def _avg_pool1d(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    if layer.padding != "valid":
        raise _unsupported(layer, "'same' average pooling (use padding='valid')")
    (pool,), (stride,) = tuple(layer.pool_size), tuple(layer.strides)
    node.forward = lambda xs, ws: ops.from_2d(ops.avg_pool(ops.as_2d(xs[0]), (1, pool), (1, stride)))
    return node


def _gap1d(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    keepdims = bool(getattr(layer, "keepdims", False))
    node.forward = lambda xs, ws: _tf.tf().reduce_mean(xs[0], axis=[1], keepdims=keepdims)
    return node


def _gmp1d(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    keepdims = bool(getattr(layer, "keepdims", False))
    node.forward = lambda xs, ws: (ops.from_2d(ops.global_max_pool(ops.as_2d(xs[0]), keepdims=True)) if keepdims
                                   else ops.global_max_pool(ops.as_2d(xs[0]), keepdims=False))
    return node


def _max_pool(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    pool, strides = tuple(layer.pool_size), tuple(layer.strides)
    pads = _pads(layer, in_shape, pool, strides)
    node.forward = lambda xs, ws: ops.max_pool(xs[0], pool, strides, pads)
    return node


def _avg_pool(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    if layer.padding != "valid":
        raise _unsupported(layer, "'same' average pooling (use padding='valid')")
    pool, strides = tuple(layer.pool_size), tuple(layer.strides)
    node.forward = lambda xs, ws: ops.avg_pool(xs[0], pool, strides)
    return node


def _batch_norm(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    """Statistics frozen, gamma and beta trained: ``(x - mean) / sqrt(variance + eps) * gamma + beta`` with the
    moving mean and variance as constants (a device's batches of a few samples would not estimate them), as Keras
    fine-tunes a BatchNormalization called in inference mode. A layer frozen in Keras (``trainable=False``) stays
    wholly constant. Training gamma and beta lifted the digits CNN trained by SGD on the pooled data from 97.2-97.8%
    to 98.3% (two seeds; its first convolution has no bias, so beta is its only bias)."""
    inv_std = (1.0 / np.sqrt(layer.moving_variance.numpy() + layer.epsilon)).astype(np.float32)
    mean = layer.moving_mean.numpy().astype(np.float32)
    affine = {name: getattr(layer, name).numpy() for name, on in (("gamma", layer.scale), ("beta", layer.center))
              if on}
    if layer.trainable:
        node.params = list(affine.items())
    names = [name for name, _ in node.params]

    def forward(xs: list[Any], ws: list[Any]) -> Any:
        values = {**affine, **dict(zip(names, ws))}
        out = (xs[0] - mean) * inv_std
        if "gamma" in values:
            out = out * values["gamma"]
        return out + values["beta"] if "beta" in values else out

    node.forward = forward
    return node


def _flatten(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    size = int(np.prod(in_shape[1:]))
    node.forward = lambda xs, ws: _tf.tf().reshape(xs[0], [-1, size])
    return node


def _gap(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    keepdims = bool(getattr(layer, "keepdims", False))
    node.forward = lambda xs, ws: _tf.tf().reduce_mean(xs[0], axis=[1, 2], keepdims=keepdims)
    return node


def _gmp(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    keepdims = bool(getattr(layer, "keepdims", False))
    node.forward = lambda xs, ws: ops.global_max_pool(xs[0], keepdims=keepdims)
    return node


def _zero_padding(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    pads = tuple(tuple(int(p) for p in side) for side in layer.padding)
    node.forward = lambda xs, ws: ops.zero_pad(xs[0], pads)
    return node


def _rescaling(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    """Frozen: x * scale + offset with constants."""
    scale = np.asarray(layer.scale, np.float32)
    offset = np.asarray(layer.offset, np.float32)
    node.forward = lambda xs, ws: xs[0] * scale + offset
    return node


def _normalization(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    """Frozen: (x - mean) / max(sqrt(variance), eps) with the adapted statistics as constants."""
    if getattr(layer, "invert", False):
        raise _unsupported(layer, "an inverted Normalization")
    mean = np.asarray(layer.mean, np.float32)
    scale = (1.0 / np.maximum(np.sqrt(np.asarray(layer.variance, np.float32)), 1e-7)).astype(np.float32)
    node.forward = lambda xs, ws: (xs[0] - mean) * scale
    return node


def _separable(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    if layer.depth_multiplier != 1 or tuple(layer.dilation_rate) != (1, 1):
        raise _unsupported(layer, "depth multiplier or dilation other than 1")
    strides, kernel = tuple(layer.strides), tuple(layer.kernel_size)
    pads = _pads(layer, in_shape, kernel, strides)
    node.params = [("depthwise_kernel", layer.depthwise_kernel.numpy()),
                   ("pointwise_kernel", layer.pointwise_kernel.numpy())] + (
        [("bias", layer.bias.numpy())] if layer.use_bias else [])
    return _with_bias(node, layer, lambda x, ws: ops.conv2d(ops.depthwise_conv2d(x, ws[0], strides, pads), ws[1],
                                                            (1, 1), ((0, 0), (0, 0))), last=last)


def _leaky_relu(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    alpha = float(getattr(layer, "alpha", getattr(layer, "negative_slope", 0.3)))
    node.forward = lambda xs, ws: ops.leaky_relu(xs[0], alpha)
    return node


def _multiply(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    def forward(xs: list[Any], ws: list[Any]) -> Any:
        out = xs[0]
        for x in xs[1:]:
            out = ops.multiply(out, x)
        return out

    node.forward = forward
    return node


def _concatenate(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    axis = int(layer.axis)
    node.forward = lambda xs, ws: _tf.tf().concat(xs, axis=axis)
    return node


def _reshape(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    target = [int(d) for d in layer.output_shape[1:]]  # resolved (a -1 in target_shape is known here)
    node.forward = lambda xs, ws: _tf.tf().reshape(xs[0], [-1, *target])
    return node


def _augmentation(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    """Data augmentation (:data:`~edgekit.loading.layers.AUGMENTATION_LAYERS`): the identity, as at inference. The
    device trains on its own samples without augmenting them (random image ops have no builtin kernels), and the
    parity reference runs Keras with ``training=False``, where these layers pass their input through."""
    node.forward = lambda xs, ws: xs[0]
    return node


def _dropout(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    """Keras's training mode in the ``train`` signature (its ``dropout`` input 1): each unit is zeroed with
    probability ``rate`` (units share a draw along the dimensions ``noise_shape`` gives as 1) and the others are
    scaled by ``1 / (1 - rate)``, a fresh mask at every step from the step's ``dropout_noise`` (uniform draws the
    caller makes: a device seeds them by round and device, so a federated run repeats exactly); ``infer`` passes
    the values through. With ``dropout`` 0 every unit is kept, unscaled."""
    return _masked(layer, node, in_shape, getattr(layer, "noise_shape", None))


def _spatial_dropout(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    """SpatialDropout1D/2D: Dropout with one draw per sample and channel, shared by every position (Keras's
    noise shape for these layers, channels last or first)."""
    positions = [1] * (len(in_shape) - 2)
    first = getattr(layer, "data_format", "channels_last") == "channels_first"
    return _masked(layer, node, in_shape, (None, None, *positions) if first else (None, *positions, None))


def _masked(layer: Any, node: _Node, in_shape: tuple, noise_shape: tuple | None) -> _Node:
    """The train forward of a dropout layer whose draws have ``noise_shape`` (Keras's: None for the input's size, 1
    for a dimension that shares a draw; None for one draw per unit)."""
    rate = float(layer.rate)
    if not 0.0 <= rate < 1.0:
        raise _unsupported(layer, f"a dropout rate of {rate:g} (it must be in [0, 1))")
    dims = list(in_shape)  # (None, d1, ...): the batch first
    if noise_shape is not None:
        dims = [d if n is None else int(n) for d, n in zip(dims, noise_shape)]
    if any(d is None for d in dims[1:]):
        raise _unsupported(layer, f"a dropout over a dimension of unknown size (input shape {in_shape})")
    node.noise_shape = tuple(dims)

    def train_forward(xs: list[Any], ws: list[Any], draws: _DropoutDraws) -> Any:
        tf = _tf.tf()
        x = xs[0]
        drop = rate * draws.switch
        keep = tf.cast(draws.take(node) >= drop, x.dtype)  # all kept when drop is 0; broadcast over shared dims
        return x * keep / (1.0 - drop)

    node.train_forward = train_forward
    return node


def _gaussian(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    """GaussianNoise (adds noise of deviation ``stddev``) and GaussianDropout (multiplies by noise of mean 1 and
    deviation ``sqrt(rate / (1 - rate))``): Keras's training mode in the ``train`` signature, each normal draw made
    from two of the step's uniform draws (Box-Muller, in builtin LOG, SQRT and COS); ``infer`` passes the values
    through. The ``dropout`` input scales the noise (0: none)."""
    multiplies = layer.__class__.__name__ == "GaussianDropout"
    value = float(layer.rate if multiplies else layer.stddev)
    if not (0.0 <= value < 1.0 if multiplies else 0.0 <= value < math.inf):
        raise _unsupported(layer, f"a {'rate' if multiplies else 'stddev'} of {value:g}")
    if any(d is None for d in in_shape[1:]):
        raise _unsupported(layer, f"noise over a dimension of unknown size (input shape {in_shape})")
    stddev = math.sqrt(value / (1.0 - value)) if multiplies else value
    node.noise_shape = (*in_shape, 2)  # two uniform draws per unit

    def train_forward(xs: list[Any], ws: list[Any], draws: _DropoutDraws) -> Any:
        tf = _tf.tf()
        u = draws.take(node)
        # 1 - u is in (0, 1]: its log is finite
        normal = tf.sqrt(-2.0 * tf.math.log(1.0 - u[..., 0])) * tf.cos(2.0 * math.pi * u[..., 1])
        noise = stddev * draws.switch * normal
        return xs[0] * (1.0 + noise) if multiplies else xs[0] + noise

    node.train_forward = train_forward
    return node


def _add(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    node.forward = lambda xs, ws: _tf.tf().add_n(xs)
    return node


HANDLERS: dict[str, Callable[[Any, _Node, tuple, bool], _Node]] = {
    "Activation": _activation_layer,
    "Add": _add,
    "AveragePooling1D": _avg_pool1d,
    "AveragePooling2D": _avg_pool,
    "BatchNormalization": _batch_norm,
    "Concatenate": _concatenate,
    "Conv1D": _conv1d,
    "Conv2D": _conv2d,
    "Dense": _dense,
    "DepthwiseConv2D": _depthwise,
    "Dropout": _dropout,
    "Embedding": _embedding,
    "Flatten": _flatten,
    "GaussianDropout": _gaussian,
    "GaussianNoise": _gaussian,
    "GlobalAveragePooling1D": _gap1d,
    "GlobalAveragePooling2D": _gap,
    "GlobalMaxPooling1D": _gmp1d,
    "GlobalMaxPooling2D": _gmp,
    "LeakyReLU": _leaky_relu,
    "MaxPooling1D": _max_pool1d,
    "MaxPooling2D": _max_pool,
    "Multiply": _multiply,
    "Normalization": _normalization,
    "RandomBrightness": _augmentation,
    "RandomContrast": _augmentation,
    "RandomFlip": _augmentation,
    "RandomRotation": _augmentation,
    "RandomTranslation": _augmentation,
    "RandomZoom": _augmentation,
    "ReLU": _relu_layer,
    "Rescaling": _rescaling,
    "Reshape": _reshape,
    "SeparableConv2D": _separable,
    "Softmax": _softmax_layer,
    "SpatialDropout1D": _spatial_dropout,
    "SpatialDropout2D": _spatial_dropout,
    "ZeroPadding2D": _zero_padding,
}
"""Layer type -> builder of its trainable node. A test checks gradient parity for every entry."""


def _graph(model: Any) -> list[tuple[Any, list[str]]]:
    """(layer, names of its input layers) in topological order; the model input is ``"input"``."""
    keras = _tf.keras()
    if isinstance(model, keras.Sequential):
        out, previous = [], "input"
        for layer in model.layers:
            out.append((layer, [previous]))
            previous = layer.name
        return out
    config = model.get_config()
    input_names = {ref[0] for ref in config["input_layers"]}
    by_name = {layer.name: layer for layer in model.layers}
    out = []
    for spec in config["layers"]:
        if spec["name"] in input_names:
            continue
        nodes = spec["inbound_nodes"]
        if len(nodes) != 1:
            raise _unsupported(by_name[spec["name"]], "a layer shared between several calls")
        refs = nodes[0]
        refs = refs.get("args", refs) if isinstance(refs, dict) else refs
        names = ["input" if ref[0] in input_names else ref[0] for ref in refs]
        out.append((by_name[spec["name"]], names))
    return out


def build_nodes(model: Any) -> list[_Node]:
    """Trainable nodes of ``model`` in order; raises for the first layer that cannot be trained."""
    if any(hasattr(layer, "layers") for layer in model.layers):
        nested = next(layer for layer in model.layers if hasattr(layer, "layers"))
        raise _unsupported(nested, "a nested model (flatten it into one model first)")
    graph = _graph(model)
    if model.inputs[0].dtype.is_integer:
        for layer, inputs in graph:
            if "input" in inputs and layer.__class__.__name__ != "Embedding":
                raise _unsupported(layer, "integer inputs train on the device only through an Embedding layer")
    nodes = []
    last_name = graph[-1][0].name
    trained: set[str] = set()  # layers whose output depends on a trained weight: gradients flow back through them
    for layer, inputs in graph:
        handler = HANDLERS.get(layer.__class__.__name__)
        upstream = any(name in trained for name in inputs)
        if handler is None:
            if layer.weights:
                raise _unsupported(layer, "no on-device gradient for this layer type")
            if upstream:
                raise _unsupported(layer, "no on-device gradient for this layer type, and trained weights come "
                                          "before it (a layer without weights before every trained weight runs "
                                          "forward only)")
            handler = _forward_only
        in_shape = tuple(layer.input_shape) if not isinstance(layer.input_shape, list) else tuple(layer.input_shape[0])
        node = handler(layer, _Node(layer.name, inputs), in_shape, layer.name == last_name)
        nodes.append(node)
        if upstream or node.params:
            trained.add(layer.name)
    return nodes


def _forward_only(layer: Any, node: _Node, in_shape: tuple, last: bool) -> _Node:
    """A layer without weights that no gradient flows back through (every trained weight comes after it: the
    preprocessing at a model's start, Resizing, CenterCrop, Cropping2D...): run as Keras runs it at inference. Its
    ops must still have TFLite builtin kernels (the conversion says which does not); it needs no backward pass."""
    node.forward = lambda xs, ws: layer(xs[0] if len(xs) == 1 else xs, training=False)
    return node


def _momentum_step(module: Any, grads: dict[str, Any], learning_rate: Any, mu: Any, momentum: Any) -> None:
    """One heavy-ball step with FedProx's proximal term toward the round's anchors, on ``module``'s variables."""
    tf = _tf.tf()
    for key, grad in grads.items():
        var, velocity = module.weights[key], module.velocity[key]
        # selected, not multiplied by `stepped`: after a step that diverged to NaN, 0 * NaN would poison every
        # later step, even after set_weights restored the weights
        carried = tf.where(module.stepped > 0, momentum * velocity, 0.0)
        velocity.assign(carried + grad + mu * (var - module.anchors[key]))
        var.assign_sub(learning_rate * velocity)
    module.stepped.assign(1.0)


def build_module(model: Any, *, batch_size: int) -> tuple[Any, list[TensorInfo], bool]:
    """A ``tf.Module`` with the four signatures for ``model``; its tensor list; whether it outputs softmax."""
    tf = _tf.tf()
    nodes = build_nodes(model)
    in_shape = tuple(model.inputs[0].shape[1:])
    x_dtype = tf.int32 if model.inputs[0].dtype.is_integer else tf.float32  # token ids into an Embedding
    num_classes = int(model.outputs[0].shape[-1])
    softmax_out = nodes[-1].softmax_output
    tensors: list[TensorInfo] = []
    for node in nodes:
        for pname, value in node.params:
            tensors.append(TensorInfo(tensor_key(node.name, pname), tuple(int(d) for d in value.shape)))

    noise = noise_size(nodes, batch_size)

    class Trainable(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weights, self.anchors, self.velocity = _variables(nodes)
            self.stepped = tf.Variable(0.0, name="momentum_started", trainable=False)

        def forward(self, x: Any, *, logits: bool, dropout: _DropoutDraws | None = None) -> Any:
            return _forward(nodes, self.weights, x, logits=logits, dropout=dropout)

        @tf.function(autograph=False, input_signature=[
            tf.TensorSpec([batch_size, *in_shape], x_dtype, name="x"),
            tf.TensorSpec([batch_size], tf.int32, name="y"),
            tf.TensorSpec([batch_size], tf.float32, name="sample_weight"),
            tf.TensorSpec([], tf.float32, name="learning_rate"),
            tf.TensorSpec([], tf.float32, name="mu"),
            tf.TensorSpec([], tf.float32, name="momentum"),
            tf.TensorSpec([], tf.float32, name="dropout"),
            tf.TensorSpec([noise], tf.float32, name="dropout_noise"),
        ])
        def train(self, x: Any, y: Any, sample_weight: Any, learning_rate: Any, mu: Any, momentum: Any,
                  dropout: Any, dropout_noise: Any) -> dict:
            keys = list(self.weights)
            variables = [self.weights[k] for k in keys]
            with tf.GradientTape() as tape:
                out = self.forward(x, logits=True, dropout=_DropoutDraws(dropout, dropout_noise, batch_size))
                loss = ops.cross_entropy(out, tf.one_hot(y, num_classes), sample_weight)
            _momentum_step(self, dict(zip(keys, tape.gradient(loss, variables))), learning_rate, mu, momentum)
            return {"loss": loss}

        @tf.function(autograph=False, input_signature=[tf.TensorSpec([None, *in_shape], x_dtype, name="x")])
        def infer(self, x: Any) -> dict:
            return {"output": self.forward(x, logits=False)}

        @tf.function(autograph=False, input_signature=[])
        def get_weights(self) -> dict:
            return {k: v.read_value() for k, v in self.weights.items()}

        @tf.function(autograph=False,
                     input_signature=[{t.name: tf.TensorSpec(t.shape, tf.float32, name=t.name) for t in tensors}])
        def set_weights(self, values: dict) -> dict:
            for key, value in values.items():
                self.weights[key].assign(value)
                self.anchors[key].assign(value)
            self.stepped.assign(0.0)  # a new start: no momentum from before
            return {"count": tf.constant(len(values), tf.int32)}

    return Trainable(), tensors, softmax_out


def _variables(nodes: list[_Node]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Per tensor: the weight, its anchor (FedProx's reference point, the weights last set) and its velocity."""
    tf = _tf.tf()
    weights, anchors, velocity = {}, {}, {}
    for node in nodes:
        for pname, value in node.params:
            key = tensor_key(node.name, pname)
            weights[key] = tf.Variable(value.astype(np.float32), name=key)
            anchors[key] = tf.Variable(value.astype(np.float32), name=f"{key}_anchor", trainable=False)
            # initialised to the weights, not zeros: the converter stores identical constants once,
            # and `stepped` (0 until the first step) masks the initial value out
            velocity[key] = tf.Variable(value.astype(np.float32), name=f"{key}_velocity", trainable=False)
    return weights, anchors, velocity


def _forward(nodes: list[_Node], weights: dict[str, Any], x: Any, *, logits: bool,
             dropout: _DropoutDraws | None = None) -> Any:
    """The model's outputs (its logits when ``logits``); ``dropout``: the train signature's dropout inputs."""
    values = {"input": x}
    for node in nodes:
        ws = [weights[tensor_key(node.name, p)] for p, _ in node.params]
        xs = [values[name] for name in node.inputs]
        if node.softmax_output and logits:
            values[node.name] = _logits_of(node, xs, ws)
        elif dropout is not None and node.train_forward is not None:
            values[node.name] = node.train_forward(xs, ws, dropout)
        else:
            values[node.name] = node.forward(xs, ws)
    return values[nodes[-1].name]


def _logits_of(node: _Node, xs: list[Any], ws: list[Any]) -> Any:
    """The node's output before its final softmax."""
    if node.params:  # Dense/Conv with activation='softmax': recompute without the activation
        tf = _tf.tf()
        y = tf.matmul(xs[0], ws[0]) if len(ws[0].shape) == 2 else None
        if y is None:
            raise ConversionError(f"a softmax convolution output ({node.name}) is not supported for training")
        return y + ws[1] if len(ws) > 1 else y
    return xs[0]  # a Softmax/Activation layer: its input are the logits


def convert(module: Any) -> bytes:
    """Convert the module's four signatures with TFLITE_BUILTINS only."""
    import absl.logging

    tf = _tf.tf()
    verbosity = absl.logging.get_verbosity()
    # the SavedModel is written without its custom gradients on purpose (the converter needs only the
    # forward graphs of the signatures); silence TensorFlow's warning about them while converting
    absl.logging.set_verbosity(absl.logging.ERROR)
    try:
        return _convert(tf, module)
    finally:
        absl.logging.set_verbosity(verbosity)


def _convert(tf: Any, module: Any) -> bytes:
    with temporary_dir("trainable") as tmp:
        signatures = {name: getattr(module, name).get_concrete_function() for name in SIGNATURES}
        tf.saved_model.save(module, str(tmp), signatures=signatures,
                            options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))
        converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp), signature_keys=list(SIGNATURES))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        try:
            return bytes(converter.convert())
        except Exception as exc:
            raise ConversionError(f"the trainable model does not convert with builtin ops: "
                                  f"{first_line(exc, prefer='error')}") from None


FEATURE_LAYERS = ("Flatten", "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalMaxPooling1D",
                  "GlobalMaxPooling2D")
"""Where head-only training cuts a model: after the last of these, the head is what follows."""


def _head_cut(layers: list[Any], single_input: list[bool]) -> int | None:
    """Index of the layer the head starts after, or ``None``: the head is a sequential run of layers with
    on-device gradients (:data:`HANDLERS`), with weights, at the end of the model.

    The cut is the last Flatten / global pooling layer with such a head after it (MobileNetV3's top is pooling
    (keepdims) -> 1x1 convs -> Flatten -> softmax: after its Flatten nothing trains, so the cut is its pooling);
    without one, the head is the trailing run itself (ConvNeXt ends pooling -> LayerNormalization -> Dense: the
    LayerNormalization has no on-device gradient and stays in the backbone)."""
    start = len(layers)
    while start > 0 and single_input[start - 1] and layers[start - 1].__class__.__name__ in HANDLERS:
        start -= 1  # layers[start:] is the longest trailing run that can train on the device
    with_weights = [i for i in range(start, len(layers)) if layers[i].trainable_weights]
    if not with_weights:
        return None
    features = [i for i in range(max(start - 1, 0), with_weights[-1]) if layers[i].__class__.__name__ in FEATURE_LAYERS]
    if features:
        return features[-1]
    return start - 1 if start > 0 else None


def head_layers(model: Any) -> list[str]:
    """Names of the layers of the head (:func:`_head_cut`), or ``[]`` when the model has none."""
    graph = _graph(model)
    cut = _head_cut([layer for layer, _ in graph], [len(inputs) == 1 for _, inputs in graph])
    return [] if cut is None else [layer.name for layer, _ in graph[cut + 1:]]


def _no_head(model: Any) -> UnsupportedLayerError:
    return UnsupportedLayerError("head-only training needs a head at the end of the model: a sequential run of "
                                 "layers with on-device gradients that holds weights (Dense, convolutions); this "
                                 "model has none", layer_name=model.name, layer_type=model.__class__.__name__)


def split_head(model: Any) -> tuple[Any, Any]:
    """Split at the head's cut (:func:`_head_cut`): (backbone, head), both tf-keras models."""
    keras = _tf.keras()
    graph = _graph(model)
    cut = _head_cut([layer for layer, _ in graph], [len(inputs) == 1 for _, inputs in graph])
    if cut is None:
        raise _no_head(model)
    feature = graph[cut][0]
    backbone = keras.Model(model.inputs, feature.output, name="backbone")
    head_in = keras.Input(tuple(feature.output.shape[1:]), name="features")
    x = head_in
    for layer, _ in graph[cut + 1:]:
        x = layer(x)
    head = keras.Model(head_in, x, name="head")
    return backbone, head


_MERGE_LAYERS = frozenset({"Add", "Average", "Concatenate", "Dot", "Maximum", "Minimum", "Multiply", "Subtract"})


def split_head_keras3(model: Any) -> tuple[Any, Any]:
    """Split a Keras 3 model tf-keras cannot rebuild as a whole: (Keras 3 backbone up to the head's cut
    (:func:`_head_cut`), tf-keras head of the layers after it, with their weights)."""
    from edgekit.loading.rebuild import rebuild_layer

    keras3 = _tf.keras3()
    keras = _tf.keras()
    layers = [layer for layer in model.layers if layer.__class__.__name__ != "InputLayer"]
    cut = _head_cut(layers, [layer.__class__.__name__ not in _MERGE_LAYERS for layer in layers])
    if cut is None:
        raise _no_head(model)
    feature = layers[cut]
    features = feature.output
    shape = tuple(features.shape[1:])
    if len(shape) > 1 and all(d == 1 for d in shape[:-1]):
        # pooled with keepdims (MobileNetV3: (None, 1, 1, C)): the backbone hands over (None, C), a classifier's
        # output shape, which its graph export takes; the head restores the unit dims first (a Reshape trains)
        features = keras3.layers.Reshape(shape[-1:], name="features_flat")(features)
    backbone = keras3.Model(model.inputs, features, name="backbone")
    x = head_in = keras.Input(tuple(features.shape[1:]), name="features")
    if tuple(features.shape[1:]) != shape:
        x = keras.layers.Reshape(shape, name="features_unit_dims")(x)
    for layer in layers[cut + 1:]:
        twin = rebuild_layer(layer)
        x = twin(x)
        twin.set_weights(layer.get_weights())
    return backbone, keras.Model(head_in, x, name="head")


def reference_step(model: Any, x: np.ndarray, y: np.ndarray, *, learning_rate: float) -> dict[str, np.ndarray]:
    """The same SGD step computed by TensorFlow's own autodiff (the parity reference)."""
    tf = _tf.tf()
    nodes = build_nodes(model)
    softmax_out = nodes[-1].softmax_output
    trained = {tensor_key(node.name, p) for node in nodes for p, _ in node.params}  # BN stays frozen
    weights = {weight_key(layer, w): w for layer in model.layers for w in layer.trainable_weights}
    weights = {k: v for k, v in weights.items() if k in trained}
    with tf.GradientTape() as tape:
        out = model(x, training=False)
        if softmax_out:
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, out))
        else:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, out))
    keys = list(weights)
    grads = tape.gradient(loss, [weights[k] for k in keys])
    # an Embedding's gradient comes back as IndexedSlices: made dense, as the device's scatter-add is
    return {k: weights[k].numpy() - learning_rate * tf.convert_to_tensor(g).numpy() for k, g in zip(keys, grads)}
