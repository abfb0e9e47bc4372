"""Loading every accepted format, the Keras 3 rebuild, and refusals before any training."""

import inspect
import json
import zipfile

import numpy as np
import pytest

from edgekit import CompressConfig, Recipe, _tf
from edgekit.errors import ModelLoadError, UnsupportedLayerError
from edgekit.loading.layers import PRUNABLE, SCALE_ATTRIBUTES, prune_skip_reason, qat_output_only, qat_skip_reason
from edgekit.loading.models import load_model, predict, rebuild_keras3


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
    with pytest.raises(ModelLoadError, match=rf"the tf-keras rebuild of layer '{conv.name}' \(Conv2D\) differs from "
                                             r"the Keras 3 layer by .* of its output on the same inputs"):
        rebuild_keras3(k3)


def test_a_difference_every_layer_agrees_on_is_the_models_own_rounding(keras3_path, digits, monkeypatch):
    """A trained Keras 3 MobileNetV3Small fed 0-1 pixels rebuilt 2.6e-05 away from itself (its BatchNormalization
    amplifies the rounding of near-constant inputs) and was refused for every training path. Each layer is now run
    on the Keras 3 layer's own inputs: when all agree and no prediction changes, the difference is accepted."""
    from edgekit.loading import rebuild

    k3 = _tf.keras3().saving.load_model(keras3_path)
    _, diff = rebuild_keras3(k3, digits.x[:64])
    assert 0 < diff  # float32 rounding: the layers compute the same in another order
    monkeypatch.setattr(rebuild, "REBUILD_TOLERANCE", diff / 2)  # as if this model amplified it past the bound
    model, judged = rebuild_keras3(k3, digits.x[:64])
    assert judged == diff and isinstance(model, _tf.keras().Model)
    monkeypatch.setattr(rebuild, "AMPLIFIED_TOLERANCE", diff / 2)  # beyond what rounding may reach: refused
    with pytest.raises(ModelLoadError, match="although every layer agrees on the same inputs"):
        rebuild_keras3(k3, digits.x[:64])


def test_a_layer_tf_keras_cannot_rebuild_leaves_the_graph_for_post_training(tmp_path):
    keras = _tf.keras3()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="d"),
                              keras.layers.RMSNormalization(name="norm_7"), keras.layers.Dense(3)])
    model.save(tmp_path / "rms.keras")
    loaded = load_model(tmp_path / "rms.keras")
    assert loaded.model is None and loaded.source is loaded.graph and loaded.source_format == "keras3"
    assert (loaded.input_shape, loaded.input_dtype, loaded.num_classes) == ((4,), "float32", 3)
    assert loaded.params == model.count_params() and loaded.outputs_probabilities is False
    x = np.random.default_rng(0).random((5, 4)).astype(np.float32)
    np.testing.assert_allclose(loaded.source(x), model(x).numpy(), atol=1e-6)  # the same graph
    with pytest.raises(UnsupportedLayerError, match="pruning needs a tf-keras model: .*layer 'norm_7' is a "
                                                    "RMSNormalization, which tf-keras does not have"):
        loaded.trainable_model("pruning")


def test_the_rebuild_is_generic_ops_keras3_activations_shared_and_nested_layers(tmp_path):
    """Every construct of this model was refused by the old allow-list rebuild; it rebuilds, saves and reloads."""
    keras = _tf.keras3()
    layers = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 8))
    shared = layers.Dense(8, activation="hard_sigmoid", name="shared")  # Keras 3's hard_sigmoid is not tf-keras's
    a = shared(inp)
    x = layers.LayerNormalization()(a + layers.MultiHeadAttention(2, 4)(a, a))  # an op node, attention
    x = layers.Activation("hard_silu")(x * 0.5 + 1.0)  # ops with numbers, an activation tf-keras lacks
    x = shared(x)  # the shared layer's second call
    block = keras.Sequential([layers.GlobalAveragePooling1D(), layers.Dense(8, activation="silu"),
                              layers.Dense(8, activation="gelu")], name="block")  # gelu through erf (ONNX: Erf)
    out = layers.Dense(3, activation="softmax")(block(x))
    model = keras.Model(inp, out)
    model.save(tmp_path / "generic.keras")
    loaded = load_model(tmp_path / "generic.keras")
    assert loaded.model is not None and loaded.training_unavailable is None, loaded.training_unavailable
    assert loaded.rebuild_max_abs_diff <= 1e-5
    loaded.model.save(tmp_path / "rebuilt.keras")  # edgekit's model.keras output loads again, still code-free
    again = load_model(tmp_path / "rebuilt.keras")
    x = np.random.default_rng(1).standard_normal((4, 6, 8)).astype(np.float32)
    np.testing.assert_allclose(again.model(x).numpy(), model(x).numpy(), atol=1e-5)


def test_activation_op_nodes_are_rebuilt_and_a_softmax_op_output_is_read_as_probabilities(tmp_path):
    """`ops.softmax(logits)` as a functional model's output (an op node, not a layer) was not rebuilt (the model lost
    its training paths) and, judged by its last *layer* (a linear Dense), its probabilities were written to the
    manifest as logits, which a device's trainer softmaxes again. Activation op nodes rebuild as tf-keras layers and
    the output's own producer says what it is."""
    keras = _tf.keras3()
    ops = keras.ops
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    hidden = ops.tanh(ops.relu(keras.layers.Dense(8)(inp)))
    model = keras.Model(inp, ops.softmax(keras.layers.Dense(4)(ops.sigmoid(hidden))))
    model.save(tmp_path / "ops.keras")
    loaded = load_model(tmp_path / "ops.keras")
    assert loaded.model is not None and loaded.rebuild_max_abs_diff <= 1e-5 and loaded.outputs_probabilities
    sigmoids = keras.Model(inp, ops.sigmoid(keras.layers.Dense(4)(inp)))  # four independent 0-1 values
    with pytest.raises(ModelLoadError, match="the model ends in 4 sigmoids"):
        load_model(sigmoids)


def test_a_masked_recurrent_model_is_rebuilt_and_converts_to_tflite(tmp_path):
    """keras.io's "Masking and padding": Keras 3 records a Masking layer's mask as two op nodes (not_equal, any)
    passed on as mask=; the rebuild refused ("op 'not_equal' (NotEqual) has no tf-keras layer"), the graph kept the
    recurrent loop, and no .tflite was written (TensorListReserve)."""
    from edgekit.config import Quantization
    from edgekit.export.tflite import to_tflite

    keras = _tf.keras3()
    keras.utils.set_random_seed(0)
    steps = keras.Input((12, 6))
    hidden = keras.layers.Bidirectional(keras.layers.GRU(8))(keras.layers.Masking(0.0)(steps))
    model = keras.Model(steps, keras.layers.Dense(3, activation="softmax")(hidden))
    model.save(tmp_path / "masked.keras")
    x = np.random.default_rng(0).random((16, 12, 6)).astype(np.float32)
    x[:8, 7:] = 0.0  # padded sequences
    unmasked = keras.Model(steps, model.layers[-1](model.layers[-2](steps)))  # the same weights, no Masking
    assert np.abs(np.asarray(unmasked(x[:8])) - np.asarray(model(x[:8]))).max() > 1e-3  # the mask matters here
    loaded = load_model(tmp_path / "masked.keras", sample=x)
    assert loaded.model is not None and loaded.rebuild_max_abs_diff <= 1e-5, loaded.training_unavailable
    np.testing.assert_allclose(predict(loaded.model, x), np.asarray(model(x)), atol=1e-5)
    data, _ = to_tflite(loaded.model, quantization=Quantization.NONE, calibration=x)
    from device_agents import Model

    np.testing.assert_allclose(Model.load(data).predict(x), np.asarray(model(x)), atol=1e-4)


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


AUGMENTATION_ARGS = {
    "AugMix": {"value_range": (0, 255)}, "CutMix": {}, "MixUp": {}, "RandAugment": {"value_range": (0, 255)},
    "RandomBrightness": {"factor": 0.2}, "RandomColorDegeneration": {"factor": 0.5},
    "RandomColorJitter": {"value_range": (0, 255), "brightness_factor": 0.2}, "RandomContrast": {"factor": 0.2},
    "RandomElasticTransform": {}, "RandomErasing": {}, "RandomFlip": {}, "RandomGaussianBlur": {},
    "RandomGrayscale": {"factor": 1.0}, "RandomHue": {"factor": 0.2, "value_range": (0, 255)}, "RandomInvert": {},
    "RandomPerspective": {}, "RandomPosterization": {"factor": (1, 4), "value_range": (0, 255)},
    "RandomRotation": {"factor": 0.2}, "RandomSaturation": {"factor": 0.3}, "RandomSharpness": {"factor": 0.3},
    "RandomShear": {"x_factor": 0.3}, "RandomTranslation": {"height_factor": 0.2, "width_factor": 0.2},
    "RandomZoom": {"height_factor": 0.3},
}


def test_every_augmentation_layer_changes_images_while_training_and_passes_them_through_at_inference():
    from edgekit.loading.layers import AUGMENTATION_LAYERS

    assert set(AUGMENTATION_ARGS) == AUGMENTATION_LAYERS
    keras = _tf.keras3()
    x = np.random.default_rng(0).random((8, 12, 12, 3)).astype(np.float32) * 255
    for name, kwargs in AUGMENTATION_ARGS.items():
        layer = getattr(keras.layers, name)(**kwargs)
        np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x, err_msg=name)


def test_a_model_with_data_augmentation_loads_and_converts_without_its_random_ops(digits, tmp_path):
    """Keras 3 records `training=True` on an augmentation layer's node; the rebuild passed it on, so the tf-keras model
    flipped and rotated at inference, differed from the Keras 3 model and fell back to its graph, where Keras 3's
    export keeps the random ops: "op StatelessRandomGetKeyCounter (layer 'random_flip') has no TFLite builtin kernel".
    Now the rebuild is exact, and a graph (a layer tf-keras lacks: RandomGrayscale) is exported without them."""
    from edgekit.config import Quantization
    from edgekit.export.tflite import to_tflite

    keras = _tf.keras3()
    keras.utils.set_random_seed(0)
    x = digits.x[:16] * 255
    for extra in ([], [keras.layers.RandomGrayscale(factor=0.5)]):
        augment = keras.Sequential([keras.layers.RandomFlip(), *extra], name="data_augmentation")
        inputs = keras.Input((8, 8, 1))
        h = keras.layers.RandomRotation(0.2)(augment(inputs))
        h = keras.layers.Conv2D(4, 3, activation="relu")(keras.layers.Rescaling(1 / 255)(h))
        model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(h)))
        model.save(tmp_path / "aug.keras")
        loaded = load_model(tmp_path / "aug.keras")
        assert (loaded.model is None) == bool(extra), loaded.training_unavailable
        if not extra:
            assert loaded.rebuild_max_abs_diff <= 1e-5
        np.testing.assert_allclose(predict(loaded.source, x), np.asarray(model(x, training=False)), atol=1e-5)
        to_tflite(loaded.source, quantization=Quantization.NONE, calibration=x)  # raised ConversionError before


def test_a_keras3_rebuild_is_checked_on_the_users_samples(tmp_path):
    """keras.io's text classifier takes token ids of any length (input (None,)) through two Conv1D(7, strides=3): the
    rebuild was checked on 16 random ids, too short for the second convolution (its output was empty in Keras 3 and
    garbage in tf-keras), so it was refused and the model lost pruning, QAT and on-device training. compress, trainable
    and federated runs check it on the user's own samples now (random inputs where those do not fit)."""
    from edgekit import Dataset, compress

    keras = _tf.keras3()
    layers = keras.layers
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None,), dtype="int64")
    x = layers.Conv1D(8, 7, strides=3, activation="relu")(layers.Embedding(500, 8)(inputs))
    x = layers.GlobalMaxPooling1D()(layers.Conv1D(8, 7, strides=3, activation="relu")(x))
    keras.Model(inputs, layers.Dense(2, activation="softmax")(x)).save(tmp_path / "text.keras")
    tokens = np.random.default_rng(0).integers(1, 500, (120, 60))
    assert load_model(tmp_path / "text.keras", sample=tokens).rebuild_max_abs_diff <= 1e-5
    result = compress(tmp_path / "text.keras", Dataset(tokens, tokens[:, 0] % 2, "tokens"), None, progress=False,
                      config=CompressConfig(recipe=Recipe(quantize="none"), formats=("tflite",)))
    assert result.source["rebuild_max_abs_diff"] <= 1e-5  # rebuilt: a tf-keras model, which training paths need


def _subclassed(keras):
    class Sub(keras.Model):  # no layer graph: Keras knows its layers, not how call() wires them
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(4, 3, activation="relu")
            self.pool = keras.layers.GlobalAveragePooling2D()
            self.head = keras.layers.Dense(10, activation="softmax")

        def call(self, x):
            return self.head(self.pool(self.conv(x)))

    return Sub()


def test_subclassed_models_are_used_by_their_graph_or_refused_in_one_line(digits, tmp_path):
    """A tf-keras subclassed model saved as a SavedModel (model.save writes Keras metadata, but no layer graph) ended
    in a TypeError (exit 70); a Keras 3 subclassed model passed to the API was "expected a Keras model or a path".
    Both are used by their own graph now, for post-training paths; an in-memory tf-keras one is refused in one line."""
    x = digits.x[:16]
    tf_keras_model = _subclassed(_tf.keras())
    tf_keras_model(x)
    tf_keras_model.save(tmp_path / "sub")
    keras3_model = _subclassed(_tf.keras3())
    keras3_model(x)
    for loaded, model in ((load_model(tmp_path / "sub"), tf_keras_model), (load_model(keras3_model), keras3_model)):
        assert loaded.model is None and loaded.graph is not None and loaded.num_classes == 10
        assert loaded.outputs_probabilities is True and loaded.input_shape == (8, 8, 1)
        assert loaded.training_unavailable.startswith("a subclassed model (Sub) has no layer graph")
        np.testing.assert_allclose(loaded.source(x), np.asarray(model(x)), atol=1e-5)
    with pytest.raises(ModelLoadError, match=r"the model is a subclassed Sub with no layer graph .*; save it as a "
                                             r"SavedModel"):
        load_model(tf_keras_model)


def test_a_keras3_subclassed_model_loaded_from_its_file_is_called_before_its_export(digits, tmp_path):
    """keras.io's subclassing guide saves a called model to .keras; loading it builds it (weights in place) but does
    not call it, and ``model.export`` refuses a model never called: every command ended in "the Keras 3 model cannot
    be exported as a TensorFlow graph: The model provided has never called". It is called once now, on a sample or on
    zeros of its recorded input shape."""
    keras = _tf.keras3()

    @keras.saving.register_keras_serializable(package="edgekit_test_subclass")
    class Saved(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = keras.layers.Conv2D(4, 3, activation="relu")
            self.pool = keras.layers.GlobalAveragePooling2D()
            self.head = keras.layers.Dense(10, activation="softmax")

        def call(self, x):
            return self.head(self.pool(self.conv(x)))

    x = digits.x[:16]
    model = Saved()
    expected = np.asarray(model(x))
    model.save(tmp_path / "sub.keras")
    for sample in (x, None):
        loaded = load_model(tmp_path / "sub.keras", sample=sample)
        assert loaded.graph is not None and loaded.input_shape == (8, 8, 1) and loaded.num_classes == 10
        np.testing.assert_allclose(loaded.source(x), expected, atol=1e-5)
    with pytest.raises(ModelLoadError, match=r"the subclassed Saved has no one recorded input shape \(recorded: none: "
                                             r"never built or called\); call it once on a batch before saving it"):
        load_model(Saved())
    from edgekit import compress

    result = compress(tmp_path / "sub.keras", digits, tmp_path / "out", progress=False,
                      config=CompressConfig(recipe=Recipe(quantize="none"), formats=("tflite",)))
    assert result.selected.artifacts[0].top1_agreement == 100.0 and (tmp_path / "out" / "model.tflite").is_file()


def test_a_savedmodel_exported_for_one_batch_size_is_refused_in_one_line(tmp_path):
    """A SavedModel whose signature fixes the batch (PyTorch -> ONNX -> TensorFlow conversions often export batch 1)
    loaded, then every prediction on a batch of samples ended in an internal error (InvalidArgumentError, exit 70)."""
    from conftest import assert_one_line_error, run_cli

    tf = _tf.tf()
    module = tf.Module()
    module.w = tf.Variable(np.full((64, 10), 0.01, np.float32))
    module.serve = tf.function(lambda x: {"output_0": tf.nn.softmax(tf.reshape(x, [1, 64]) @ module.w)},
                               input_signature=[tf.TensorSpec([1, 8, 8, 1], tf.float32, name="x")])
    tf.saved_model.save(module, str(tmp_path / "batch1"), signatures={"serving_default": module.serve})
    with pytest.raises(ModelLoadError, match=r"takes a fixed batch of 1 \(input \(1, 8, 8, 1\)\); .* export the "
                                             r"model with a free batch dimension "
                                             r"\(tf.TensorSpec\(\[None, 8, 8, 1\]\)\)"):
        load_model(tmp_path / "batch1")
    proc = run_cli("compress", str(tmp_path / "batch1"), "--out", str(tmp_path / "out"), "--quiet")
    assert_one_line_error(proc, 2, "takes a fixed batch of 1")


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
    model = keras.Sequential([keras.Input((5, 4)), keras.layers.Dense(2)])  # a prediction per step
    model.save(tmp_path / "seq.keras")
    with pytest.raises(ModelLoadError, match=r"^the model's output has shape \(None, 5, 2\); edgekit handles "
                                             r"classifiers with output \(batch, classes\), or \(batch, 1\)"):
        load_model(tmp_path / "seq.keras")


def test_keras3_models_edgekit_cannot_serve_are_refused_before_a_rebuild(tmp_path):
    """A Keras 3 two-input model reached the tf-keras rebuild and stopped with Keras's own ValueError (an internal
    error, exit 70); a Keras 3 regression model was refused naming the temporary SavedModel of its graph (a one-output
    model is a binary classifier now, :mod:`edgekit.loading.binary`: one with a relu is refused naming it)."""
    keras3 = _tf.keras3()
    a, b = keras3.Input((6,)), keras3.Input((3,))
    two = keras3.Model([a, b], keras3.layers.Dense(3, activation="softmax")(keras3.layers.Concatenate()([a, b])))
    two.save(tmp_path / "two.keras")
    with pytest.raises(ModelLoadError, match=r"^the model has 2 inputs and 1 output; edgekit handles single-input"):
        load_model(tmp_path / "two.keras")
    regression = keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(1, activation="relu")])
    regression.save(tmp_path / "reg.keras")
    with pytest.raises(ModelLoadError, match=r"^the model's one output comes from layer 'dense\w*' with activation "
                                             r"relu; edgekit reads one output as a binary classifier's sigmoid"):
        load_model(tmp_path / "reg.keras")


PRUNE_ARGS = {"Conv1D": (2, 3), "Conv2D": (2, 3), "Dense": (2,), "Embedding": (10, 2), "LSTM": (2,), "GRU": (2,),
              "SimpleRNN": (2,), "SeparableConv2D": (2, 3)}


def test_the_prune_registry_claims_only_what_tfmot_prunes_and_skips_the_rest_with_a_reason():
    from tensorflow_model_optimization.python.core.sparsity.keras.prune_registry import PruneRegistry

    keras = _tf.keras()
    assert set(PRUNE_ARGS) == PRUNABLE
    for name in PRUNABLE:  # the registry's claim holds: tfmot prunes some weight of an instance of it
        cls = getattr(keras.layers, name)
        layer = cls(*PRUNE_ARGS[name])
        rnn = name in ("LSTM", "GRU", "SimpleRNN")
        weights = PruneRegistry._RNN_LAYERS if rnn else PruneRegistry._LAYERS_WEIGHTS_MAP[cls]  # noqa: SLF001
        assert PruneRegistry.supports(layer) and weights, name
        assert prune_skip_reason(layer, None) is None
    assert "prunes no weights of a DepthwiseConv2D" in prune_skip_reason(keras.layers.DepthwiseConv2D(3), None)
    assert "2:4 sparsity supports Conv2D, Dense only" in prune_skip_reason(keras.layers.Conv1D(2, 3), (2, 4))
    assert "prunes no weights of a MultiHeadAttention" in prune_skip_reason(keras.layers.MultiHeadAttention(2, 4), None)
    for name, attribute in SCALE_ATTRIBUTES.items():  # every scaled width is a constructor argument
        assert attribute in inspect.signature(getattr(keras.layers, name).__init__).parameters, name


def test_qat_annotates_what_tfmot_quantizes_and_says_why_for_the_rest():
    keras = _tf.keras()
    inp = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(4, 3)
    bn_after_conv, bn_alone = keras.layers.BatchNormalization(), keras.layers.BatchNormalization()
    keras.Model(inp, bn_alone(keras.layers.Rescaling(2.0)(bn_after_conv(conv(inp)))))
    assert qat_skip_reason(conv) is None and qat_skip_reason(bn_after_conv) is None  # tfmot folds it
    assert "does not quantize a BatchNormalization" in qat_skip_reason(bn_alone)
    assert "does not quantize a LayerNormalization" in qat_skip_reason(keras.layers.LayerNormalization())
    elu = keras.layers.Dense(3, activation="elu")  # annotated, but only its output: tfmot lacks elu inside a layer
    assert qat_skip_reason(elu) is None and "lacks the activation elu" in qat_output_only(elu)
    assert qat_output_only(keras.layers.Activation("relu6")) is None  # as a layer, tfmot quantizes relu6


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


def test_a_nested_backbone_is_inlined_so_training_techniques_reach_its_layers(tmp_path):
    """The transfer-learning pattern of keras.io: augmentation and a backbone as nested models. tfmot does not
    descend into nested models, so the rebuild inlines them (layer names and weights kept)."""
    from edgekit.optimize.prune import layer_sparsity

    keras = _tf.keras3()
    layers = keras.layers
    keras.utils.set_random_seed(0)
    b_in = keras.Input((8, 8, 1))
    b_out = layers.GlobalAveragePooling2D()(layers.BatchNormalization()(layers.Conv2D(8, 3, name="b_conv")(b_in)))
    backbone = keras.Model(b_in, b_out, name="backbone")
    augment = keras.Sequential([layers.RandomFlip("horizontal"), layers.RandomTranslation(0.1, 0.1)], name="aug")
    inp = keras.Input((8, 8, 1))
    out = layers.Dense(10, activation="softmax", name="head")(backbone(augment(inp), training=False))
    keras.Model(inp, out).save(tmp_path / "transfer.keras")
    loaded = load_model(tmp_path / "transfer.keras")
    assert not any(hasattr(layer, "layers") for layer in loaded.model.layers)  # one flat model
    assert {"b_conv", "head"} <= {layer.name for layer in loaded.model.layers} and loaded.rebuild_max_abs_diff <= 1e-5
    from edgekit._progress import Progress
    from edgekit.config import TrainingConfig
    from edgekit.loading.data import load_digits
    from edgekit.optimize.prune import prune

    pruned = prune(loaded.model, load_digits().take(np.arange(200)), sparsity=0.5, probabilities=True,
                   training=TrainingConfig(finetune_epochs=1, prune_min_steps=0), progress=Progress(enabled=False))
    assert layer_sparsity(pruned.model)["b_conv"] >= 0.45  # inside the former backbone


def test_a_model_saved_mid_way_through_tfmot_pruning_loads_stripped_and_a_qat_model_is_refused(tmp_path):
    """A user who pruned with tensorflow-model-optimization and saved the wrapped model got "Unknown layer:
    'PruneLowMagnitude'" (and, for a QAT model, "The added layer must be an instance of class Layer")."""
    keras, tfmot = _tf.keras(), _tf.tfmot()
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(
        0.5, begin_step=0, frequency=1))
    pruned.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).random((32, 16)).astype(np.float32)
    pruned.fit(x, np.arange(32) % 3, epochs=1, verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    want = np.asarray(tfmot.sparsity.keras.strip_pruning(pruned)(x))
    for name in ("pruned.h5", "pruned.keras"):
        pruned.save(tmp_path / name)
        loaded = load_model(tmp_path / name)
        assert [type(layer).__name__ for layer in loaded.model.layers] == ["Dense", "Dense"]
        kernel = loaded.model.layers[0].get_weights()[0]
        assert np.mean(kernel == 0) >= 0.5  # the sparsity is kept
        np.testing.assert_allclose(np.asarray(loaded.model(x)), want, atol=1e-6)
    qat = tfmot.quantization.keras.quantize_model(model)
    qat.save(tmp_path / "qat.h5")
    with pytest.raises(ModelLoadError, match=r"qat.h5 is a quantization-aware-training model \(tensorflow-model-"
                                             r"optimization's QuantizeLayer, QuantizeWrapperV2 layers\); give edgekit "
                                             r"the float model"):
        load_model(tmp_path / "qat.h5")
