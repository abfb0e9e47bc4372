"""A regression model (one linear output, compiled with mean squared error: keras.io's regression tutorials) was
read as a binary classifier's logit: without labels it was compressed and "verified" on the sign of its output; with
its targets as labels the error said "the model has 2 classes". It is refused at load, from the loss it was compiled
with (:mod:`edgekit.loading.task`), in every saved format; a classifier compiled with any loss still loads."""

import re

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli

from edgekit import _tf
from edgekit.errors import ModelLoadError
from edgekit.loading.binary import OneOutput
from edgekit.loading.models import load_model
from edgekit.loading.task import loss_name


def _model(keras, units: int, activation: str | None = None):
    return keras.Sequential([keras.Input((10,)), keras.layers.Dense(4, activation="relu"),
                             keras.layers.Dense(units, activation=activation)])


@pytest.mark.parametrize("keras_version, units, loss, save_as", [
    ("keras3", 1, "mse", "model.keras"),
    ("keras3", 1, "Huber", "model.h5"),
    ("keras3", 3, "mean_absolute_error", "model.keras"),  # three values per sample, not three classes
    ("tf-keras", 1, "mean_absolute_error", "model.h5"),
    ("tf-keras", 1, "LogCosh", "model.keras"),
    ("tf-keras", 1, "mse", "savedmodel"),
])
def test_a_regression_model_is_refused_from_its_compiled_loss(tmp_path, keras_version, units, loss, save_as):
    keras = _tf.keras() if keras_version == "tf-keras" else _tf.keras3()
    model = _model(keras, units)
    model.compile("adam", getattr(keras.losses, loss)() if loss[0].isupper() else loss)
    path = tmp_path / save_as
    model.save(path)
    with pytest.raises(ModelLoadError, match=rf"^{save_as} was compiled with the regression loss '\w+' and its output "
                                             r"layer is linear \(no softmax or sigmoid\): it predicts values, not "
                                             r"classes; edgekit compresses classifiers"):
        load_model(path)
    with pytest.raises(ModelLoadError, match="regression loss"):  # a compiled model object, as the Python API takes
        load_model(model)


@pytest.mark.parametrize("keras_version, units, activation, loss, kind", [
    ("keras3", 1, None, "BinaryCrossentropy", OneOutput.LOGIT),  # from_logits: keras.io's binary tutorials
    ("keras3", 1, "sigmoid", "mse", OneOutput.PROBABILITY),  # a probability trained on squared error: a classifier
    ("tf-keras", 3, "softmax", "mse", None),
    ("tf-keras", 3, None, "sparse_categorical_crossentropy", None),
    ("keras3", 1, None, None, OneOutput.LOGIT),  # saved uncompiled: read as a logit, as before
])
def test_a_classifier_loads_whatever_it_was_compiled_with(tmp_path, keras_version, units, activation, loss, kind):
    keras = _tf.keras() if keras_version == "tf-keras" else _tf.keras3()
    model = _model(keras, units, activation)
    if loss is not None:
        model.compile("adam", getattr(keras.losses, loss)(from_logits=True) if loss[0].isupper() else loss)
    model.save(tmp_path / "model.keras")
    loaded = load_model(tmp_path / "model.keras")
    assert loaded.num_classes == max(units, 2) and loaded.one_output is kind
    assert loss_name(getattr(model, "loss", None)) == loaded.compile_loss


def test_the_cli_refuses_a_regression_model_in_one_line_before_any_file(tmp_path):
    keras3 = _tf.keras3()
    model = _model(keras3, 1)
    model.compile("adam", "mse")
    model.save(tmp_path / "price.keras")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "houses.npz", x=rng.random((64, 10), np.float32), y=rng.integers(50, 400, 64))
    proc = run_cli("compress", str(tmp_path / "price.keras"), "--data", str(tmp_path / "houses.npz"),
                   "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, 2, "price.keras was compiled with the regression loss 'mse'",
                          "edgekit compresses classifiers",
                          "save it compiled with a classification loss, or uncompiled")
    model.compile("adam", "sparse_categorical_crossentropy")  # what the message says a classifier's owner can do
    model.save(tmp_path / "price.keras")
    assert load_model(tmp_path / "price.keras").one_output is OneOutput.LOGIT
    assert not (tmp_path / "out").exists()


def test_a_model_that_takes_strings_is_refused_saying_to_give_token_ids(tmp_path):
    """keras.io's end-to-end text model (TextVectorization inside) ended in an internal error (exit 70, "data type
    'string' not understood"); its text samples in "x has dtype <U10; it must be a numeric array"."""
    keras3 = _tf.keras3()
    texts = np.array(["a good film", "a bad film", "good", "bad"])
    vectorize = keras3.layers.TextVectorization(max_tokens=20, output_sequence_length=4)
    vectorize.adapt(texts)
    given = keras3.Input((1,), dtype="string")
    pooled = keras3.layers.GlobalAveragePooling1D()(keras3.layers.Embedding(20, 4)(vectorize(given)))
    model = keras3.Model(given, keras3.layers.Dense(2, activation="softmax")(pooled))
    model.save(tmp_path / "text.keras")
    model.export(str(tmp_path / "exported"), verbose=False)
    for path in (tmp_path / "text.keras", tmp_path / "exported"):
        with pytest.raises(ModelLoadError, match=r"takes strings \(a text vectorization or string lookup layer "
                                                 r"inside it\); TFLite and ONNX runtimes on devices take numbers: give "
                                                 r"edgekit the model from the layer after the vectorization on"):
            load_model(path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ids.npz", x=rng.integers(0, 20, (16, 1)), y=rng.integers(0, 2, 16))
    np.savez(tmp_path / "texts.npz", x=np.repeat(texts, 4)[:, None], y=rng.integers(0, 2, 16))
    proc = run_cli("compress", str(tmp_path / "text.keras"), "--data", str(tmp_path / "ids.npz"),
                   "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, 2, "the model takes strings", "x as those token ids")
    proc = run_cli("compress", str(tmp_path / "text.keras"), "--data", str(tmp_path / "texts.npz"),
                   "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, 2, "texts.npz: x has dtype <U11; it must be a numeric array (for text, the token ids")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("saved", [["mse"], {"out": "mse"}, {"class_name": 7}, {"class_name": ""}, 3.5, "", None])
def test_a_compile_config_that_names_no_single_loss_reads_as_uncompiled(saved):
    """The compile config is the file's, not edgekit's: anything but one named loss names none (no refusal)."""
    from edgekit.loading.task import refuse_regression

    assert loss_name(saved) is None
    refuse_regression(loss_name(saved), linear_output=True, source="m.keras")


@pytest.mark.parametrize("keras_version, units, head, loss, said", [
    ("keras3", 10, "sigmoid", "binary_crossentropy", "10 outputs for 10 input values: an autoencoder?"),
    ("tf-keras", 10, "sigmoid", "mse", "10 outputs for 10 input values: an autoencoder?"),
    ("keras3", 10, "layer", None, "10 outputs for 10 input values: an autoencoder?"),  # Activation("sigmoid") last
    ("keras3", 5, "sigmoid", "binary_crossentropy", "a multi-label classifier?"),
    ("tf-keras", 5, "layer", None, "a multi-label classifier?"),
])
def test_a_model_ending_in_several_sigmoids_is_refused(tmp_path, keras_version, units, head, loss, said):
    """A dense autoencoder (anomaly detection on a device: Dense(n, sigmoid) reconstructing n inputs) and a multi-label
    classifier (k sigmoids) were compressed and "verified" on the top-1 of independent 0-1 values, written to the
    manifest as logits (a softmax on the device); the autoencoder compiled with MSE was refused as having a *linear*
    output. They are refused at load, saying what the model looks like."""
    keras = _tf.keras() if keras_version == "tf-keras" else _tf.keras3()
    model = _model(keras, units, "sigmoid" if head == "sigmoid" else None)
    if head == "layer":
        model = keras.Sequential([*model.layers, keras.layers.Activation("sigmoid")])
        model.build((None, 10))
    if loss is not None:
        model.compile("adam", loss)
    model.save(tmp_path / "model.keras")
    with pytest.raises(ModelLoadError, match=rf"^the model ends in {units} sigmoids, an independent 0-1 value per unit "
                                             rf"\({re.escape(said)}\); edgekit handles single-label classifiers"):
        load_model(tmp_path / "model.keras")
    for activation in ("softmax", None):  # as many classes as input values: a classifier still loads
        assert load_model(_model(keras, 10, activation)).num_classes == 10
