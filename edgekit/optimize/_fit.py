"""The fine-tuning loop and measurements shared by pruning, QAT and distillation."""

from __future__ import annotations

import math
from typing import Any

from edgekit import _tf
from edgekit._progress import Progress
from edgekit.config import BatchNorm
from edgekit.loading.data import Dataset


def steps_per_epoch(data: Dataset, batch_size: int) -> int:
    return max(1, math.ceil(len(data) / batch_size))


def fit(model: Any, data: Dataset, *, epochs: int, batch_size: int, learning_rate: float,
        probabilities: bool, progress: Progress, desc: str, callbacks: list | None = None,
        seed: int = 0, batchnorm: BatchNorm = BatchNorm.KEEP) -> list[float]:
    """Fine-tune ``model`` on labelled ``data`` with Adam and cross-entropy; return epoch losses.

    ``batchnorm`` FREEZE runs every BatchNormalization layer in inference mode while fine-tuning.
    """
    keras = _tf.keras()
    if batchnorm is BatchNorm.FREEZE:
        for layer in _batchnorm_layers(model):
            layer.trainable = False  # tf-keras: a non-trainable BN runs in inference mode
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities))
    steps = steps_per_epoch(data, batch_size)
    cbs = [progress.keras_callback(epochs, steps, desc), *(callbacks or [])]
    _tf.set_seed(seed)
    history = model.fit(data.x, data.y, epochs=epochs, batch_size=batch_size, shuffle=True,
                        verbose=0, callbacks=cbs)
    return [float(v) for v in history.history["loss"]]


def reestimate_batchnorm(model: Any, x: Any, *, batch_size: int = 64, max_samples: int = 2048) -> int:
    """Recompute every BatchNormalization layer's moving mean and variance of ``model`` from ``x``, in place.

    A short fine-tune leaves the moving statistics stale when the layer's momentum is high
    (keras.applications use 0.99-0.999): they still describe the weights before pruning or
    distillation, and inference breaks. As ``torch.optim.swa_utils.update_bn`` does, the model runs
    forward in training mode over up to ``max_samples`` samples with each layer's momentum set so that
    the moving statistics become the plain average over the batches; no weight changes. Returns the
    number of layers re-estimated.
    """
    layers = _batchnorm_layers(model)
    if not layers or len(x) == 0:
        return 0
    momenta = [layer.momentum for layer in layers]
    try:
        for k, start in enumerate(range(0, min(len(x), max_samples), batch_size)):
            for layer in layers:  # batch k weighs 1/(k+1): the running value is the average so far
                layer.momentum = k / (k + 1)
            model(x[start:start + batch_size], training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return len(layers)


def after_finetune(model: Any, x: Any, *, batch_size: int, batchnorm: BatchNorm) -> None:
    """What ``batchnorm`` asks once fine-tuning is over: re-estimate the statistics, with BN training again."""
    for layer in _batchnorm_layers(model):
        layer.trainable = True
    if batchnorm is not BatchNorm.KEEP:
        reestimate_batchnorm(model, x, batch_size=batch_size)


def _batchnorm_layers(model: Any) -> list[Any]:
    """Every BatchNormalization layer of ``model``, inside nested models and tfmot's wrappers."""
    from edgekit.loading.layers import iter_layers

    keras = _tf.keras()
    return [inner for inner in (getattr(layer, "layer", layer) for layer in iter_layers(model))
            if isinstance(inner, keras.layers.BatchNormalization)]
