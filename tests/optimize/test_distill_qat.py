"""The training-based techniques' own pieces: the thin student of distillation, and QAT's float twin (the weights
QAT tuned, in a float model of the source's layout)."""

import numpy as np
import pytest
from conftest import fast_training, tiny_cnn

from edgekit import _tf
from edgekit.errors import InputError
from edgekit.optimize.distill import check_student, thin_student
from edgekit.optimize.qat import float_twin, quantize_aware


def test_a_thin_student_scales_every_width_but_the_classes_and_is_freshly_initialised():
    teacher = tiny_cnn()
    student = thin_student(teacher, 0.5)
    widths = {layer.name: layer.get_config().get("filters", layer.get_config().get("units"))
              for layer in student.layers}
    assert widths["conv2d"] == 8 and widths["conv2d_1"] == 16  # 16 and 32 filters halved
    assert student.outputs[0].shape[-1] == teacher.outputs[0].shape[-1] == 10
    assert student.count_params() < 0.4 * teacher.count_params()
    check_student(student, teacher)  # same input, same classes


def test_a_student_with_other_classes_or_inputs_is_refused_with_the_numbers():
    keras = _tf.keras()
    teacher = tiny_cnn()
    other_classes = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)])
    with pytest.raises(InputError, match="the student has 3 outputs but the teacher has 10 classes"):
        check_student(other_classes, teacher)
    other_input = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    with pytest.raises(InputError, match=r"the student's input \(4, 4, 1\) differs from the teacher's \(8, 8, 1\)"):
        check_student(other_input, teacher)


def test_the_float_twin_of_a_qat_model_computes_what_the_qat_model_learned(digits):
    from edgekit._progress import Progress

    model = tiny_cnn()
    qat, left = quantize_aware(model, digits.take(np.arange(256)), training=fast_training(finetune_epochs=1),
                               probabilities=True, progress=Progress(enabled=False))
    twin = float_twin(qat, model)
    assert [layer.name for layer in twin.layers] == [layer.name for layer in model.layers]
    x = digits.x[:256]
    # fake quantization is all that separates them: the float twin computes what the QAT model learned, far closer
    # to it than the source it started from (agreement alone is noise on a model tuned one epoch: 94-98%)
    twin_out, qat_out, source_out = (m.predict(x, verbose=0) for m in (twin, qat, model))
    near, far = np.mean(np.abs(twin_out - qat_out)), np.mean(np.abs(source_out - qat_out))
    assert near < 0.5 * far, (near, far)
    assert np.mean(twin_out.argmax(1) == qat_out.argmax(1)) >= 0.85
    changed = [not np.array_equal(a, b) for a, b in zip(twin.get_weights(), model.get_weights())]
    assert any(changed)  # the tuned weights, not the source's
