"""Quantization-aware training with tensorflow-model-optimization's 8-bit scheme."""

from __future__ import annotations

from typing import Any

from device_agents.errors import first_line
from edgekit import _tf
from edgekit._progress import Progress
from edgekit.config import TrainingConfig
from edgekit.errors import ConversionError
from edgekit.loading.data import Dataset
from edgekit.loading.layers import check_model
from edgekit.loading.models import copy_model
from edgekit.optimize._fit import fit


def quantize_aware(model: Any, data: Dataset, *, training: TrainingConfig, probabilities: bool,
                   progress: Progress, preserve_sparsity: bool = False, seed: int = 0) -> Any:
    """Return a QAT copy of ``model`` (fake-quant nodes in place), fine-tuned on ``data``.

    With ``preserve_sparsity`` (a pruned model) tfmot's prune-preserving scheme keeps the zeros.
    """
    check_model(model, need="qat")
    quant = _tf.tfmot().quantization.keras
    base = copy_model(model)
    try:
        if preserve_sparsity:
            from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.prune_preserve import (
                default_8bit_prune_preserve_quantize_scheme as pqat,
            )

            annotated = quant.quantize_annotate_model(base)
            qat_model = quant.quantize_apply(annotated, pqat.Default8BitPrunePreserveQuantizeScheme())
        else:
            qat_model = quant.quantize_model(base)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ConversionError(f"tfmot cannot make this model quantization-aware: {first_line(exc)}") from None
    fit(qat_model, data, epochs=training.finetune_epochs, batch_size=training.batch_size,
        learning_rate=training.learning_rate / 10, probabilities=probabilities, progress=progress,
        desc="quantization-aware training", seed=seed)
    return qat_model


def float_twin(qat_model: Any, template: Any) -> Any:
    """A float copy of ``template`` holding the weights QAT fine-tuned (read by variable name).

    tfmot's wrappers take the inner layers' kernels over, named ``<layer>/<variable>``.
    """
    twin = copy_model(template)
    tuned = {_key(w.name): w for w in qat_model.weights}
    for layer in twin.layers:
        values = []
        for weight in layer.weights:
            source = tuned.get(f"{layer.name}/{_key(weight.name).split('/')[-1]}")
            if source is None or tuple(source.shape) != tuple(weight.shape):
                raise ConversionError(f"cannot map the QAT weight {weight.name} of layer '{layer.name}' "
                                      "back to a float model")
            values.append(source.numpy())
        if values:
            layer.set_weights(values)
    return twin


def _key(name: str) -> str:
    return name.split(":")[0]
