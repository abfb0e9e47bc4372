"""Loading every accepted format, the Keras 3 rebuild, and refusals before any training."""

import json
import zipfile

import numpy as np
import pytest

from edgekit import _tf
from edgekit.errors import ModelLoadError, UnsupportedLayerError
from edgekit.loading.layers import LAYERS, support
from edgekit.loading.models import load_model, rebuild_keras3


@pytest.mark.parametrize("fmt", ["keras", "h5", "savedmodel"])
def test_tf_keras_formats_load_with_identical_outputs(cnn, digits, tmp_path, fmt):
    path = tmp_path / {"keras": "m.keras", "h5": "m.h5", "savedmodel": "sm"}[fmt]
    cnn.save(path)
    loaded = load_model(path)
    assert loaded.source_format == fmt
    assert loaded.input_shape == (8, 8, 1) and loaded.num_classes == 10 and loaded.outputs_probabilities
    assert len(loaded.sha256) == 64
    np.testing.assert_allclose(loaded.model(digits.x[:32]).numpy(), cnn(digits.x[:32]).numpy(), atol=1e-6)


def test_keras3_functional_model_is_rebuilt_and_verified(keras3_path, digits):
    loaded = load_model(keras3_path)
    assert loaded.source_format == "keras3"
    assert loaded.rebuild_max_abs_diff is not None and loaded.rebuild_max_abs_diff <= 1e-5
    assert isinstance(loaded.model, _tf.keras().Model)  # tf-keras, usable by tfmot
    original = _tf.keras3().saving.load_model(keras3_path)
    np.testing.assert_allclose(loaded.model(digits.x[:64]).numpy(), np.asarray(original(digits.x[:64])),
                               atol=1e-5)


def test_keras3_h5_and_text_model_rebuild(text_model_path, tmp_path):
    k3 = _tf.keras3().saving.load_model(text_model_path)
    k3.save(tmp_path / "text.h5")
    for path in (text_model_path, tmp_path / "text.h5"):
        loaded = load_model(path)
        assert loaded.source_format == "keras3" and loaded.input_dtype == "int32" and loaded.num_classes == 3


def test_rebuild_mismatch_is_refused(keras3_path):
    k3 = _tf.keras3().saving.load_model(keras3_path)
    model, diff = rebuild_keras3(k3)
    assert diff <= 1e-5
    # a model whose weights change after the rebuild would be caught by the same check
    conv = next(layer for layer in k3.layers if layer.__class__.__name__ == "Conv2D")
    conv.set_weights([w + 0.5 for w in conv.get_weights()])
    original = conv.get_weights
    conv.get_weights = lambda: [w - 0.5 for w in original()]  # hand the rebuild stale weights
    with pytest.raises(ModelLoadError, match=r"differs from it by .* \(tolerance 1e-05\)"):
        rebuild_keras3(k3)


def test_a_layer_tf_keras_cannot_rebuild_leaves_the_graph_for_post_training(tmp_path):
    keras = _tf.keras3()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="d"),
                              keras.layers.LayerNormalization(name="norm_7"), keras.layers.Dense(3)])
    model.save(tmp_path / "ln.keras")
    loaded = load_model(tmp_path / "ln.keras")
    assert loaded.model is None and loaded.source is loaded.graph and loaded.source_format == "keras3"
    assert (loaded.input_shape, loaded.input_dtype, loaded.num_classes) == ((4,), "float32", 3)
    assert loaded.params == model.count_params() and loaded.outputs_probabilities is False
    x = np.random.default_rng(0).random((5, 4)).astype(np.float32)
    np.testing.assert_allclose(loaded.source(x), model(x).numpy(), atol=1e-6)  # the same graph
    with pytest.raises(UnsupportedLayerError, match="pruning needs a tf-keras model: .*layer 'norm_7' is a "
                                                    "LayerNormalization"):
        loaded.trainable_model("pruning")


@pytest.mark.parametrize("content, message", [
    (b"garbage", "not a valid .keras file"),
    (None, "not a valid .keras file"),
])
def test_corrupt_keras_files(tmp_path, content, message):
    path = tmp_path / "bad.keras"
    if content is None:  # a zip without metadata.json
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("config.json", json.dumps({}))
    else:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_missing_unknown_truncated_and_weights_only(cnn, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "none.keras")
    (tmp_path / "m.pt").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unknown extension '.pt'"):
        load_model(tmp_path / "m.pt")
    cnn.save(tmp_path / "m.h5")
    data = (tmp_path / "m.h5").read_bytes()
    (tmp_path / "t.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match="HDF5|cannot load"):
        load_model(tmp_path / "t.h5")
    cnn.save_weights(tmp_path / "w.weights.h5")
    with pytest.raises(ModelLoadError, match="weights only"):
        load_model(tmp_path / "w.weights.h5")


def test_a_plain_savedmodel_is_used_by_its_serving_signature(cnn, digits, tmp_path):
    tf = _tf.tf()
    tf.saved_model.save(cnn, str(tmp_path / "raw"))
    loaded = load_model(tmp_path / "raw")
    assert loaded.model is None and loaded.num_classes == 10 and loaded.input_shape == (8, 8, 1)
    assert loaded.outputs_probabilities is True and "graph only" in loaded.training_unavailable
    np.testing.assert_allclose(loaded.source(digits.x[:16]), cnn(digits.x[:16]).numpy(), atol=1e-5)


def test_a_savedmodel_whose_graph_writes_files_is_refused_before_it_runs(tmp_path):
    tf = _tf.tf()
    marker = tmp_path / "GRAPH_RAN"

    class Sneaky(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
        def serve(self, x):
            tf.io.write_file(str(marker), "ran")
            return {"output": tf.nn.softmax(tf.concat([x, x], axis=1))}

    module = Sneaky()
    tf.saved_model.save(module, str(tmp_path / "sneaky"), signatures={"serving_default": module.serve})
    marker.unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="the graph runs WriteFile"):
        load_model(tmp_path / "sneaky")
    assert not marker.exists()


def test_non_classifier_outputs_refused(tmp_path):
    keras = _tf.keras()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.save(tmp_path / "reg.keras")
    with pytest.raises(ModelLoadError, match="at least 2 classes"):
        load_model(tmp_path / "reg.keras")


PRUNE_ARGS = {"Conv1D": (2, 3), "Conv2D": (2, 3), "Dense": (2,), "Embedding": (10, 2), "LSTM": (2,), "GRU": (2,),
              "SimpleRNN": (2,), "SeparableConv2D": (2, 3)}


def test_every_registered_layer_is_a_tf_keras_layer_and_prunable_ones_are_prunable():
    from tensorflow_model_optimization.python.core.sparsity.keras.prune_registry import PruneRegistry

    keras = _tf.keras()
    for name, entry in LAYERS.items():
        cls = getattr(keras.layers, name)
        assert issubclass(cls, keras.layers.Layer), name
        if entry.prune:  # the registry's claim holds: tfmot prunes some weight of an instance of it
            layer = cls(*PRUNE_ARGS[name])
            rnn = name in ("LSTM", "GRU", "SimpleRNN")
            weights = PruneRegistry._RNN_LAYERS if rnn else PruneRegistry._LAYERS_WEIGHTS_MAP[cls]  # noqa: SLF001
            assert PruneRegistry.supports(layer) and weights, name
    assert set(PRUNE_ARGS) == {name for name, entry in LAYERS.items() if entry.prune}
    with pytest.raises(UnsupportedLayerError, match="supported layers: Activation, Add"):
        support("Bogus", layer_name="b")


def _lambda_writing(marker):
    """A function whose only effect, when called, is to create ``marker``: the payload of the attack."""
    return eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).write_text('ran'), x)[1]")  # noqa: S307


@pytest.fixture(scope="module")
def code_carrying_models(tmp_path_factory):
    """The same model with a marker-writing Lambda in every format edgekit accepts."""
    import json

    import h5py

    d = tmp_path_factory.mktemp("lambda")
    marker = d / "MARKER"
    keras = _tf.keras()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(_lambda_writing(marker)),
                              keras.layers.Dense(2, activation="softmax")])
    model.save(d / "tfk.keras")
    model.save(d / "tfk.h5")
    model.save(d / "saved", save_format="tf")
    model.save(d / "legacy.h5")  # then rewritten to the legacy list form of a Sequential config
    with h5py.File(d / "legacy.h5", "r+") as handle:
        config = json.loads(handle.attrs["model_config"])
        config["config"] = config["config"]["layers"]
        handle.attrs["model_config"] = json.dumps(config)
    k3 = _tf.keras3()
    k3_model = k3.Sequential([k3.Input((4,)), k3.layers.Lambda(_lambda_writing(marker)),
                              k3.layers.Dense(2, activation="softmax")])
    k3_model.save(d / "k3.keras")
    marker.unlink()  # building the models above ran the lambda once; from here on it must never run
    return d, marker


def test_an_h5_lambda_really_runs_code_when_tf_keras_loads_it(tmp_path):
    """The attack is real: tf-keras itself runs a saved Lambda's code while loading an .h5."""
    import shutil

    marker = tmp_path / "MARKER"
    keras = _tf.keras()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(_lambda_writing(marker)), keras.layers.Dense(2)])
    model.save(tmp_path / "probe.h5")
    marker.unlink()
    shutil.copy(tmp_path / "probe.h5", tmp_path / "copy.h5")
    keras.models.load_model(tmp_path / "copy.h5", compile=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["tfk.keras", "tfk.h5", "legacy.h5", "saved", "k3.keras"])
def test_a_model_that_carries_code_is_refused_before_any_of_it_runs(code_carrying_models, name):
    from conftest import assert_one_line_error, run_cli

    d, marker = code_carrying_models
    with pytest.raises(ModelLoadError, match="is a Lambda, whose Python code would run when the model loads"):
        load_model(d / name)
    proc = run_cli("compress", str(d / name), "--out", str(d / f"out-{name}"), "--quiet")
    assert_one_line_error(proc, 2, "edgekit refuses models that carry code")
    assert not marker.exists() and not (d / f"out-{name}").exists()
