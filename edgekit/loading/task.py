"""What a model was trained to do: classify numbers. Read from the loss it was compiled with and its input's dtype.

edgekit serves classifiers: every check it runs (top-1 agreement, accuracy, the cross-entropies of fine-tuning and
on-device training) reads the outputs as class scores. A model whose output layer is linear could be a classifier
giving logits or a regression model giving values; the two cannot be told apart from the layers, but a saved model
usually records its compile configuration: a regression loss (mean squared error, Huber, ...) on a linear output
says regression, which edgekit refuses instead of verifying the sign of a price.
"""

from __future__ import annotations

from typing import Any

from edgekit.errors import ModelLoadError

__all__ = ["REGRESSION_LOSSES", "loss_name", "refuse_regression", "refuse_text_input"]

REGRESSION_LOSSES = frozenset({
    "mse", "mae", "mape", "msle", "meansquarederror", "meanabsoluteerror", "meanabsolutepercentageerror",
    "meansquaredlogarithmicerror", "huber", "huberloss", "logcosh", "poisson", "cosinesimilarity",
})
"""Keras losses of regression (and embedding) models: names in lower case, without underscores."""


def loss_name(loss: Any) -> str | None:
    """The name of a compiled loss as Keras saves it (``"mse"``, ``{"class_name": "Huber", ...}``) or holds it (a
    loss object or function of a compiled model); ``None`` for no loss or for several (one per output, which
    edgekit refuses anyway).

    >>> loss_name({"module": "keras.losses", "class_name": "MeanSquaredError", "config": {}})
    'MeanSquaredError'
    >>> loss_name("mean_absolute_error"), loss_name(None), loss_name(["mse", "mae"])
    ('mean_absolute_error', None, None)
    """
    if isinstance(loss, (list, tuple, int, float)):  # one loss per output; a number is no loss
        return None
    if isinstance(loss, dict):
        loss = loss.get("class_name") if "class_name" in loss else None
    elif loss is not None and not isinstance(loss, str):  # a compiled model's own loss object or function
        wrapped = type(loss).__name__ == "LossFunctionWrapper"  # Keras' wrapper of a loss function: named after it
        loss = getattr(loss, "name", None) if wrapped else getattr(loss, "__name__", None) or type(loss).__name__
    return loss if isinstance(loss, str) and loss else None


def refuse_regression(loss: str | None, *, linear_output: bool, source: str) -> None:
    """Refuse a model compiled with a regression loss whose output is linear (no softmax or sigmoid).

    >>> refuse_regression("mean_squared_error", linear_output=False, source="m.keras")  # a softmax trained on MSE
    """
    if loss is not None and loss.replace("_", "").lower() in REGRESSION_LOSSES and linear_output:
        raise ModelLoadError(
            f"{source} was compiled with the regression loss '{loss}' and its output layer is linear (no softmax or "
            "sigmoid): it predicts values, not classes; edgekit compresses classifiers (a score per class, labels are "
            "class ids). A classifier trained this way: save it compiled with a classification loss, or uncompiled")


def refuse_text_input(dtype: str, *, source: str = "the model") -> None:
    """Refuse a model whose input is a string tensor (a ``TextVectorization`` or ``StringLookup`` inside it, as
    keras.io's end-to-end text models end up): device runtimes take numbers, and neither converter gives a builtin
    kernel for string lookups.

    >>> refuse_text_input("float32", source="m.keras")
    >>> refuse_text_input("string")
    Traceback (most recent call last):
    edgekit.errors.ModelLoadError: the model takes strings (a text vectorization or string lookup layer inside it); ...
    """
    if dtype == "string":
        raise ModelLoadError(
            f"{source} takes strings (a text vectorization or string lookup layer inside it); TFLite and "
            "ONNX runtimes on devices take numbers: give edgekit the model from the layer after the vectorization "
            "on (token ids in), and x as those token ids (what the vectorization layer outputs)")
