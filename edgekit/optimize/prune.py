"""Magnitude pruning (polynomial schedule) and 2:4 structured sparsity with tensorflow-model-optimization."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agents.errors import first_line
from edgekit import _tf
from edgekit._progress import Progress
from edgekit.config import TrainingConfig
from edgekit.errors import ConversionError
from edgekit.loading.data import Dataset
from edgekit.loading.layers import has_kernel, prune_skip_reason
from edgekit.loading.models import copy_model
from edgekit.optimize._fit import after_finetune, fit, steps_per_epoch

_KERNEL_NAMES = ("kernel", "depthwise_kernel", "pointwise_kernel", "embeddings", "recurrent_kernel")


@dataclass
class PruneResult:
    model: Any                       # stripped tf-keras model, zeros in place
    per_layer: dict[str, float]      # layer name -> fraction of zero weights in its kernels
    skipped: dict[str, str]          # layer name -> why it was not pruned
    losses: list[float]


def prune(model: Any, data: Dataset, *, sparsity: float | None = None, structured: tuple[int, int] | None = None,
          training: TrainingConfig, probabilities: bool, progress: Progress, seed: int = 0) -> PruneResult:
    """Prune a copy of ``model`` to ``sparsity`` (or 2:4) while fine-tuning on ``data``.

    Magnitude pruning ramps from 0 to ``sparsity`` with tfmot's ``PolynomialDecay`` over the first
    70% of the fine-tuning steps, then holds it. 2:4 keeps the 2 largest of every 4 weights. Fine-tuning
    runs :func:`pruning_epochs` epochs.
    """
    tfmot = _tf.tfmot()
    sparsity_api = tfmot.sparsity.keras
    keras = _tf.keras()
    epochs = pruning_epochs(data, training)
    steps = steps_per_epoch(data, training.batch_size) * epochs
    if structured is not None:
        params = {"pruning_schedule": sparsity_api.ConstantSparsity(0.5, begin_step=0, frequency=max(1, steps // 10)),
                  "sparsity_m_by_n": structured}
    else:
        params = {"pruning_schedule": sparsity_api.PolynomialDecay(
            initial_sparsity=0.0, final_sparsity=float(sparsity), begin_step=0,
            end_step=max(1, int(steps * 0.7)), frequency=max(1, steps // 20))}
    skipped: dict[str, str] = {}

    def wrap(layer: Any) -> Any:
        why = prune_skip_reason(layer, structured)
        if why is not None:
            if has_kernel(layer):  # weighted, yet not pruned: say so
                skipped[layer.name] = why
            return layer
        try:
            return sparsity_api.prune_low_magnitude(layer, **params)
        except (ValueError, TypeError) as exc:
            skipped[layer.name] = first_line(exc, limit=160)
            return layer

    base = copy_model(model)
    try:
        wrapped = keras.models.clone_model(base, clone_function=wrap)
    except (ValueError, TypeError) as exc:
        raise ConversionError(f"tfmot cannot prune this model: {first_line(exc)}") from None
    if not any(layer.__class__.__name__ == "PruneLowMagnitude" for layer in wrapped.layers):
        raise ConversionError("no layer of this model can be pruned "
                              f"({'; '.join(f'{k}: {v}' for k, v in skipped.items()) or 'no weighted layers'})")
    desc = "prune 2:4" if structured else f"prune {sparsity:.0%}"
    losses = fit(wrapped, data, epochs=epochs, batch_size=training.batch_size,
                 learning_rate=training.learning_rate, probabilities=probabilities, progress=progress,
                 desc=desc, callbacks=[sparsity_api.UpdatePruningStep()], seed=seed, batchnorm=training.batchnorm)
    stripped = sparsity_api.strip_pruning(wrapped)
    after_finetune(stripped, data.x, batch_size=training.batch_size, batchnorm=training.batchnorm)
    return PruneResult(stripped, layer_sparsity(stripped), skipped, losses)


def pruning_epochs(data: Dataset, training: TrainingConfig) -> int:
    """Epochs of pruning's fine-tuning on ``data``: ``finetune_epochs``, or more to make at least
    ``prune_min_steps`` optimizer steps.

    >>> pruning_epochs(digits_finetune_split, TrainingConfig())   # doctest: +SKIP
    9
    """
    per_epoch = steps_per_epoch(data, training.batch_size)
    return max(training.finetune_epochs, math.ceil(training.prune_min_steps / per_epoch))


def layer_sparsity(model: Any) -> dict[str, float]:
    """Fraction of exact zeros in each weighted layer's kernels (biases and BN excluded)."""
    out: dict[str, float] = {}
    for layer in model.layers:
        kernels = [w.numpy() for w in layer.weights if w.name.split("/")[-1].split(":")[0] in _KERNEL_NAMES]
        if kernels:
            total = sum(k.size for k in kernels)
            out[layer.name] = float(sum(np.count_nonzero(k == 0) for k in kernels) / total)
    return out


def overall_sparsity(model: Any) -> float:
    """Fraction of zeros over all kernels of the model."""
    zeros = total = 0
    for layer in model.layers:
        for w in layer.weights:
            if w.name.split("/")[-1].split(":")[0] in _KERNEL_NAMES:
                value = w.numpy()
                zeros += int(np.count_nonzero(value == 0))
                total += value.size
    return zeros / total if total else 0.0
