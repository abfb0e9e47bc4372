"""Binary classifiers with one output (``Dense(1)``, sigmoid or logit, as Keras's tutorials write them) were refused
("edgekit handles classifiers with output (batch, classes) and at least 2 classes"). They are served as two exactly
equivalent columns whose column 1 is the model's own output (:mod:`edgekit.loading.binary`)."""

import json

import numpy as np
import pytest
from conftest import run_cli

from edgekit import _tf
from edgekit.errors import ModelLoadError
from edgekit.loading.binary import OneOutput
from edgekit.loading.models import load_model, load_warnings, predict


def _binary_digits(digits):
    """Digits as a binary task (5-9 against 0-4), flattened."""
    return digits.x.reshape(len(digits.x), -1), (digits.y >= 5).astype(np.int64)


def _head(keras, flavour: str):
    """The layers after a hidden Dense: the one-output heads keras.io's tutorials write."""
    if flavour == "sigmoid":
        return [keras.layers.Dense(1, activation="sigmoid")]
    if flavour == "activation":
        return [keras.layers.Dense(1), keras.layers.Activation("sigmoid")]
    return [keras.layers.Dense(1)]  # a logit (BinaryCrossentropy(from_logits=True))


def _model(keras, flavour: str, x: np.ndarray):
    """A model whose logit is the sample's mean pixel minus the median of those means: both signs on ``x``."""
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(8, activation="relu"), *_head(keras, flavour)])
    hidden, head = [layer for layer in model.layers if type(layer).__name__ == "Dense"]
    hidden.set_weights([np.full((64, 8), 1 / 64, np.float32), np.zeros(8, np.float32)])
    head.set_weights([np.full((8, 1), 1 / 8, np.float32), -np.median(x.mean(axis=1), keepdims=True)])
    return model


@pytest.mark.parametrize("keras_version, flavour, save_as", [
    ("tf-keras", "sigmoid", "model.h5"),
    ("tf-keras", "activation", "model.keras"),
    ("keras3", "logit", "model.keras"),
    ("keras3", "activation", "model.keras"),
    ("keras3", "sigmoid", "export"),  # a plain SavedModel (model.export): a graph, its output judged from its values
    ("keras3", "logit", "export"),
])
def test_a_one_output_binary_classifier_is_served_as_two_equivalent_columns(digits, tmp_path, keras_version,
                                                                          flavour, save_as):
    keras = _tf.keras() if keras_version == "tf-keras" else _tf.keras3()
    x, _ = _binary_digits(digits)
    model = _model(keras, flavour, x)
    own = np.asarray(model(x[:200])).reshape(-1)
    path = tmp_path / save_as
    model.export(str(path), verbose=False) if save_as == "export" else model.save(path)

    loaded = load_model(path, sample=x[:64])
    probability = flavour != "logit"
    assert loaded.num_classes == 2
    assert loaded.one_output is (OneOutput.PROBABILITY if probability else OneOutput.LOGIT)
    assert loaded.outputs_probabilities is probability
    out = predict(loaded.source, x[:200])
    assert out.shape == (200, 2)
    np.testing.assert_allclose(out[:, 1], own, atol=1e-5)  # column 1 is the model's own output
    np.testing.assert_allclose(out[:, 0], 1 - own if probability else 0, atol=1e-5)
    assert (own > (0.5 if probability else 0)).any() and (own < (0.5 if probability else 0)).any()
    np.testing.assert_array_equal(out.argmax(1), own > (0.5 if probability else 0))
    note = load_warnings(loaded)
    kind = "sigmoid probability" if probability else "logit"
    assert len(note) == 1 and note[0].startswith(f"the model has one output, read as the {kind} of class 1: ")


def test_one_outputs_that_are_not_a_binary_classifiers_are_refused_naming_the_layer(tmp_path):
    keras3 = _tf.keras3()
    tanh = keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(1, activation="tanh", name="score")])
    tanh.save(tmp_path / "tanh.keras")
    with pytest.raises(ModelLoadError, match=r"^the model's one output comes from layer 'score' with activation tanh; "
                                             r"edgekit reads one output as a binary classifier's sigmoid probability"):
        load_model(tmp_path / "tanh.keras")
    # a hard sigmoid is a probability too, but no two-column softmax reproduces its piecewise line
    hard = keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(1, activation="hard_sigmoid", name="hard")])
    hard.save(tmp_path / "hard.keras")
    with pytest.raises(ModelLoadError, match=r"^the model's one output comes from layer 'hard' with activation "
                                             r"hard_sigmoid"):
        load_model(tmp_path / "hard.keras")
    keras = _tf.keras()
    pooled = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(1, 3),
                               keras.layers.GlobalAveragePooling2D(name="pool")])
    pooled.save(tmp_path / "pooled.h5")
    with pytest.raises(ModelLoadError, match=r"^the model's one output comes from a GlobalAveragePooling2D layer "
                                             r"'pool'; edgekit serves a one-output binary classifier whose output "
                                             r"layer is Dense\(1\)"):
        load_model(tmp_path / "pooled.h5")


def test_a_binary_keras3_classifier_compresses_installs_predicts_and_trains_on_the_device(digits, tmp_path):
    """keras.io's binary head (``Dense(1)``, logits): compress, the device agent's predictions, on-device training."""
    keras3 = _tf.keras3()
    x, y = _binary_digits(digits)
    keras3.utils.set_random_seed(0)
    model = keras3.Sequential([keras3.Input((64,)), keras3.layers.Dense(32, activation="relu"), keras3.layers.Dense(1)])
    model.compile("adam", keras3.losses.BinaryCrossentropy(from_logits=True))
    model.fit(x, y, epochs=20, batch_size=64, verbose=0)
    logits = np.asarray(model(x)).reshape(-1)
    assert np.mean((logits > 0) == y) > 0.9  # it has learned
    model.save(tmp_path / "binary.keras")
    np.savez(tmp_path / "binary.npz", x=x, y=y)

    proc = run_cli("compress", str(tmp_path / "binary.keras"), "--data", str(tmp_path / "binary.npz"),
                   "--out", str(tmp_path / "out"), "--quantize", "int8", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "the model has one output, read as the logit of class 1: the artifacts output two logits [0, z]" \
        in proc.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["model_output"] == {"shape": [None, 1], "kind": "logit"}
    assert manifest["source"]["output"] == {"shape": [None, 2], "kind": "logits"}
    assert manifest["source"]["accuracy"] > 90

    proc = run_cli("predict", "--model", str(tmp_path / "out"), "--input", str(tmp_path / "binary.npz"),
                   "--output", str(tmp_path / "p.npy"), tool="edgekit-agent")
    assert proc.returncode == 0, proc.stderr
    served = np.load(tmp_path / "p.npy")
    assert served.shape == (len(x), 2)
    assert np.mean(served.argmax(1) == (logits > 0)) > 0.97  # the int8 model decides as the Keras model does
    assert np.mean(served.argmax(1) == y) > 0.9

    proc = run_cli("trainable", str(tmp_path / "binary.keras"), "--data", str(tmp_path / "binary.npz"),
                   "--out", str(tmp_path / "trainable"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "one train step vs TensorFlow max abs diff" in proc.stdout
    assert json.loads((tmp_path / "trainable" / "manifest.json").read_text())["trainable"]["num_classes"] == 2


@pytest.mark.parametrize("flavour", ["sigmoid", "logit"])
def test_head_only_training_of_a_one_output_graph_trains_two_columns(digits, tmp_path, flavour):
    """A plain SavedModel's head is read back from its graph's trailing dense ops: the two columns appended to the
    graph hid them ("its output comes from a ConcatV2 op"). The one-output graph is split, its head given the
    columns."""
    from device_agents.training.trainer import Trainer
    from edgekit.trainable.export import TrainableConfig, export_trainable

    keras3 = _tf.keras3()
    x, y = _binary_digits(digits)
    keras3.utils.set_random_seed(0)
    model = keras3.Sequential([keras3.Input((64,)), keras3.layers.Dense(16, activation="relu"),
                               keras3.layers.Dense(1, activation="sigmoid" if flavour == "sigmoid" else None)])
    model.export(str(tmp_path / "export"), verbose=False)
    own = np.asarray(model(x[:64])).reshape(-1)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    export_trainable(tmp_path / "export", tmp_path / "trainable", data=tmp_path / "data.npz", progress=False,
                     config=TrainableConfig(head_only=True))
    trainer = Trainer.load(tmp_path / "trainable")
    assert trainer.spec["mode"] == "head-only" and trainer.spec["num_classes"] == 2
    out = trainer.predict(x[:64])
    assert out.shape == (64, 2)
    np.testing.assert_allclose(out[:, 1], own, atol=0.1)  # the int8 backbone's rounding
    assert np.mean(out.argmax(1) == (own > (0.5 if flavour == "sigmoid" else 0))) > 0.95
