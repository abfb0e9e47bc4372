"""Data outside the range the model's own preprocessing was built for is named with its numbers (MobileNetV3Small's
Rescaling(1/127.5, -1) fed 0-1 pixels sees [-1, -0.992]), in the library, the CLI and the report."""

import numpy as np
from conftest import run_cli

from edgekit import _tf
from edgekit.loading.input_range import input_range_warnings

RNG = np.random.default_rng(0)
PIXELS = RNG.uniform(0, 1, size=(64, 8, 8, 1)).astype(np.float32)


def _model(*first):
    keras = _tf.keras()
    return keras.Sequential([keras.Input((8, 8, 1)), *first, keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                             keras.layers.Dense(10, activation="softmax")])


def test_a_rescaling_built_for_0_255_fed_0_1_pixels_is_named_with_its_numbers():
    keras = _tf.keras()
    model = _model(keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale"))
    warnings = input_range_warnings(model, PIXELS)
    assert len(warnings) == 1, warnings
    assert "'rescale' (x * 0.007843 + -1)" in warnings[0] and "into [-1.000, -0.992]" in warnings[0]
    assert "0.4% of the [-1, 1] it was built for (inputs 0 to 255)" in warnings[0]
    assert input_range_warnings(model, PIXELS * 255) == []


def test_a_normalization_adapted_to_other_data_is_named_and_a_model_without_preprocessing_is_quiet():
    keras = _tf.keras()
    norm = keras.layers.Normalization(name="norm")
    norm.adapt(PIXELS * 255)
    model = _model(norm)
    warnings = input_range_warnings(model, PIXELS)
    assert len(warnings) == 1 and "Normalization layer 'norm'" in warnings[0], warnings
    assert input_range_warnings(model, PIXELS * 255) == []
    assert input_range_warnings(_model(), PIXELS) == []


def test_a_normalization_given_its_statistics_is_read_too():
    """keras.applications' include_preprocessing (EfficientNetV2's) gives Normalization its mean and variance in
    the constructor: it has no weights, and reading them ended compress and trainable in an internal error."""
    keras = _tf.keras()
    model = _model(keras.layers.Rescaling(1.0), keras.layers.Normalization(mean=127.5, variance=64.0**2, name="given"))
    assert model.layers[1].get_weights() == []
    warnings = input_range_warnings(model, PIXELS)
    assert len(warnings) == 1 and "Normalization layer 'given' (mean 128, std 64)" in warnings[0], warnings
    assert input_range_warnings(model, PIXELS * 255) == []


def test_the_cli_and_the_report_say_it(tmp_path):
    keras = _tf.keras()
    model = _model(keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale"))
    model.compile("adam", "sparse_categorical_crossentropy")
    y = RNG.integers(0, 10, size=len(PIXELS))
    model.fit(PIXELS, y, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    np.savez(tmp_path / "d.npz", x=np.repeat(PIXELS, 5, axis=0), y=np.repeat(y, 5))
    proc = run_cli("compress", str(tmp_path / "m.keras"), "--data", str(tmp_path / "d.npz"), "--quantize",
                   "float16", "--formats", "tflite", "--out", str(tmp_path / "out"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "edgekit: warning: the model's own Rescaling layer 'rescale'" in proc.stderr
    report = (tmp_path / "out" / "report.md").read_text()
    assert "- **warning**: the model's own Rescaling layer 'rescale'" in report
