"""A binary classifier with one output, served as a classifier of two classes.

Keras's tutorials end a binary classifier in ``Dense(1)``: a sigmoid probability of class 1, or its logit
(``from_logits=True``). Everything edgekit does reads classes from the columns of a classifier's output: top-1
agreement and accuracy, the cross-entropy of fine-tuning, distillation and on-device training, the fleet's class
histograms. So the one-column output layer is replaced by an exactly equivalent two-column one before anything
else runs, and every artifact outputs two columns whose column 1 is the model's own output:

- ``Dense(1, sigmoid)`` with kernel ``w`` and bias ``b`` becomes ``Dense(2, softmax)`` with kernel ``[0, w]`` and
  bias ``[0, b]``: ``softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]``;
- ``Dense(1)`` (a logit ``z``) becomes ``Dense(2)`` with the same columns: logits ``[0, z]``, whose softmax is the
  same two probabilities and whose top-1 is ``z > 0``.

Plain Keras layers, so pruning, QAT, distillation and the trainable export handle them as any classifier's head.
A model known by its graph only (a SavedModel without Keras layers) gets ``[1 - p, p]`` or ``[0, z]`` appended
to its serving function.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import numpy as np

from edgekit import _tf
from edgekit.errors import ModelLoadError

__all__ = ["OneOutput", "dense_head", "graph_kind", "one_output_note", "two_columns_graph", "two_columns_keras"]

_PROBABILITY_ACTIVATIONS = frozenset({"sigmoid"})  # softmax([0, z]) is [1 - sigmoid(z), sigmoid(z)]: exactly (not
_LOGIT_ACTIVATIONS = frozenset({"linear"})  # a hard_sigmoid's piecewise line, which is refused with the others)


class OneOutput(str, Enum):
    """What a one-output binary classifier outputs."""

    PROBABILITY = "probability"  # of class 1, through a sigmoid
    LOGIT = "logit"  # of class 1


def _producer(tensor: Any) -> Any:
    history = tensor._keras_history  # noqa: SLF001 (tf-keras: .layer; Keras 3: .operation)
    return getattr(history, "layer", None) or getattr(history, "operation", None)


def _activation(layer: Any) -> str:
    return getattr(getattr(layer, "activation", None), "__name__", "linear")


def _kind(activation: str, layer: Any) -> OneOutput:
    if activation in _PROBABILITY_ACTIVATIONS:
        return OneOutput.PROBABILITY
    if activation in _LOGIT_ACTIVATIONS:
        return OneOutput.LOGIT
    shown = activation.removeprefix("edgekit_")  # the rebuild's name for a Keras 3 activation tf-keras defines apart
    raise ModelLoadError(f"the model's one output comes from layer '{layer.name}' with activation {shown}; "
                         "edgekit reads one output as a binary classifier's sigmoid probability or logit of class 1 "
                         "(a sigmoid or no activation)")


def dense_head(model: Any) -> tuple[Any, Any] | None:
    """The ``Dense`` layer a Keras model's output comes from and the ``Activation`` layer after it (or ``None``);
    ``None`` when the output comes from anything else."""
    head, activation = _producer(model.outputs[0]), None
    if type(head).__name__ == "Activation":
        activation, head = head, _producer(head.input)
    if type(head).__name__ != "Dense" or (activation is not None and _activation(head) != "linear"):
        return None
    return head, activation


def two_columns_keras(model: Any, keras: Any) -> tuple[Any, OneOutput]:
    """``model`` (tf-keras or Keras 3, output ``(batch, 1)``) with its ``Dense(1)`` head (and a trailing sigmoid
    ``Activation``) replaced by the equivalent ``Dense(2)`` (softmax for a sigmoid), sharing every other layer;
    and what the one output was.

    >>> two, kind = two_columns_keras(binary_model, tf_keras)   # doctest: +SKIP
    >>> two.outputs[0].shape, kind                               # doctest: +SKIP
    (TensorShape([None, 2]), <OneOutput.PROBABILITY: 'probability'>)
    """
    found = dense_head(model)
    if found is None:
        layer = _producer(model.outputs[0])
        raise ModelLoadError(
            f"the model's one output comes from a {type(layer).__name__} layer '{layer.name}'; edgekit serves a "
            "one-output binary classifier whose output layer is Dense(1) (with a sigmoid or no activation, or "
            "followed by a sigmoid Activation); or end the model in a 2-unit softmax")
    head, activation = found
    kind = _kind(_activation(activation or head), activation or head)
    config = dict(head.get_config(), units=2,
                  activation="softmax" if kind is OneOutput.PROBABILITY and activation is None else "linear")
    dense = type(head).from_config(config)
    out = dense(head.input)
    weights = head.get_weights()
    dense.set_weights([np.concatenate([np.zeros_like(w), w], axis=-1) for w in weights])
    if activation is not None:
        out = keras.layers.Activation("softmax" if kind is OneOutput.PROBABILITY else "linear",
                                      name=activation.name)(out)
    return keras.Model(model.inputs[0], out, name=model.name), kind


def graph_kind(graph: Any, sample: np.ndarray | None) -> OneOutput:
    """What a graph's one output is, judged from its values: a probability never leaves [0, 1] (on the user's
    samples where they fit, and on random inputs); a logit does, for the samples of class 0 at least."""
    from edgekit.loading.graph import random_inputs

    outs = [graph(random_inputs(graph))]
    if sample is not None and tuple(sample.shape[1:]) == tuple(graph.input_shape):
        outs.append(graph(sample.astype(graph.input_dtype)))
    values = np.concatenate([np.asarray(o).reshape(-1) for o in outs])
    return OneOutput.PROBABILITY if bool(((values >= 0) & (values <= 1)).all()) else OneOutput.LOGIT


def two_columns_graph(graph: Any, kind: OneOutput) -> Any:
    """``graph`` (output ``(batch, 1)``) with ``[1 - p, p]`` (a probability) or ``[0, z]`` (a logit) as its output,
    re-saved as a SavedModel of its own under the temporary directory."""
    from edgekit.loading.graph import resaved

    tf = _tf.tf()

    def columns(out: Any) -> Any:
        first = 1.0 - out if kind is OneOutput.PROBABILITY else tf.zeros_like(out)
        return tf.concat([first, out], axis=-1)

    spec = tf.TensorSpec([None, *graph.input_shape], graph.input_dtype, name=graph.input_name)
    two = resaved(graph, spec, columns, probabilities=kind is OneOutput.PROBABILITY,
                  what="the model's graph cannot be given a second output column")
    two.layer_names, two.one_column = graph.layer_names, graph
    return two


def one_output_note(kind: OneOutput | None) -> list[str]:
    """What the user should hear when the model's one output is served as two columns (nothing otherwise)."""
    if kind is None:
        return []
    if kind is OneOutput.PROBABILITY:
        return ["the model has one output, read as the sigmoid probability of class 1: the artifacts output two "
                "columns [P(class 0), P(class 1)] (column 1 is the model's own output; class 1 where it is > 0.5)"]
    return ["the model has one output, read as the logit of class 1: the artifacts output two logits [0, z] "
            "(column 1 is the model's own output before any training; class 1 where column 1 exceeds column 0)"]
