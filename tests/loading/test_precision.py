"""Models trained with mixed precision (``mixed_float16``, a GPU box's usual setting) kept their 16-bit layers: the
TFLite converter had no builtin kernel for their float16 convolutions, so no ``.tflite`` was written at all, and the
"float32" reference artifacts computed in float16. They are served in float32 with the same weights
(:mod:`edgekit.loading.precision`)."""

import json

import numpy as np
import pytest
from conftest import run_cli

from edgekit import _tf
from edgekit.loading.models import load_model, load_warnings, predict
from edgekit.loading.precision import half_policy


def _mixed(keras, digits):
    """A CNN whose layers compute in mixed_float16 (set per layer: the global policy stays float32 for other tests),
    its softmax in float32 as Keras's mixed-precision guide writes it; trained briefly."""
    policy = "mixed_float16"
    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation="relu", dtype=policy),
        keras.layers.BatchNormalization(dtype=policy), keras.layers.Flatten(dtype=policy),
        keras.layers.Dense(10, dtype=policy), keras.layers.Activation("softmax", dtype="float32")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits.x, digits.y, epochs=3, batch_size=64, verbose=0)
    return model


@pytest.mark.parametrize("keras_version, save_as", [("keras3", "mixed.keras"), ("tf-keras", "mixed.h5"),
                                                     ("tf-keras", "savedmodel")])
def test_a_mixed_precision_model_is_served_in_float32_with_its_weights(digits, tmp_path, keras_version, save_as):
    keras = _tf.keras3() if keras_version == "keras3" else _tf.keras()
    model = _mixed(keras, digits)
    assert model.layers[0].compute_dtype == "float16" and half_policy(model) == "mixed_float16"
    model.save(tmp_path / save_as)
    own = np.asarray(model(digits.x[:200], training=False), np.float32)

    loaded = load_model(tmp_path / save_as, sample=digits.x[:64])
    computes = {layer.name: layer.compute_dtype for layer in loaded.model.layers}
    assert set(computes.values()) == {"float32"} and half_policy(loaded.model) is None, computes
    served = predict(loaded.source, digits.x[:200])
    assert 0 < np.max(np.abs(served - own)) < 1e-2  # the float16 rounding, no more
    assert np.mean(served.argmax(1) == own.argmax(1)) > 0.98
    assert loaded.float32_served.policy == "mixed_float16"
    assert loaded.float32_served.measured_on == "64 samples of the data"
    assert 0 < loaded.float32_served.max_abs_diff < 1e-2
    assert load_warnings(loaded)[0].startswith("the model computes in mixed_float16 (trained with mixed precision): "
                                               "edgekit serves it in float32 with the same weights")


def test_a_mixed_precision_model_compresses_to_both_formats(digits, tmp_path):
    """No .tflite was written ("op Conv2D has no TFLite builtin kernel"); the int8 .onnx was larger than the
    "float32" one."""
    _mixed(_tf.keras(), digits).save(tmp_path / "mixed.h5")
    proc = run_cli("compress", str(tmp_path / "mixed.h5"), "--out", str(tmp_path / "out"), "--quantize", "int8",
                   "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "the model computes in mixed_float16 (trained with mixed precision)" in proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    artifacts = {a["format"]: a for a in manifest["artifacts"]}
    assert set(artifacts) == {"tflite", "onnx"}, proc.stderr
    for art in artifacts.values():
        assert art["bytes"] < art["float32_bytes"] / 2, art
    assert manifest["warnings"][0].startswith("the model computes in mixed_float16")


def test_a_mixed_precision_model_whose_config_cannot_be_rebuilt_is_served_as_it_is_and_said(digits, monkeypatch):
    """A custom layer's from_config can raise: the model is served as it was (its ONNX exports), and the user hears
    why a .tflite may fail and what to do."""
    keras = _tf.keras()
    model = _mixed(keras, digits)

    def refuse(cls, config, custom_objects=None):
        raise ValueError("MyLayer.from_config takes no dtype")

    monkeypatch.setattr(keras.Sequential, "from_config", classmethod(refuse))
    loaded = load_model(model, sample=digits.x[:64])
    assert half_policy(loaded.model) == "mixed_float16"
    assert loaded.float32_served.max_abs_diff is None
    assert load_warnings(loaded)[0] == (
        "the model computes in mixed_float16 (trained with mixed precision) and cannot be rebuilt in float32 from its "
        "config (MyLayer.from_config takes no dtype): the TFLite converter has no float16 kernels for its "
        "layers; save it after mixed_precision.set_global_policy('float32') and loading its weights")


def test_a_federated_run_says_how_the_model_is_served(digits, tmp_path):
    """The federated run trains the served model (float32, two columns): its warnings say so, as compress's do."""
    from edgekit.federated.config import FederationConfig
    from edgekit.federated.run import prepare_run

    keras3 = _tf.keras3()
    policy = "mixed_float16"
    model = keras3.Sequential([keras3.Input((8, 8, 1)), keras3.layers.Flatten(), keras3.layers.Dense(8, dtype=policy),
                               keras3.layers.Dense(1, activation="sigmoid", dtype="float32")])
    np.savez(tmp_path / "binary.npz", x=digits.x, y=digits.y >= 5)  # bool labels: a binary task's
    run = prepare_run(model, tmp_path / "binary.npz", tmp_path / "run", FederationConfig(clients=2), progress=False)
    assert run.loaded.num_classes == 2 and half_policy(run.loaded.model) is None
    assert run.warnings[0].startswith("warning: the model computes in mixed_float16 (trained with mixed precision)")
    assert run.warnings[1].startswith("warning: the model has one output, read as the sigmoid probability of class 1")


def test_a_model_keras_quantized_itself_is_refused_saying_to_give_the_float_model(digits, tmp_path):
    """model.quantize("int8") (Keras 3) gave no .tflite (BatchMatMulV3 has no builtin kernel) and an int8 .onnx
    larger than float32, with warnings that did not say why."""
    from edgekit.errors import ModelLoadError

    keras3 = _tf.keras3()
    model = keras3.Sequential([keras3.Input((64,)), keras3.layers.Dense(8, name="hidden"), keras3.layers.Dense(10)])
    model.save(tmp_path / "float.keras")
    model.quantize("int8")
    model.save(tmp_path / "quantized.keras")
    with pytest.raises(ModelLoadError, match=r"^the model was quantized by Keras \(layer 'hidden': int8_from_float32\)"
                                             r", in kernels device runtimes do not run; give edgekit the float model "
                                             r"\(before model.quantize\(\)\)"):
        load_model(tmp_path / "quantized.keras")
    assert load_model(tmp_path / "float.keras").num_classes == 10
