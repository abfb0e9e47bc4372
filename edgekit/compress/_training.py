"""Fine-tuning helpers shared by pruning, QAT and distillation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgekit import _tf
from edgekit._progress import Progress
from edgekit.data import Dataset


def copy_model(model: Any) -> Any:
    """A structural copy of a tf-keras model with its own copy of the weights."""
    keras = _tf.keras()
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def steps_per_epoch(data: Dataset, batch_size: int) -> int:
    return max(1, math.ceil(len(data) / batch_size))


def fit(model: Any, data: Dataset, *, epochs: int, batch_size: int, learning_rate: float,
        probabilities: bool, progress: Progress, desc: str, callbacks: list | None = None,
        seed: int = 0) -> list[float]:
    """Fine-tune ``model`` on labelled ``data`` with Adam and cross-entropy; return epoch losses."""
    keras = _tf.keras()
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities))
    steps = steps_per_epoch(data, batch_size)
    cbs = [progress.keras_callback(epochs, steps, desc), *(callbacks or [])]
    _tf.set_seed(seed)
    history = model.fit(data.x, data.y, epochs=epochs, batch_size=batch_size, shuffle=True,
                        verbose=0, callbacks=cbs)
    return [float(v) for v in history.history["loss"]]


def predict(model: Any, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Model outputs as float32, batched, without Keras ``predict``'s per-call overhead."""
    outs = [np.asarray(model(x[i:i + batch_size], training=False)) for i in range(0, len(x), batch_size)]
    return np.concatenate(outs).astype(np.float32)


def accuracy(outputs: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float(np.mean(outputs.argmax(axis=1) == y) * 100.0)
