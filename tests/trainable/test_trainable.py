"""The trainable TFLite artifact: builtins only, gradient parity with TensorFlow, learning in LiteRT."""

import json

import numpy as np
import pytest

from device_agents.errors import ArtifactError, TrainingError
from device_agents.training.trainer import Trainer
from edgekit import _tf
from edgekit.errors import InputError, UnsupportedLayerError
from edgekit.loading.data import Dataset
from edgekit.trainable.export import TrainableConfig, export_trainable
from edgekit.trainable.graph import HANDLERS, build_module, convert, reference_step


def parity_models():
    """Small models that together use every registered layer handler, with strides and paddings."""
    keras = _tf.keras()
    _tf.set_seed(7)
    L = keras.layers
    seq = keras.Sequential([
        keras.Input((9, 9, 2)),
        L.Conv2D(4, 3, strides=2, padding="same"), L.BatchNormalization(), L.ReLU(max_value=6.0),
        L.DepthwiseConv2D(3, strides=2, padding="same", activation="relu"),
        L.Conv2D(6, 2, padding="valid", activation="relu6"),
        L.Flatten(), L.Dropout(0.3), L.GaussianNoise(0.1), L.Dense(8, activation="relu"), L.GaussianDropout(0.2),
        L.Dense(5), L.Softmax()], name="seq")
    inp = keras.Input((8, 8, 1))
    x = L.Conv2D(4, 3, padding="same", use_bias=False)(inp)
    x = L.SpatialDropout2D(0.2)(L.Activation("relu")(x))
    y = L.DepthwiseConv2D(3, padding="same")(x)
    x = L.Add()([x, y])
    x = L.MaxPooling2D(pool_size=3, strides=2, padding="same")(x)
    x = L.AveragePooling2D(2)(x)
    x = L.MaxPooling2D(2, padding="valid")(L.Conv2D(4, 1)(L.ReLU()(x)))
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(3, activation="softmax")(x)
    func = keras.Model(inp, out, name="func")
    for model in (seq, func):  # non-trivial BN statistics
        for layer in model.layers:
            if isinstance(layer, L.BatchNormalization):
                layer.set_weights([np.random.default_rng(1).uniform(0.5, 1.5, w.shape).astype(np.float32)
                                   for w in layer.get_weights()])
    return [seq, func, mobile_model(), concat_model(), text_model()]


def text_model():
    """A token-id text classifier: Embedding (scatter-add gradient), Conv1D with stride, dilation and every padding,
    1D average and max pooling, global average and max pooling over time."""
    keras = _tf.keras()
    L = keras.layers
    _tf.set_seed(10)
    inp = keras.Input((12,), dtype="int32")
    x = L.Embedding(20, 6)(inp)
    x = L.Conv1D(6, 3, padding="causal", dilation_rate=2)(x)  # a temporal convolutional network's layers
    x = L.Conv1D(6, 2, padding="same", dilation_rate=3, activation="relu")(x)
    x = L.SpatialDropout1D(0.2)(L.Conv1D(5, 3, strides=2, padding="same", activation="relu")(x))
    a = L.GlobalAveragePooling1D()(x)
    x = L.MaxPooling1D(2, padding="same")(L.Conv1D(4, 2, padding="valid")(L.AveragePooling1D(2, strides=1)(x)))
    b = L.GlobalMaxPooling1D()(x)
    out = L.Dense(3, activation="softmax")(L.Concatenate()([a, b]))
    return keras.Model(inp, out, name="text")


def mobile_model():
    """The layers of keras.applications' mobile CNNs: data augmentation, preprocessing, zero padding, swish and
    hard-swish, squeeze-excite (GAP keepdims, sigmoid gate, Multiply), separable convs, LeakyReLU, Reshape."""
    from edgekit.loading.rebuild import register_activations

    keras = _tf.keras()
    L = keras.layers
    register_activations()
    _tf.set_seed(8)
    inp = keras.Input((9, 9, 2))
    x = inp
    for augment in (L.RandomFlip(), L.RandomRotation(0.2), L.RandomZoom(0.2), L.RandomTranslation(0.2, 0.2),
                    L.RandomContrast(0.2), L.RandomBrightness(0.2)):  # data augmentation: the identity at inference
        x = augment(x)
    norm = L.Normalization(mean=[0.2, -0.1], variance=[2.0, 0.5])
    x = norm(L.Rescaling(1.5, offset=-0.25)(x))
    x = L.ZeroPadding2D(((1, 0), (0, 2)))(x)
    x = L.Conv2D(6, 3, strides=2, activation="edgekit_hard_silu")(x)
    x = L.Activation("swish")(L.BatchNormalization()(x))
    gate = L.GlobalAveragePooling2D(keepdims=True)(x)
    gate = L.Conv2D(3, 1, activation="relu")(gate)
    gate = L.Conv2D(6, 1, activation="edgekit_hard_sigmoid")(gate)
    x = L.Multiply()([x, gate])
    x = L.SeparableConv2D(5, 3, padding="same", activation="sigmoid")(x)
    x = L.LeakyReLU(0.1)(L.Activation("tanh")(x))
    x = L.Activation("hard_sigmoid")(L.Activation("edgekit_silu")(x))
    x = L.Reshape((2, -1, 5))(L.Reshape((-1, 5))(x))
    out = L.Dense(3, activation="softmax")(L.GlobalMaxPooling2D()(x))
    return keras.Model(inp, out, name="mobile")


def concat_model():
    """A DenseNet-style block: concatenated features, global max pooling with keepdims."""
    keras = _tf.keras()
    L = keras.layers
    _tf.set_seed(9)
    inp = keras.Input((6, 6, 2))
    a = L.Conv2D(3, 3, padding="same", activation="relu")(inp)
    x = L.Concatenate()([inp, a])
    x = L.GlobalMaxPooling2D(keepdims=True)(L.Conv2D(4, 1)(x))
    out = L.Dense(3)(L.Flatten()(x))
    return keras.Model(inp, out, name="concat")


def test_every_registered_layer_has_a_parity_case():
    covered = {layer.__class__.__name__ for model in parity_models() for layer in model.layers}
    assert set(HANDLERS) <= covered, set(HANDLERS) - covered


@pytest.mark.parametrize("index", [0, 1, 2, 3, 4])
def test_one_train_step_matches_tensorflow(index):
    _assert_step_parity(parity_models()[index], index)


def test_layers_without_weights_before_every_trained_weight_run_forward_only():
    """Resizing and CenterCrop (keras.io's models resize inside the model) have no on-device gradient and were
    refused; no gradient flows back through a layer every trained weight comes after, so it runs forward only.
    After a trained weight, the same layer is still refused (its backward pass would need Flex ops)."""
    keras = _tf.keras()
    L = keras.layers
    _tf.set_seed(11)
    inp = keras.Input((10, 10, 2))
    x = L.Cropping2D(((1, 0), (0, 1)))(L.CenterCrop(9, 9)(L.Resizing(12, 12)(inp)))
    out = L.Dense(3, activation="softmax")(L.GlobalAveragePooling2D()(L.Conv2D(4, 3, activation="relu")(x)))
    _assert_step_parity(keras.Model(inp, out), 11)

    late = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3), L.Resizing(4, 4), L.Flatten(), L.Dense(3)])
    with pytest.raises(UnsupportedLayerError, match=r"^layer 'resizing\w*' \(Resizing\) cannot be trained on the "
                                                    r"device: no on-device gradient for this layer type, and trained "
                                                    r"weights come before it \(a layer without weights before every "
                                                    r"trained weight runs forward only\)"):
        build_module(late, batch_size=4)


def _no_noise(train):
    """Draws for a step with dropout off (any values: every unit is kept)."""
    return np.zeros(train.get_input_details()["dropout_noise"]["shape"], np.float32)


def _assert_step_parity(model, seed):
    """``model``'s trainable artifact converts with builtins only, infers as Keras does and takes the step
    TensorFlow takes."""
    from ai_edge_litert.interpreter import Interpreter

    rng = np.random.default_rng(seed)
    batch = 6
    x = rng.standard_normal((batch, *model.inputs[0].shape[1:])).astype(np.float32)
    if model.inputs[0].dtype.is_integer:  # token ids, some repeated within a batch (the scatter-add sums them)
        x = rng.integers(0, 20, (batch, *model.inputs[0].shape[1:])).astype(np.int32)
    y = rng.integers(0, model.outputs[0].shape[-1], batch).astype(np.int32)
    module, tensors, _ = build_module(model, batch_size=batch)
    data = convert(module)  # TFLITE_BUILTINS only: raises if any op needed Flex
    interp = Interpreter(model_content=data)
    ops = {op["op_name"] for op in interp._get_ops_details()}
    assert not any(op.startswith("Flex") or "CUSTOM" in op for op in ops), ops
    np.testing.assert_allclose(interp.get_signature_runner("infer")(x=x)["output"], model(x, training=False).numpy(),
                               atol=1e-5)
    train = interp.get_signature_runner("train")
    train(x=x, y=y, sample_weight=np.ones(batch, np.float32), learning_rate=np.float32(0.1), mu=np.float32(0.0),
          momentum=np.float32(0.0), dropout=np.float32(0.0), dropout_noise=_no_noise(train))
    got = interp.get_signature_runner("get_weights")()
    want = reference_step(model, x, y, learning_rate=0.1)
    assert set(want) == set(got) == {t.name for t in tensors}
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)


@pytest.mark.parametrize("noise_shape", [None, (None, 1, 1, 4), "spatial"], ids=["units", "channels", "spatial"])
def test_dropout_trains_in_keras_training_mode_with_masks_from_the_steps_draws(noise_shape):
    """With its dropout input 1, a train step zeroes each unit (or, with a noise shape or SpatialDropout2D, each
    channel) whose draw in ``dropout_noise`` is under ``rate`` and scales the rest by 1 / (1 - rate): a Dense
    kernel after the dropout moves only in the rows of kept units, by exactly TensorFlow's step on the masked,
    rescaled input. The same draws give the same step (a seeded device repeats its training); infer passes the
    values through."""
    from ai_edge_litert.interpreter import Interpreter

    keras = _tf.keras()
    L = keras.layers
    _tf.set_seed(3)
    inp = keras.Input((5, 5, 4))
    dropout = L.SpatialDropout2D(0.5) if noise_shape == "spatial" else L.Dropout(0.5, noise_shape=noise_shape)
    model = keras.Model(inp, L.Dense(3, name="head")(L.Flatten()(dropout(inp))))
    module, _, _ = build_module(model, batch_size=1)
    data = convert(module)
    interp = Interpreter(model_content=data)
    train, get, put = (interp.get_signature_runner(s) for s in ("train", "get_weights", "set_weights"))
    size = 100 if noise_shape is None else 4  # one draw per unit, or per channel
    assert train.get_input_details()["dropout_noise"]["shape"].tolist() == [size]
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.5, (1, 5, 5, 4)).astype(np.float32)  # no zero input: a kept unit always moves
    y = np.array([1], np.int32)
    start = get()
    np.testing.assert_allclose(interp.get_signature_runner("infer")(x=x)["output"], model(x, training=False).numpy(),
                               atol=1e-5)

    def step(noise, switch=1.0):
        put(**start)
        train(x=x, y=y, sample_weight=np.ones(1, np.float32), learning_rate=np.float32(0.1), mu=np.float32(0.0),
              momentum=np.float32(0.0), dropout=np.float32(switch), dropout_noise=noise)
        return get()["head_kernel"]

    for _ in range(5):
        noise = rng.random(size, dtype=np.float32)
        kept = np.broadcast_to((noise >= 0.5).reshape((1, 5, 5, 4) if noise_shape is None else (1, 1, 1, 4)),
                               x.shape)
        kernel = step(noise)
        moved = np.any(kernel != start["head_kernel"], axis=1)  # one row per flattened unit
        np.testing.assert_array_equal(moved, kept.reshape(-1))
        want = reference_step(model, x * kept * 2.0, y, learning_rate=0.1)
        np.testing.assert_allclose(kernel, want["head_kernel"], atol=1e-5)
        np.testing.assert_array_equal(step(noise), kernel)  # the same draws: the same step
    off = step(np.zeros(size, np.float32), switch=0.0)  # off: every unit, unscaled
    np.testing.assert_allclose(off, reference_step(model, x, y, learning_rate=0.1)["head_kernel"], atol=1e-5)


@pytest.mark.parametrize("kind", ["GaussianNoise", "GaussianDropout"])
def test_gaussian_noise_layers_train_as_in_keras_training_mode_from_the_steps_draws(kind):
    """GaussianNoise adds, GaussianDropout multiplies by, normal noise in Keras's training mode (these layers were
    refused at export). Each normal value comes from two of the step's uniform draws (Box-Muller): the step is
    TensorFlow's step on the input with that noise; with ``dropout`` 0 there is none."""
    from ai_edge_litert.interpreter import Interpreter

    keras = _tf.keras()
    L = keras.layers
    _tf.set_seed(4)
    inp = keras.Input((6,))
    noisy = L.GaussianNoise(0.5) if kind == "GaussianNoise" else L.GaussianDropout(0.3)
    model = keras.Model(inp, L.Dense(3, activation="softmax", name="head")(noisy(inp)))
    module, _, _ = build_module(model, batch_size=2)
    interp = Interpreter(model_content=convert(module))
    train, get, put = (interp.get_signature_runner(s) for s in ("train", "get_weights", "set_weights"))
    assert train.get_input_details()["dropout_noise"]["shape"].tolist() == [2 * 6 * 2]
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((2, 6)).astype(np.float32), np.array([0, 2], np.int32)
    start = get()
    draws = rng.random(24, dtype=np.float32)
    u = draws.reshape(2, 6, 2).astype(np.float64)
    normal = np.sqrt(-2 * np.log(1 - u[..., 0])) * np.cos(2 * np.pi * u[..., 1])
    noisy_x = x + 0.5 * normal if kind == "GaussianNoise" else x * (1 + np.sqrt(0.3 / 0.7) * normal)
    for switch, seen in ((1.0, noisy_x), (0.0, x)):
        put(**start)
        train(x=x, y=y, sample_weight=np.ones(2, np.float32), learning_rate=np.float32(0.1), mu=np.float32(0.0),
              momentum=np.float32(0.0), dropout=np.float32(switch), dropout_noise=draws)
        want = reference_step(model, seen.astype(np.float32), y, learning_rate=0.1)
        np.testing.assert_allclose(get()["head_kernel"], want["head_kernel"], atol=1e-5)
    assert not np.allclose(noisy_x, x, atol=1e-2)  # the noise is there to see


def test_a_seeded_fit_repeats_exactly_and_another_seed_draws_other_dropout_masks(tmp_path):
    """A federated simulation did not repeat: each interpreter seeded its dropout op at random, so one seed gave
    another round 1 (loss 0.576 and 0.640 in two runs). The device draws the masks from the fit's seed now."""
    keras = _tf.keras()
    L = keras.layers
    _tf.set_seed(1)
    inp = keras.Input((6,))
    model = keras.Model(inp, L.Dense(3, activation="softmax")(L.Dropout(0.5)(L.Dense(16, activation="relu")(inp))))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 6)).astype(np.float32), rng.integers(0, 3, 40)
    export_trainable(model, tmp_path / "tr", data=Dataset(x, y, "t"), progress=False,
                     config=TrainableConfig(batch_size=8))
    trainer = Trainer.load(tmp_path / "tr")
    assert trainer.noise_size == 8 * 16
    start = trainer.get_weights()

    def fit(seed):
        trainer.set_weights(start)
        trainer.fit(x, y, epochs=2, learning_rate=0.1, seed=seed)
        return trainer.get_weights()

    first, again, other = fit(5), fit(5), fit(6)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert any(not np.array_equal(first[k], other[k]) for k in first)


def test_sample_weight_zero_ignores_padding_and_mu_pulls_to_anchor():
    model = parity_models()[1]
    module, _, _ = build_module(model, batch_size=4)
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=convert(module))
    train, get = interp.get_signature_runner("train"), interp.get_signature_runner("get_weights")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 8, 1)).astype(np.float32)
    y = np.array([0, 1, 2, 0], np.int32)
    start = get()
    train(x=x, y=y, sample_weight=np.array([1, 1, 0, 0], np.float32), learning_rate=np.float32(0.1),
          mu=np.float32(0.0), momentum=np.float32(0.0), dropout=np.float32(0.0), dropout_noise=_no_noise(train))
    padded = get()
    want = reference_step(model, x[:2], y[:2], learning_rate=0.1)
    for name in want:
        np.testing.assert_allclose(padded[name], want[name], atol=1e-5)
    # with a large proximal term, a step moves the weights back toward the anchor (the start)
    before = {k: np.linalg.norm(padded[k] - start[k]) for k in start}
    train(x=x, y=y, sample_weight=np.zeros(4, np.float32), learning_rate=np.float32(0.5), mu=np.float32(1.0),
          momentum=np.float32(0.0), dropout=np.float32(0.0), dropout_noise=_no_noise(train))
    after = get()
    assert all(np.linalg.norm(after[k] - start[k]) <= before[k] * 0.51 + 1e-7 for k in start)


def test_a_perfect_prediction_scores_a_loss_of_zero_not_minus_zero(tmp_path):
    """A model certain and right on every sample printed its federated rounds' loss as -0.0000 (-log 1 = -0.0)."""
    keras = _tf.keras()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    model.set_weights([np.array([[100.0, -100.0], [-100.0, 100.0]], np.float32), np.zeros(2, np.float32)])
    export_trainable(model, tmp_path / "tr", progress=False, config=TrainableConfig(batch_size=2))
    loss, accuracy = Trainer.load(tmp_path / "tr").evaluate(np.eye(2, dtype=np.float32), np.array([0, 1]))
    assert accuracy == 100.0 and f"{loss:.4f}" == "0.0000", loss


def test_an_export_without_data_says_nothing_of_the_data_range(tmp_path):
    """Without data the export verifies on random inputs in [0, 1); a model with Rescaling(1/127.5, -1) got "the
    model's own Rescaling layer maps the data (0.001 to 0.999) into [-1.000, -0.992]": data the user never gave."""
    keras = _tf.keras()
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Rescaling(1 / 127.5, offset=-1.0),
                              keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    result = export_trainable(model, tmp_path / "tr", progress=False, config=TrainableConfig(batch_size=2))
    assert not [w for w in result.warnings if "Rescaling" in w], result.warnings
    np.savez(tmp_path / "pixels.npz", x=np.random.default_rng(0).random((32, 4, 4, 1), np.float32),
             y=np.arange(32) % 3)
    given = export_trainable(model, tmp_path / "tr2", data=tmp_path / "pixels.npz", progress=False,
                             config=TrainableConfig(batch_size=2))
    assert [w for w in given.warnings if "own Rescaling layer" in w and "into [-1.000, -0.99" in w], given.warnings


def test_momentum_matches_heavy_ball_sgd_on_tensorflow_gradients_and_set_weights_restarts_it(tmp_path):
    """Three steps at momentum 0.9 in LiteRT give the weights of v = 0.9 v + g, w -= lr v computed on
    TensorFlow's own gradients; after set_weights the first step is plain SGD again (no stale velocity)."""
    model = parity_models()[0]
    export_trainable(model, tmp_path / "tr", progress=False, config=TrainableConfig(batch_size=4))
    trainer = Trainer.load(tmp_path / "tr")
    assert trainer.has_momentum
    rng = np.random.default_rng(3)
    batches = [(rng.standard_normal((4, 9, 9, 2)).astype(np.float32), rng.integers(0, 5, 4).astype(np.int32))
               for _ in range(3)]
    start = trainer.get_weights()
    w, v = dict(start), {k: np.zeros_like(a) for k, a in start.items()}
    for x, y in batches:
        trainer.train_step(x, y, learning_rate=0.05, momentum=0.9, dropout=0.0)
        _assign(model, w)
        g = {k: w[k] - a for k, a in reference_step(model, x, y, learning_rate=1.0).items()}
        v = {k: 0.9 * v[k] + g[k] for k in w}
        w = {k: w[k] - 0.05 * v[k] for k in w}
    got = trainer.get_weights()
    moved = max(float(np.max(np.abs(got[k] - start[k]))) for k in w)
    for k in w:
        np.testing.assert_allclose(got[k], w[k], atol=2e-5 * max(1.0, moved), err_msg=k)
    trainer.set_weights(got)  # a new round: the velocity (and the stepped flag) start again
    trainer.train_step(*batches[0], learning_rate=0.05, momentum=0.9, dropout=0.0)
    _assign(model, got)
    want = reference_step(model, *batches[0], learning_rate=0.05)
    for k, a in trainer.get_weights().items():
        np.testing.assert_allclose(a, want[k], atol=1e-5, err_msg=k)


def test_a_step_that_diverged_to_nan_does_not_poison_the_steps_after_set_weights(tmp_path):
    """A device whose first try diverged to NaN restores its weights and retries at a lower rate (fit_safely). The
    velocity of that NaN step was masked by multiplying it by zero, and 0 * NaN is NaN: every retry, and every later
    round in that process, trained to NaN (a 100-client run lost devices for good: "diverged at every learning rate
    from 0.1 to 0.00625: the loss rose from 0.201 to nan")."""
    model = parity_models()[0]
    export_trainable(model, tmp_path / "tr", progress=False, config=TrainableConfig(batch_size=4))
    trainer = Trainer.load(tmp_path / "tr")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 9, 9, 2)).astype(np.float32), rng.integers(0, 5, 4).astype(np.int32)
    start = trainer.get_weights()
    with pytest.raises(TrainingError, match="diverged at every learning rate"):
        trainer.fit_safely(x, y, epochs=2, learning_rate=1e30)
    assert all(np.array_equal(a, start[k]) for k, a in trainer.get_weights().items())  # put back
    fit = trainer.fit_safely(x, y, epochs=2, learning_rate=0.01)
    assert fit.learning_rate == 0.01 and all(np.isfinite(fit.losses)) and np.isfinite(fit.loss_after)
    assert all(np.isfinite(a).all() for a in trainer.get_weights().values())
    trainer.set_weights(start)
    assert np.isfinite(trainer.train_step(x, y, learning_rate=0.01, momentum=0.9))


def test_batchnorm_trains_gamma_and_beta_with_its_statistics_frozen_unless_keras_froze_it(tmp_path):
    """A device trains BatchNormalization's gamma and beta (its statistics stay the model's); a layer frozen in
    Keras stays constant. Their gradients are in the parity tests (the "seq" model)."""
    keras = _tf.keras()
    L = keras.layers
    _tf.set_seed(3)
    frozen = L.BatchNormalization(name="frozen_bn")
    model = keras.Sequential([keras.Input((6, 6, 1)), L.Conv2D(3, 3, use_bias=False), L.BatchNormalization(name="bn"),
                              L.ReLU(), L.Conv2D(3, 3), frozen, L.Flatten(), L.Dense(4, activation="softmax")])
    frozen.trainable = False
    export_trainable(model, tmp_path / "tr", progress=False, config=TrainableConfig(batch_size=4))
    names = {t["name"] for t in json.loads((tmp_path / "tr" / "manifest.json").read_text())["trainable"]["tensors"]}
    assert {"bn_gamma", "bn_beta"} <= names and not any(n.startswith("frozen_bn") for n in names), names
    trainer = Trainer.load(tmp_path / "tr")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 6, 6, 1)).astype(np.float32), rng.integers(0, 4, 4).astype(np.int32)
    before = trainer.get_weights()
    trainer.train_step(x, y, learning_rate=0.5)
    after = trainer.get_weights()
    assert not np.allclose(after["bn_beta"], before["bn_beta"]) and not np.allclose(after["bn_gamma"],
                                                                                    before["bn_gamma"])
    trainer.set_weights(before)  # the model's own statistics, not the batch's: infer is Keras's inference mode
    np.testing.assert_allclose(trainer.predict(x), model(x, training=False).numpy(), atol=1e-5)


def test_momentum_or_dropout_out_of_range_or_momentum_on_an_artifact_without_it_is_refused(tmp_path):
    from device_agents.errors import InputMismatchError, TrainingError

    model = parity_models()[0]
    export_trainable(model, tmp_path / "tr", progress=False, config=TrainableConfig(batch_size=4))
    trainer = Trainer.load(tmp_path / "tr")
    x, y = np.zeros((4, 9, 9, 2), np.float32), np.zeros(4, np.int32)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(InputMismatchError, match="momentum must be in"):
            trainer.train_step(x, y, learning_rate=0.1, momentum=bad)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(InputMismatchError, match="dropout must be in"):
            trainer.train_step(x, y, learning_rate=0.1, dropout=bad)
    manifest = json.loads((tmp_path / "tr" / "manifest.json").read_text())
    assert trainer.has_dropout and "dropout" in manifest["trainable"]["signatures"]["train"]
    for name in ("momentum", "dropout"):  # an artifact exported before these inputs
        manifest["trainable"]["signatures"]["train"].remove(name)
    old = Trainer.from_bytes((tmp_path / "tr" / "trainable.tflite").read_bytes(), manifest)
    assert not old.has_momentum and not old.has_dropout
    with pytest.raises(TrainingError, match="has no momentum input .* re-export it to train with momentum 0.5"):
        old.fit(np.zeros((4, 9, 9, 2)), np.zeros(4), momentum=0.5)
    newer = json.loads((tmp_path / "tr" / "manifest.json").read_text())
    newer["trainable"]["signatures"]["train"].append("temperature")  # an artifact of a newer edgekit
    with pytest.raises(ArtifactError, match="train step takes temperature, which this agent does not know: "
                                            "update the device agent"):
        Trainer.from_bytes((tmp_path / "tr" / "trainable.tflite").read_bytes(), newer)


def _assign(model, weights):
    """Put ``weights`` (by tensor name) into the Keras ``model``."""
    from edgekit.trainable.contract import weight_key

    for layer in model.layers:
        for var in layer.trainable_weights:
            if weight_key(layer, var) in weights:
                var.assign(weights[weight_key(layer, var)])


@pytest.fixture(scope="module")
def half_trained(digits, tmp_path_factory):
    """The test CNN trained one epoch: room left for on-device training to improve it."""
    from conftest import tiny_cnn

    from edgekit.loading import zoo

    model = zoo.train(tiny_cnn(), digits.take(np.arange(300)), epochs=1, learning_rate=1e-3)
    path = tmp_path_factory.mktemp("half") / "half.keras"
    model.save(path)
    return path


def test_export_cli_and_training_in_litert_matches_tensorflow(half_trained, digits, tmp_path):
    from conftest import run_cli

    from edgekit.loading.data import split

    out = tmp_path / "tr"
    proc = run_cli("trainable", str(half_trained), "--out", str(out), "--batch-size", "16", "--quiet")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "trainable" and manifest["trainable"]["batch_size"] == 16
    assert {t["name"] for t in manifest["trainable"]["tensors"]} >= {"conv2d_kernel", "dense_1_kernel"}
    assert manifest["verification"]["train_step_max_abs_diff"] <= 1e-5
    trainer = Trainer.load(out)
    parts = split(digits, seed=0)
    keras_model = __import__("edgekit").load_model(half_trained).model
    start_acc = trainer.evaluate(parts.evaluation.x, parts.evaluation.y)[1]
    source_acc = float(np.mean(keras_model(parts.evaluation.x).numpy().argmax(1) == parts.evaluation.y) * 100)
    assert start_acc == pytest.approx(source_acc, abs=0.01)  # initialised with the source weights
    x, y = parts.finetune.x[:480], parts.finetune.y[:480]
    trainer.fit(x, y, epochs=3, learning_rate=0.05, seed=0)
    lite_acc = trainer.evaluate(parts.evaluation.x, parts.evaluation.y)[1]
    # the same steps (same order, same batches) in TensorFlow
    rng = np.random.default_rng(0)
    tf = _tf.tf()
    for _ in range(3):
        order = rng.permutation(len(x))
        for s in range(0, len(x), 16):
            idx = order[s:s + 16]
            new = reference_step(keras_model, x[idx], y[idx].astype(np.int32), learning_rate=0.05)
            for layer in keras_model.layers:
                for w in layer.trainable_weights:
                    key = f"{layer.name}_{w.name.split('/')[-1].split(':')[0]}"
                    if key in new:
                        w.assign(new[key])
    del tf
    tf_acc = float(np.mean(keras_model(parts.evaluation.x).numpy().argmax(1) == parts.evaluation.y) * 100)
    assert lite_acc > start_acc + 5
    assert lite_acc == pytest.approx(tf_acc, abs=1.0)


def test_local_training_halves_a_learning_rate_that_diverges_and_refuses_when_every_rate_does(cnn_path, digits,
                                                                                                 tmp_path):
    """Found in the README's fleet recipe: the converged test CNN (frozen BatchNormalization), SGD at 0.1 with
    batches of 8 on a device's 90 samples, went from 100% to 9-43% for 5 of 8 batch orders, so every device's
    update was garbage and the server refused the round. A device now halves the rate when its own loss rises."""
    from device_agents.errors import TrainingError
    from edgekit import TrainableConfig, export_trainable

    export_trainable(cnn_path, tmp_path / "tr", data="digits", progress=False, config=TrainableConfig(batch_size=8))
    x, y = digits.x[1400:1490], digits.y[1400:1490]
    plain, safe = [], []
    for seed in range(4):
        trainer = Trainer.load(tmp_path / "tr")
        trainer.fit(x, y, epochs=1, learning_rate=0.2, seed=seed)
        plain.append(trainer.evaluate(x, y)[1])
        trainer = Trainer.load(tmp_path / "tr")
        local = trainer.fit_safely(x, y, epochs=1, learning_rate=0.2, seed=seed)
        assert not local.diverged and local.accuracy == trainer.evaluate(x, y)[1]
        assert local.loss_after <= 1.5 * local.loss_before + 0.1 and local.learning_rate in (0.2, 0.1, 0.05, 0.025,
                                                                                             0.0125)
        safe.append(local)
    assert min(plain) < 50, plain  # the plain rate diverges here
    assert all(local.accuracy >= 90 for local in safe) and any(local.learning_rate < 0.2 for local in safe)
    trainer = Trainer.load(tmp_path / "tr")
    start = trainer.get_weights()
    with pytest.raises(TrainingError, match=r"diverged at every learning rate from 1e\+06 to 62500: the loss"):
        trainer.fit_safely(x, y, learning_rate=1e6)
    assert all(np.array_equal(value, trainer.get_weights()[name]) for name, value in start.items())


def test_a_device_reads_one_hot_labels_and_refuses_what_the_server_refuses(half_trained, digits, tmp_path):
    """A device's private data is the user's file as much as the server's is: one-hot labels ended in an IndexError
    inside the trainer, an (n, 1) column in "XNNPack delegate failed to reshape", a NaN sample trained to a NaN loss
    and was reported as a finished round, and labels 1.7 were truncated to 1. The device reads labels as the server
    does (edgekit.loading.data and the device share device_agents.training.samples)."""
    from device_agents.errors import InputMismatchError
    from edgekit import export_trainable

    export_trainable(half_trained, tmp_path / "tr", data="digits", progress=False)
    x, y = digits.x[:64], digits.y[:64]
    weights = {}
    for name, labels in (("ids", y), ("one-hot", np.eye(10)[y]), ("column", y[:, None].astype(np.float64))):
        trainer = Trainer.load(tmp_path / "tr")
        trainer.fit(x, labels, epochs=1, seed=0)
        weights[name] = trainer.get_weights()
        assert trainer.evaluate(x, labels) == trainer.evaluate(x, y)
    assert all(np.array_equal(weights["ids"][k], weights[name][k]) for name in weights for k in weights["ids"])
    nan = x.copy()
    nan[5, 1, 1, 0] = np.nan
    trainer = Trainer.load(tmp_path / "tr")
    start = trainer.get_weights()
    for bad_x, bad_y, message in (
            (nan, y, r"training data: x holds 1 NaN/inf values \(first in sample 5\)"),
            (x, y + 0.7, "training data: y holds non-integer values"),
            (x, y + 10, r"labels must be in 0..9"),
            (x, y[:10], "training data: x has 64 samples but y has 10")):
        with pytest.raises(InputMismatchError, match=message):
            trainer.fit_safely(bad_x, bad_y, epochs=1)
    with pytest.raises(InputMismatchError, match=r"evaluation data: y has shape \(64, 2, 5\)"):
        trainer.evaluate(x, np.zeros((64, 2, 5)))
    assert all(np.array_equal(value, trainer.get_weights()[name]) for name, value in start.items())


def _uint8_cnn(digits):
    keras = _tf.keras3()
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), dtype="uint8")  # a camera's frames, as many edge models take them
    x = keras.layers.Conv2D(8, 3, activation="relu")(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(x)))
    model.compile("adam", "sparse_categorical_crossentropy")
    pixels = np.round(digits.x * 255).astype(np.uint8)
    model.fit(pixels[:1000], digits.y[:1000], epochs=3, verbose=0)
    return model, pixels


@pytest.mark.parametrize("head_only", [False, True])
def test_a_model_taking_uint8_pixels_trains_on_the_device(digits, tmp_path, head_only):
    """A model whose input is uint8 (a camera's frames, cast to float by its Rescaling) was refused: "on-device
    training takes float32, int32 or int64 inputs; this model takes uint8". It trains as its float twin (same weights;
    float32 holds every uint8 exactly): the device feeds its uint8 frames."""
    from edgekit import Dataset, TrainableConfig, export_trainable

    model, pixels = _uint8_cnn(digits)
    model.save(tmp_path / "u8.keras")
    data = Dataset(pixels, digits.y, "pixels")
    result = export_trainable(tmp_path / "u8.keras", tmp_path / "tr", data=data, progress=False,
                              config=TrainableConfig(head_only=head_only))
    assert result.manifest["trainable"]["input"] == {"shape": [None, 8, 8, 1], "dtype": "float32"}
    trainer = Trainer.load(tmp_path / "tr")
    np.testing.assert_allclose(trainer.predict(pixels[1000:1100]), model.predict(pixels[1000:1100], verbose=0),
                               atol=1e-5 if not head_only else 0.05)
    before = trainer.get_weights()
    local = trainer.fit_safely(pixels[1000:1300], digits.y[1000:1300], epochs=1)
    assert local.accuracy > 80 and any(not np.array_equal(v, trainer.get_weights()[k]) for k, v in before.items())


def test_head_only_mode_has_int8_backbone_and_trains_the_head(half_trained, tmp_path):
    with pytest.raises(InputError, match="head-only export calibrates its int8 backbone on real samples"):
        export_trainable(half_trained, None, config=TrainableConfig(head_only=True), progress=False)
    result = export_trainable(half_trained, tmp_path / "head", config=TrainableConfig(head_only=True, batch_size=8),
                              data="digits", progress=False)
    roles = {a["role"]: a for a in result.manifest["artifacts"]}
    assert set(roles) == {"trainable", "backbone"} and roles["backbone"]["quantization"] == "int8"
    tensors = {t["name"] for t in result.manifest["trainable"]["tensors"]}
    assert tensors == {"dense_kernel", "dense_bias", "dense_1_kernel", "dense_1_bias"}  # the head only
    from device_agents import Model

    backbone = Model.load(result.files["backbone.tflite"])
    assert backbone.inputs[0].dtype == "float32" and "QUANTIZE" in __import__(
        "edgekit.export.tflite", fromlist=["x"]).tflite_ops(result.files["backbone.tflite"])
    assert result.manifest["verification"]["train_step_max_abs_diff"] <= 1e-5


@pytest.fixture(scope="module")
def squeezed(digits, tmp_path_factory):
    """A CNN whose own Rescaling (built for 0-255) is fed 0-1 pixels, as users feed Keras 3 MobileNetV3Small, and
    its training data: (model path, .npz path)."""
    keras = _tf.keras()
    layers = keras.layers
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        layers.Input((8, 8, 1)), layers.Rescaling(1 / 127.5, -1, name="rescale"),
        layers.Conv2D(16, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
        layers.Conv2D(32, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
        layers.GlobalAveragePooling2D(), layers.Dense(10, activation="softmax")])
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(digits.x[:1200], digits.y[:1200], epochs=10, batch_size=32, verbose=0)
    for layer in model.layers:  # batch statistics of so narrow a signal: the moving ones lag far behind
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = 0.0
    model(digits.x[:1200], training=True)
    folder = tmp_path_factory.mktemp("squeezed")
    model.save(folder / "squeezed.h5")
    np.savez(folder / "d.npz", x=digits.x[:1200], y=digits.y[:1200])
    return folder / "squeezed.h5", folder / "d.npz"


def test_a_head_only_backbone_int8_breaks_computes_in_float_with_int8_weights(squeezed, digits, tmp_path):
    """The squeezed CNN's full int8 backbone changed the prediction on most samples and the export only said so
    (the head trained on broken features). The dynamic-range backbone (int8 weights, float activations) is now
    kept, and both figures are said."""
    import re

    result = export_trainable(squeezed[0], tmp_path / "head", data=squeezed[1], progress=False,
                              config=TrainableConfig(head_only=True, batch_size=16))
    check = result.manifest["verification"]
    kept = {a["file"]: a["quantization"] for a in result.manifest["artifacts"]}
    assert kept == {"backbone.tflite": "dynamic", "trainable.tflite": "none"}
    assert check["infer_top1_agreement"] >= 95 and check["train_step_max_relative_l2"] <= 1e-2
    said = [w for w in result.warnings if w.startswith("the int8 backbone")]
    found = re.fullmatch(r"the int8 backbone leaves the model's top-1 prediction unchanged on ([\d.]+)% of the "
                         r"samples \(under 95%\); the backbone keeps int8 weights and computes in float \(dynamic "
                         r"range\), which leaves it unchanged on ([\d.]+)%", said[0]) if len(said) == 1 else None
    assert found and float(found[1]) < 90 and float(found[2]) == round(check["infer_top1_agreement"], 1), said
    assert any("Rescaling" in w for w in result.warnings)  # the cause, with its numbers
    written = json.loads((tmp_path / "head" / "manifest.json").read_text())
    assert written == json.loads(json.dumps(result.manifest))
    trainer = Trainer.load(tmp_path / "head")  # the files the manifest names, hash-checked
    before, _ = trainer.evaluate(digits.x[1200:1500], digits.y[1200:1500])
    trainer.fit(digits.x[:1200], digits.y[:1200], epochs=2, learning_rate=0.05)
    after, _ = trainer.evaluate(digits.x[1200:1500], digits.y[1200:1500])
    assert after <= before


def test_a_backbone_the_converter_cannot_make_dynamic_stays_int8_and_is_said(squeezed, monkeypatch):
    """Where the dynamic-range conversion fails, the export is not lost: the int8 backbone stays, with the
    warning that it changes the predictions."""
    from edgekit.config import Quantization
    from edgekit.errors import ConversionError
    from edgekit.export import tflite

    convert = tflite.to_tflite

    def no_dynamic(model, *, quantization, **kwargs):
        if quantization is Quantization.DYNAMIC:
            raise ConversionError("TFLite dynamic conversion failed: an op with no hybrid kernel")
        return convert(model, quantization=quantization, **kwargs)

    monkeypatch.setattr(tflite, "to_tflite", no_dynamic)
    result = export_trainable(squeezed[0], None, data=squeezed[1], progress=False,
                              config=TrainableConfig(head_only=True, batch_size=16))
    kept = {a["file"]: a["quantization"] for a in result.manifest["artifacts"]}
    agreement = result.manifest["verification"]["infer_top1_agreement"]
    assert kept["backbone.tflite"] == "int8" and agreement < 90
    assert f"the int8 backbone leaves the model's top-1 prediction unchanged on {agreement:.1f}% of the samples " \
           "(under 95%): the head trains on features quantization changed; a full (not head-only) export keeps the " \
           "model float" in result.warnings


def test_untrainable_layers_and_bad_options_are_refused(tmp_path, text_model_path):
    from conftest import assert_one_line_error, run_cli

    keras = _tf.keras()
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, dilation_rate=2),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    model.save(tmp_path / "dil.keras")
    with pytest.raises(UnsupportedLayerError, match="layer 'conv2d.*' \\(Conv2D\\) cannot be trained on the device"):
        export_trainable(tmp_path / "dil.keras", None, progress=False)
    with pytest.raises(UnsupportedLayerError, match=r"\(LSTM\) cannot be trained on the device"):
        export_trainable(text_model_path, None, progress=False)  # Embedding and Conv1D train; the LSTM does not
    with pytest.raises(InputError, match="batch size must be between 1 and 4096"):
        TrainableConfig(batch_size=0)
    # the CLI says what still trains on the device: the head, on the frozen rest's features
    proc = run_cli("trainable", str(tmp_path / "dil.keras"), "--out", str(tmp_path / "t"), "--quiet")
    assert_one_line_error(proc, 2, "(Conv2D) cannot be trained on the device",
                          "; --head-only trains the head alone on the frozen rest's features")
    assert not (tmp_path / "t").exists()


def test_a_model_whose_input_is_not_8x8_exports_without_data(tmp_path):
    """Verification used the digits unless --data was given: a 16x16x3 model failed. Synthetic inputs now."""
    from conftest import run_cli

    keras = _tf.keras()
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(5, activation="softmax")])
    model.save(tmp_path / "m16.keras")
    proc = run_cli("trainable", str(tmp_path / "m16.keras"), "--out", str(tmp_path / "t"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "one train step vs TensorFlow max abs diff" in proc.stdout
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["trainable"]["input"]["shape"] == [None, 16, 16, 3]


def test_head_only_training_of_a_model_tf_keras_cannot_rebuild(digits, tmp_path):
    """RMSNormalization has no tf-keras twin: the Keras 3 backbone converts from its own graph, the Dense head
    is rebuilt alone, verified against the whole model and trained in LiteRT."""
    keras = _tf.keras3()
    layers = keras.layers
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(8, 3, activation="relu"),
                              layers.RMSNormalization(), layers.GlobalAveragePooling2D(),
                              layers.Dense(16, activation="relu"), layers.Dense(10, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits.x[:600], digits.y[:600], epochs=2, verbose=0)
    model.save(tmp_path / "rms.keras")
    np.savez(tmp_path / "d.npz", x=digits.x[:600], y=digits.y[:600])
    with pytest.raises(UnsupportedLayerError, match="on-device training needs a tf-keras model"):
        export_trainable(tmp_path / "rms.keras", None, progress=False)
    result = export_trainable(tmp_path / "rms.keras", tmp_path / "head", data=tmp_path / "d.npz", progress=False,
                              config=TrainableConfig(head_only=True, batch_size=16))
    assert set(result.files) == {"backbone.tflite", "trainable.tflite"}
    assert result.manifest["verification"]["infer_top1_agreement"] >= 95 and result.warnings == []
    trainer = Trainer.load(tmp_path / "head")
    before, _ = trainer.evaluate(digits.x[600:900], digits.y[600:900])
    trainer.fit(digits.x[:600], digits.y[:600], epochs=3, learning_rate=0.05)
    after, _ = trainer.evaluate(digits.x[600:900], digits.y[600:900])
    assert after < before


def test_a_graph_split_at_its_dense_head_composes_back_to_the_graph(digits, tmp_path):
    """split_head_graph: the backbone's features through the tf-keras head give the SavedModel's own outputs."""
    from edgekit.loading.graph import load_graph
    from edgekit.trainable.graph_head import split_head_graph

    tf = _tf.tf()
    x = digits.x[:32]
    for kind, path in _plain_savedmodels(digits, tmp_path).items():
        graph = load_graph(path)
        backbone, head = split_head_graph(graph)
        whole = next(iter(graph.function(tf.constant(x)).values())).numpy()
        features = backbone.function(tf.constant(x))["features"].numpy()
        composed = head.predict(features, verbose=0)
        if graph.outputs_probabilities and not np.allclose(composed.sum(1), 1, atol=1e-3):
            composed = tf.nn.softmax(composed).numpy()
        np.testing.assert_allclose(composed, whole, atol=1e-4, err_msg=kind)
        assert head.layers[-1].units == graph.num_classes == 10


def test_a_savedmodel_whose_graph_reads_files_is_refused_before_it_loads(tmp_path):
    from edgekit.errors import ModelLoadError
    from edgekit.loading.graph import check_graph_ops

    tf = _tf.tf()
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    module = tf.Module()
    module.serve = tf.function(lambda x: {"y": x * tf.cast(tf.strings.length(tf.io.read_file(str(secret))), x.dtype)},
                               input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "reads"), signatures=module.serve.get_concrete_function())
    with pytest.raises(ModelLoadError, match="the graph runs ReadFile"):
        check_graph_ops(tmp_path / "reads")


def _plain_savedmodels(digits, folder):
    """A Keras 3 model.export() SavedModel and a tf.Module saved by tf.saved_model.save (its dense layers written
    as x @ w + b, one with a transposed kernel), both trained on 600 digits. The Keras model's swish is tf.nn.silu,
    whose custom gradient captures a tensor: saving the backbone with it failed (EfficientNetV2, exit 70)."""
    tf = _tf.tf()
    keras = _tf.keras3()
    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(8, 3, activation="swish"),  # a custom gradient
                              layers.MaxPooling2D(), layers.Flatten(), layers.Dropout(0.1),
                              layers.Dense(16, activation="relu"), layers.Dense(10, activation="softmax")])
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    model.fit(digits.x[:600], digits.y[:600], epochs=8, verbose=0)
    model.export(str(folder / "exported"), verbose=False)

    class Net(tf.Module):
        def __init__(self):
            self.w1 = tf.Variable(tf.random.normal([64, 32], stddev=0.1, seed=1))
            self.b1 = tf.Variable(tf.zeros([32]))
            self.w2t = tf.Variable(tf.random.normal([10, 32], stddev=0.1, seed=2))  # used as transpose_b
            self.b2 = tf.Variable(tf.zeros([10]))

        @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32)])
        def __call__(self, x):
            h = tf.nn.relu(tf.matmul(tf.reshape(x, [-1, 64]), self.w1) + self.b1)
            return {"probs": tf.nn.softmax(tf.matmul(h, self.w2t, transpose_b=True) + self.b2)}

    net = Net()
    variables = [net.w1, net.b1, net.w2t, net.b2]
    for step in range(200):
        i = np.random.default_rng(step).integers(0, 600, 64)
        with tf.GradientTape() as tape:
            probs = net(digits.x[i])["probs"]
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(digits.y[i], probs))
        for v, g in zip(variables, tape.gradient(loss, variables), strict=True):
            v.assign_sub(0.5 * g)
    tf.saved_model.save(net, str(folder / "module"), signatures=net.__call__)
    return {"model.export()": folder / "exported", "tf.saved_model.save": folder / "module"}


@pytest.mark.slow  # make test: a graph split at its dense head composes back to the graph (test above)
def test_head_only_training_of_a_plain_savedmodel(digits, tmp_path):
    """A SavedModel without Keras layers is split at its trailing dense layers: the graph before them is the int8
    backbone, the dense layers (read back from MatMul, bias and activation) the head that trains in LiteRT."""
    from conftest import run_cli

    np.savez(tmp_path / "d.npz", x=digits.x[:600], y=digits.y[:600])
    paths = _plain_savedmodels(digits, tmp_path)
    # TensorFlow was first imported by the graph-op check of such a SavedModel, before tf-keras was chosen: the
    # compress command refused every plain SavedModel ("TensorFlow was imported with Keras 3 before edgekit")
    proc = run_cli("compress", str(paths["model.export()"]), "--data", str(tmp_path / "d.npz"), "--formats", "tflite",
                   "--out", str(tmp_path / "compressed"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "compressed" / "model.tflite").is_file()
    for kind, path in paths.items():
        with pytest.raises(UnsupportedLayerError, match="holds a graph only"):
            export_trainable(path, None, progress=False)
        proc = run_cli("trainable", str(path), "--head-only", "--data", str(tmp_path / "d.npz"), "--batch-size", "16",
                       "--out", str(tmp_path / kind), "--quiet")
        assert proc.returncode == 0, (kind, proc.stderr)
        manifest = json.loads((tmp_path / kind / "manifest.json").read_text())
        head = [t["shape"] for t in manifest["trainable"]["tensors"]]
        assert head == ([[72, 16], [16], [16, 10], [10]] if kind == "model.export()" else
                        [[64, 32], [32], [32, 10], [10]]), kind
        assert manifest["verification"]["infer_top1_agreement"] >= 95, kind
        trainer = Trainer.load(tmp_path / kind)
        _, held_out = trainer.evaluate(digits.x[600:900], digits.y[600:900])
        assert held_out >= 60, (kind, held_out)  # the graph's own weights, not a fresh head
        before, _ = trainer.evaluate(digits.x[:600], digits.y[:600])
        trainer.fit(digits.x[:600], digits.y[:600], epochs=3, learning_rate=0.05)
        after, _ = trainer.evaluate(digits.x[:600], digits.y[:600])
        assert after < before, kind  # it trains on the device


def test_a_graph_that_does_not_end_in_dense_layers_is_refused_for_head_only(digits, tmp_path):
    keras = _tf.keras3()
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(10, 8), keras.layers.Flatten(),
                              keras.layers.Softmax()])
    model.export(str(tmp_path / "conv_head"), verbose=False)
    np.savez(tmp_path / "d.npz", x=digits.x[:64], y=digits.y[:64])
    with pytest.raises(UnsupportedLayerError, match=r"needs the serving graph to end in dense layers .*Reshape op"):
        export_trainable(tmp_path / "conv_head", None, data=tmp_path / "d.npz", progress=False,
                         config=TrainableConfig(head_only=True))


def test_head_only_cuts_before_a_mobilenetv3_style_top(digits, tmp_path):
    """keras.applications MobileNetV3 ends pooling(keepdims) -> 1x1 convs -> Flatten -> softmax: nothing after its
    Flatten trains, which crashed the export (no get_weights signature, exit 70). The cut is now the pooling."""
    keras = _tf.keras()
    layers = keras.layers
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(8, 3, activation="relu"),
                              layers.GlobalAveragePooling2D(keepdims=True), layers.Conv2D(16, 1, activation="relu"),
                              layers.Dropout(0.2), layers.Conv2D(10, 1), layers.Flatten(),
                              layers.Activation("softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits.x[:300], digits.y[:300], epochs=1, verbose=0)
    model.save(tmp_path / "v3top.keras")
    np.savez(tmp_path / "d.npz", x=digits.x[:300], y=digits.y[:300])
    result = export_trainable(tmp_path / "v3top.keras", None, data=tmp_path / "d.npz", progress=False,
                              config=TrainableConfig(head_only=True, batch_size=8))
    assert result.manifest["trainable"]["head_input"] == {"shape": [None, 1, 1, 8]}
    assert [t["shape"] for t in result.manifest["trainable"]["tensors"]] == [[1, 1, 8, 16], [16], [1, 1, 16, 10], [10]]
    flat = keras.Sequential([keras.Input((8, 8, 1)), layers.Flatten(), layers.Activation("softmax")])
    with pytest.raises(UnsupportedLayerError, match="needs a head at the end of the model"):
        export_trainable(flat, None, data=tmp_path / "d.npz", progress=False, config=TrainableConfig(head_only=True))


def test_head_only_of_a_keras3_model_whose_pooled_features_keep_unit_spatial_dims(digits, tmp_path):
    """Keras 3 MobileNetV3Small --head-only was refused: "the serving output has shape (None, 1, 1, 576)" (its
    pooling keeps dims; the backbone goes through its own graph where tf-keras cannot rebuild the model, here
    because of RMSNormalization). The backbone now hands over (None, C) and the head restores (1, 1, C)."""
    keras = _tf.keras3()
    layers = keras.layers
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(8, 3, activation="hard_swish"),
                              layers.RMSNormalization(), layers.GlobalAveragePooling2D(keepdims=True),
                              layers.Conv2D(16, 1, activation="hard_swish"), layers.Dropout(0.2),
                              layers.Conv2D(10, 1), layers.Flatten(), layers.Activation("softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits.x[:600], digits.y[:600], epochs=10, verbose=0)
    model.save(tmp_path / "v3top.keras")
    np.savez(tmp_path / "d.npz", x=digits.x[:600], y=digits.y[:600])
    result = export_trainable(tmp_path / "v3top.keras", tmp_path / "head", data=tmp_path / "d.npz", progress=False,
                              config=TrainableConfig(head_only=True, batch_size=16))
    trainable, check = result.manifest["trainable"], result.manifest["verification"]
    assert trainable["head_input"] == {"shape": [None, 8]}
    assert [t["shape"] for t in trainable["tensors"]] == [[1, 1, 8, 16], [16], [1, 1, 16, 10], [10]]
    # what is checked is that the backbone feeds the head the right features (the full int8 one, hard-swish and
    # RMSNormalization, agreed on 85.5% here: a dynamic-range one then replaces it)
    assert check["infer_top1_agreement"] >= 95 and check["train_step_max_relative_l2"] <= 1e-2
    kept = {a["file"]: a["quantization"] for a in result.manifest["artifacts"]}
    assert kept["trainable.tflite"] == "none" and kept["backbone.tflite"] in ("int8", "dynamic")
    assert (kept["backbone.tflite"] == "dynamic") == bool(result.warnings), result.warnings
    trainer = Trainer.load(tmp_path / "head")
    before, _ = trainer.evaluate(digits.x[600:900], digits.y[600:900])
    trainer.fit(digits.x[:600], digits.y[:600], epochs=3, learning_rate=0.05)
    after, _ = trainer.evaluate(digits.x[600:900], digits.y[600:900])
    assert after < before


def test_head_only_head_is_the_trailing_run_of_layers_that_train_on_the_device(digits, tmp_path):
    """ConvNeXt ends pooling -> LayerNormalization -> Dense and a plain LSTM classifier LSTM -> Dense: the layer with
    no on-device gradient stays in the int8 backbone and the Dense layer is the head (both were refused)."""
    keras = _tf.keras()
    layers = keras.layers
    keras.utils.set_random_seed(0)
    convnext_top = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(8, 3, activation="relu"),
                                     layers.GlobalAveragePooling2D(), layers.LayerNormalization(),
                                     layers.Dense(10, activation="softmax")])
    np.savez(tmp_path / "d.npz", x=digits.x[:200], y=digits.y[:200])
    tokens = np.random.default_rng(0).integers(0, 20, (200, 12)).astype(np.int32)
    np.savez(tmp_path / "t.npz", x=tokens, y=tokens[:, 0] % 3)
    lstm = keras.Sequential([keras.Input((12,), dtype="int32"), layers.Embedding(20, 8), layers.LSTM(6),
                             layers.Dense(3, activation="softmax")])
    for model, data, head in ((convnext_top, "d.npz", [[8, 10], [10]]), (lstm, "t.npz", [[6, 3], [3]])):
        result = export_trainable(model, None, data=tmp_path / data, progress=False,
                                  config=TrainableConfig(head_only=True, batch_size=8))
        assert [t["shape"] for t in result.manifest["trainable"]["tensors"]] == head
        assert result.manifest["verification"]["infer_top1_agreement"] >= 90
