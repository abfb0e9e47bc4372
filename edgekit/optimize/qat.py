"""Quantization-aware training with tensorflow-model-optimization's 8-bit scheme."""

from __future__ import annotations

from typing import Any

from device_agents.errors import first_line
from edgekit import _tf
from edgekit._progress import Progress
from edgekit.config import TrainingConfig
from edgekit.errors import ConversionError
from edgekit.loading.data import Dataset
from edgekit.loading.layers import qat_output_only, qat_skip_reason
from edgekit.loading.models import copy_model
from edgekit.optimize._fit import after_finetune, fit


def quantize_aware(model: Any, data: Dataset, *, training: TrainingConfig, probabilities: bool,
                   progress: Progress, preserve_sparsity: bool = False, seed: int = 0) -> tuple[Any, dict[str, str]]:
    """Return a QAT copy of ``model`` (fake-quant nodes in place), fine-tuned on ``data``, and the layers
    left in float with the reason (tfmot's 8-bit scheme annotates the layers it supports, one by one).

    With ``preserve_sparsity`` (a pruned model) tfmot's prune-preserving scheme keeps the zeros.
    """
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_configs as configs,
    )

    Default8BitOutputQuantizeConfig = configs.Default8BitOutputQuantizeConfig  # noqa: N806

    quant = _tf.tfmot().quantization.keras
    keras = _tf.keras()
    skipped: dict[str, str] = {}

    def annotate(layer: Any) -> Any:
        if layer.__class__.__name__ == "InputLayer":
            return layer
        why = qat_skip_reason(layer)
        if why is not None:
            skipped[layer.name] = why
            return layer
        partial = qat_output_only(layer)
        if partial is not None:
            skipped[layer.name] = partial
            return quant.quantize_annotate_layer(layer, quantize_config=Default8BitOutputQuantizeConfig())
        return quant.quantize_annotate_layer(layer)

    try:
        annotated = keras.models.clone_model(copy_model(model), clone_function=annotate)
        if len(skipped) == sum(1 for layer in annotated.layers if layer.__class__.__name__ != "InputLayer"):
            raise ConversionError("no layer of this model can be made quantization-aware "
                                  f"({'; '.join(f'{k}: {v}' for k, v in list(skipped.items())[:3])})")
        if preserve_sparsity:
            from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.prune_preserve import (
                default_8bit_prune_preserve_quantize_scheme as pqat,
            )

            with quant.quantize_scope({"Default8BitOutputQuantizeConfig": Default8BitOutputQuantizeConfig}):
                qat_model = quant.quantize_apply(annotated, pqat.Default8BitPrunePreserveQuantizeScheme())
        else:
            with quant.quantize_scope({"Default8BitOutputQuantizeConfig": Default8BitOutputQuantizeConfig}):
                qat_model = quant.quantize_apply(annotated)
    except (ValueError, TypeError, RuntimeError, KeyError) as exc:
        raise ConversionError(f"tfmot cannot make this model quantization-aware: {first_line(exc)}") from None
    fit(qat_model, data, epochs=training.finetune_epochs, batch_size=training.batch_size,
        learning_rate=training.learning_rate / 10, probabilities=probabilities, progress=progress,
        desc="quantization-aware training", seed=seed, batchnorm=training.batchnorm)
    after_finetune(qat_model, data.x, batch_size=training.batch_size, batchnorm=training.batchnorm)
    return qat_model, skipped


def float_twin(qat_model: Any, template: Any) -> Any:
    """A float copy of ``template`` holding the weights QAT fine-tuned.

    tfmot's wrappers take the inner layers' kernels over, named ``<layer>/<variable>`` (read by variable
    name); a layer QAT left in float is the same layer in the QAT model (copied as it is).
    """
    twin = copy_model(template)
    tuned = {_key(w.name): w for w in qat_model.weights}
    qat_layers = {layer.name: layer for layer in qat_model.layers}
    for layer in twin.layers:
        same = qat_layers.get(layer.name)
        if same is not None and same.__class__ is layer.__class__:  # left in float by QAT
            layer.set_weights(same.get_weights())
            continue
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
