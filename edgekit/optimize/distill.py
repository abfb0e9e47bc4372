"""Knowledge distillation: a teacher trains a smaller student on the user's data."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit import _tf
from edgekit._progress import Progress
from edgekit.config import BatchNorm, TrainingConfig
from edgekit.errors import InputError
from edgekit.loading.data import Dataset
from edgekit.loading.layers import SCALE_ATTRIBUTES, iter_layers
from edgekit.loading.models import predict
from edgekit.optimize._fit import reestimate_batchnorm, steps_per_epoch


def thin_student(teacher: Any, width: float) -> Any:
    """A freshly initialised copy of ``teacher`` with the widths of :data:`SCALE_ATTRIBUTES` (filters, units,
    attention key size...) scaled by ``width``; every other layer is kept as it is.

    The output layer keeps its size (one unit per class).

    >>> student = thin_student(teacher, 0.5)   # doctest: +SKIP
    """
    keras = _tf.keras()
    weighted = [layer for layer in iter_layers(teacher) if layer.weights]
    output_layer = weighted[-1].name if weighted else None

    def scale(layer: Any) -> Any:
        config = layer.get_config()
        attribute = SCALE_ATTRIBUTES.get(layer.__class__.__name__)
        if attribute in config and layer.name != output_layer:
            config[attribute] = max(1, int(round(config[attribute] * width)))
        for key in ("query_shape", "key_shape", "value_shape"):  # tf-keras attention: built from its new inputs
            if key in config:
                config[key] = None
        if layer.__class__.__name__ == "Reshape" and -1 not in config["target_shape"]:  # e.g. squeeze-excite's
            config["target_shape"] = (*config["target_shape"][:-1], -1)  # (1, 1, filters): follow the thinner input
        return layer.__class__.from_config(config)

    return keras.models.clone_model(teacher, clone_function=scale)


def logits_of(outputs: np.ndarray, probabilities: bool) -> np.ndarray:
    """Logits from model outputs (log-probabilities serve as logits for a softmax model)."""
    return np.log(np.clip(outputs, 1e-8, 1.0)) if probabilities else outputs


def check_student(student: Any, teacher: Any) -> None:
    if tuple(student.inputs[0].shape[1:]) != tuple(teacher.inputs[0].shape[1:]):
        raise InputError(f"the student's input {tuple(student.inputs[0].shape[1:])} differs from the teacher's "
                         f"{tuple(teacher.inputs[0].shape[1:])}; give a student with the same input")
    if student.outputs[0].shape[-1] != teacher.outputs[0].shape[-1]:
        raise InputError(f"the student has {student.outputs[0].shape[-1]} outputs but the teacher has "
                         f"{teacher.outputs[0].shape[-1]} classes; give a student with the same classes")


def distill(teacher: Any, student: Any, data: Dataset, *, training: TrainingConfig, teacher_probabilities: bool,
            student_probabilities: bool, progress: Progress, seed: int = 0) -> list[float]:
    """Train ``student`` in place on soft targets (temperature T) plus hard labels; return epoch losses.

    loss = alpha * CE(y, student) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))
    """
    tf = _tf.tf()
    keras = _tf.keras()
    check_student(student, teacher)
    _tf.set_seed(seed)
    t_logits = logits_of(predict(teacher, data.x), teacher_probabilities)
    temperature, alpha = training.temperature, training.distill_alpha
    if data.y is None:
        alpha = 0.0
    y = data.y if data.y is not None else t_logits.argmax(axis=1)
    optimizer = keras.optimizers.Adam(training.distill_learning_rate)
    ds = (tf.data.Dataset.from_tensor_slices((data.x, y.astype(np.int64), t_logits))
          .shuffle(len(data), seed=seed).batch(training.batch_size))

    @tf.function
    def step(x: Any, labels: Any, teacher_logits: Any) -> Any:
        with tf.GradientTape() as tape:
            out = student(x, training=True)
            s_logits = tf.math.log(tf.clip_by_value(out, 1e-8, 1.0)) if student_probabilities else out
            hard = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, s_logits))
            soft_t = tf.nn.softmax(teacher_logits / temperature)
            log_soft_s = tf.nn.log_softmax(s_logits / temperature)
            kl = tf.reduce_mean(tf.reduce_sum(soft_t * (tf.math.log(soft_t + 1e-8) - log_soft_s), axis=1))
            loss = alpha * hard + (1.0 - alpha) * temperature ** 2 * kl
        grads = tape.gradient(loss, student.trainable_variables)
        optimizer.apply_gradients(zip(grads, student.trainable_variables))
        return loss

    steps = steps_per_epoch(data, training.batch_size)
    bar = progress.bar(training.distill_epochs * steps, "distill student", unit="step")
    losses = []
    for _ in range(training.distill_epochs):
        total = 0.0
        for xb, yb, tb in ds:
            loss = float(step(xb, yb, tb))
            total += loss
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        losses.append(total / steps)
    bar.close()
    if training.batchnorm is not BatchNorm.KEEP:  # a student trains its BN from scratch: never frozen
        reestimate_batchnorm(student, data.x, batch_size=training.batch_size)
    return losses
