"""Head-only training for a model known by its serving graph only (Keras 3 ``model.export()``,
``tf.saved_model.save``): the graph is frozen, its trailing dense layers (``MatMul`` + bias + activation) are
read back as a tf-keras head with their weights, and the graph up to the head's input becomes the backbone.

A graph is not a list of layers, so only the pattern every dense classifier head compiles to is recognised:
``MatMul(features, kernel)`` (any ``transpose_b``), then ``BiasAdd``/``Add``/``AddV2`` of a constant, then
``Relu``/``Relu6``/``Sigmoid``/``Tanh``/``Elu``/``Selu`` or (last layer only) ``Softmax``; ``Identity`` nodes
(dropout at inference, casts of float32 to float32) are skipped.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekit import _tf
from edgekit._io import temp_dir
from edgekit.errors import UnsupportedLayerError

_ACTIVATIONS = {"Relu": "relu", "Relu6": "relu6", "Sigmoid": "sigmoid", "Tanh": "tanh", "Elu": "elu",
                "Selu": "selu"}
_BIAS_OPS = ("BiasAdd", "Add", "AddV2")
_PASS_THROUGH = ("Identity", "StopGradient")


@dataclass(frozen=True)
class _Dense:
    kernel: np.ndarray
    bias: np.ndarray | None
    activation: str


class _FrozenGraph:
    """The serving function with its variables as constants, indexed by node name."""

    def __init__(self, function: Any) -> None:
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        self.frozen = convert_variables_to_constants_v2(function)
        self.graph_def = self.frozen.graph.as_graph_def()
        self.nodes = {node.name: node for node in self.graph_def.node}

    def producer(self, tensor: str) -> tuple[Any, str]:
        """The node producing ``tensor`` (skipping pass-through nodes) and the tensor's own name."""
        name = tensor.lstrip("^")
        node = self.nodes[name.split(":")[0]]
        while node.op in _PASS_THROUGH:
            name = node.input[0]
            node = self.nodes[name.split(":")[0]]
        return node, name if ":" in name else f"{name}:0"

    def constant(self, tensor: str) -> np.ndarray | None:
        from tensorflow.python.framework import tensor_util

        node, _ = self.producer(tensor)
        return tensor_util.MakeNdarray(node.attr["value"].tensor) if node.op == "Const" else None


def _dense_layers(frozen: _FrozenGraph) -> tuple[list[_Dense], str]:
    """The trailing dense layers, first to last, and the name of the tensor that feeds the first one."""
    node, tensor = frozen.producer(frozen.frozen.outputs[0].name)
    found: list[_Dense] = []
    while True:
        activation = "linear"
        if node.op == "Softmax" and not found:
            activation, (node, tensor) = "softmax", frozen.producer(node.input[0])
        elif node.op in _ACTIVATIONS:
            activation, (node, tensor) = _ACTIVATIONS[node.op], frozen.producer(node.input[0])
        bias = None
        if node.op in _BIAS_OPS:
            for i in (1, 0):
                bias = frozen.constant(node.input[i])
                if bias is not None and bias.ndim == 1:
                    node, tensor = frozen.producer(node.input[1 - i])
                    break
                bias = None
        kernel = frozen.constant(node.input[1]) if node.op == "MatMul" else None
        if kernel is None or node.attr["transpose_a"].b or kernel.ndim != 2 or (
                bias is not None and bias.shape[0] != kernel.shape[0 if node.attr["transpose_b"].b else 1]):
            break
        kernel = kernel.T if node.attr["transpose_b"].b else kernel
        found.insert(0, _Dense(kernel.astype(np.float32), None if bias is None else bias.astype(np.float32),
                               activation))
        node, tensor = frozen.producer(node.input[0])
    if not found:
        raise UnsupportedLayerError(
            f"head-only training needs the serving graph to end in dense layers (MatMul, bias, activation); its "
            f"output comes from a {node.op} op ({node.name})", layer_name=node.name, layer_type=node.op)
    return found, tensor


def _head(layers: list[_Dense]) -> Any:
    keras = _tf.keras()
    x = inp = keras.Input((layers[0].kernel.shape[0],), name="features")
    built = []
    for i, dense in enumerate(layers):
        layer = keras.layers.Dense(dense.kernel.shape[1], activation=dense.activation,
                                   use_bias=dense.bias is not None, name=f"head_dense_{i}")
        x = layer(x)
        built.append((layer, dense))
    for layer, dense in built:
        layer.set_weights([dense.kernel] if dense.bias is None else [dense.kernel, dense.bias])
    return keras.Model(inp, x, name="head")


def split_head_graph(graph: Any) -> tuple[Any, Any]:
    """Split a :class:`~edgekit.loading.graph.SavedModelGraph` at its trailing dense layers:
    (backbone graph from the input to the head's input, tf-keras head with the graph's weights). A binary
    classifier's two-column graph is split at its own one-output graph's head, which then gets the two columns
    (:func:`~edgekit.loading.binary.two_columns_keras`)."""
    from edgekit.loading.binary import two_columns_keras
    from edgekit.loading.graph import load_graph

    if graph.one_column is not None:
        backbone, head = split_head_graph(graph.one_column)
        return backbone, two_columns_keras(head, _tf.keras())[0]
    tf = _tf.tf()
    frozen = _FrozenGraph(graph.function)
    layers, features = _dense_layers(frozen)
    if layers[-1].kernel.shape[1] != graph.num_classes:
        raise UnsupportedLayerError(f"the graph's last dense layer has {layers[-1].kernel.shape[1]} units for "
                                    f"{graph.num_classes} classes", layer_name=features, layer_type="MatMul")
    graph_def = frozen.graph_def
    wrapped = tf.compat.v1.wrap_function(lambda: tf.compat.v1.import_graph_def(graph_def, name=""), [])
    pruned = wrapped.prune(feeds=wrapped.graph.get_tensor_by_name(frozen.frozen.inputs[0].name),
                           fetches=wrapped.graph.get_tensor_by_name(features))
    spec = tf.TensorSpec([None, *graph.input_shape], graph.input_dtype, name=graph.input_name)
    module = tf.Module()
    module.serve = tf.function(lambda x: {"features": pruned(x)}, input_signature=[spec])
    folder = temp_dir("backbone") / "saved_model"
    try:
        tf.saved_model.save(module, str(folder), signatures=module.serve.get_concrete_function(),
                            options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))  # inference only
        backbone = load_graph(folder, temporary=True, probabilities=False)
    except Exception:
        shutil.rmtree(folder.parent, ignore_errors=True)
        raise
    return backbone, _head(layers)
