"""Small reference models for the demo, tests and benchmarks (built here, never downloaded)."""

from __future__ import annotations

from typing import Any

from edgekit import _tf
from edgekit.loading.data import Dataset


def digits_cnn(input_shape: tuple[int, int, int] = (8, 8, 1), num_classes: int = 10) -> Any:
    """A small CNN for 8x8 digits: conv-BN-ReLU blocks, pooling, dense head, softmax."""
    keras = _tf.keras()
    layers = keras.layers
    return keras.Sequential([
        keras.Input(input_shape, name="image"),
        layers.Conv2D(32, 3, padding="same", use_bias=False), layers.BatchNormalization(), layers.ReLU(),
        layers.Conv2D(32, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(),
        layers.Conv2D(64, 3, padding="same", activation="relu"),
        layers.Flatten(),
        layers.Dropout(0.2),
        layers.Dense(64, activation="relu"),
        layers.Dense(num_classes, activation="softmax"),
    ], name="digits_cnn")


def preactivation_cnn(filters: int = 16, blocks: int = 3, input_shape: tuple[int, int, int] = (8, 8, 1),
                      num_classes: int = 10) -> Any:
    """A DenseNet-style CNN: each block is concat(x, conv(relu(BN(x)))), so its BatchNormalization layers follow a
    concatenation and cannot fold into a convolution."""
    keras = _tf.keras()
    layers = keras.layers
    inp = keras.Input(input_shape)
    x = layers.Conv2D(filters, 3, padding="same")(inp)
    for _ in range(blocks):
        y = layers.Conv2D(filters, 3, padding="same")(layers.ReLU()(layers.BatchNormalization()(x)))
        x = layers.Concatenate()([x, y])
    x = layers.GlobalAveragePooling2D()(layers.ReLU()(layers.BatchNormalization()(x)))
    return keras.Model(inp, layers.Dense(num_classes, activation="softmax")(x))


def mobilenet_v2(input_shape: tuple[int, int, int] = (96, 96, 3), num_classes: int = 10, alpha: float = 0.35) -> Any:
    """MobileNetV2 (width ``alpha``), randomly initialised: no weights are downloaded."""
    keras = _tf.keras()
    base = keras.applications.MobileNetV2(input_shape=input_shape, alpha=alpha, include_top=False,
                                          weights=None, pooling="avg")
    for layer in base.layers:  # Keras uses 0.999: after a short training the moving statistics stay near
        if isinstance(layer, keras.layers.BatchNormalization):  # their initial values and inference breaks
            layer.momentum = 0.9
    out = keras.layers.Dense(num_classes, activation="softmax", name="classifier")(base.output)
    return keras.Model(base.input, out, name=f"mobilenetv2_{alpha:g}")


def train(model: Any, data: Dataset, *, epochs: int = 15, batch_size: int = 32, learning_rate: float = 2e-3,
          seed: int = 0) -> Any:
    """Train ``model`` on ``data`` (on a GPU when TensorFlow sees one) and return it."""
    keras = _tf.keras()
    _tf.set_seed(seed)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(data.x, data.y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0)
    return model


def device_name() -> str:
    """``"GPU"`` when TensorFlow sees one, else ``"CPU"``."""
    return "GPU" if _tf.tf().config.list_physical_devices("GPU") else "CPU"


# --- Keras 3 architectures of the conformance suite (tests/compression/test_conformance.py, benchmarks/) ---

def token_dataset(n: int = 600, length: int = 16, vocab: int = 30, classes: int = 3, seed: int = 0) -> Dataset:
    """Token-id sequences whose class is their most frequent token band: a text task learnt in seconds."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.integers(0, vocab, (n, length))
    band = vocab // classes
    for i in range(n):
        pos = rng.choice(length, length // 2 + 1, replace=False)
        x[i, pos] = rng.choice(np.arange(y[i] * band, (y[i] + 1) * band), len(pos))
    return Dataset(x.astype(np.int32), y.astype(np.int64), "tokens")


def text_cnn(length: int = 16, vocab: int = 30, classes: int = 3) -> Any:
    """A token-id text classifier that trains on devices: Embedding, Conv1D, global max pooling, Dense
    (the shape of keras.io's "text classification from scratch")."""
    keras = _tf.keras()
    layers = keras.layers
    return keras.Sequential([
        keras.Input((length,), dtype="int32", name="tokens"), layers.Embedding(vocab, 16),
        layers.Conv1D(32, 3, padding="same", activation="relu"), layers.GlobalMaxPooling1D(),
        layers.Dense(16, activation="relu"), layers.Dense(classes, activation="softmax")])


KERAS3_ARCHITECTURES = ("transformer", "preprocessing-cnn", "mobilenetv3small", "mobilenetv2", "efficientnetb0",
                        "densenet121", "gru", "bilstm")
"""The conformance suite's architectures (:func:`keras3_architecture`)."""
TEXT_ARCHITECTURES = ("transformer", "gru", "bilstm")
PIXELS_0_255 = ("mobilenetv3small", "efficientnetb0")
"""Architectures whose keras.applications model rescales its input itself (``include_preprocessing``): as Keras
documents, they take pixels in 0-255 (fed 0-1 pixels, MobileNetV3Small sees inputs within 0.008 of -1, learns
little and its int8 artifacts lose everything); the others take 0-1 pixels."""


def keras3_architecture(name: str, *, sample: Any = None, length: int = 16, vocab: int = 30) -> Any:
    """A Keras 3 model of the conformance suite (:data:`KERAS3_ARCHITECTURES`), randomly initialised: a transformer,
    a CNN with preprocessing layers (``sample`` adapts its Normalization), keras.applications MobileNetV3Small,
    MobileNetV2 (width 0.35), EfficientNetB0 and DenseNet121 (``weights=None``), GRU and bidirectional LSTM.
    Images are 32x32x3 with 10 classes; texts ``length`` token ids below ``vocab`` with 3 classes."""
    keras = _tf.keras3()
    layers = keras.layers
    applications = {"mobilenetv3small": lambda: keras.applications.MobileNetV3Small(
                        input_shape=(32, 32, 3), weights=None, classes=10, include_preprocessing=True),
                    "mobilenetv2": lambda: keras.applications.MobileNetV2(
                        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10),
                    "efficientnetb0": lambda: keras.applications.EfficientNetB0(
                        input_shape=(32, 32, 3), weights=None, classes=10),
                    "densenet121": lambda: keras.applications.DenseNet121(
                        input_shape=(32, 32, 3), weights=None, classes=10)}
    if name in applications:
        model = applications[name]()
        for layer in model.layers:  # keras.applications use 0.99-0.999: a short training leaves the statistics stale
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = 0.9
        return model
    if name == "transformer":
        inp = keras.Input((length,), dtype="int32")
        x = layers.Embedding(vocab, 16)(inp)
        x = layers.LayerNormalization()(x + layers.MultiHeadAttention(2, 8)(x, x))
        x = layers.LayerNormalization()(x + layers.Dense(16, activation="relu")(x))
        return keras.Model(inp, layers.Dense(3, activation="softmax")(layers.GlobalAveragePooling1D()(x)))
    if name == "preprocessing-cnn":
        norm = layers.Normalization()
        norm.adapt(sample)
        return keras.Sequential([keras.Input((32, 32, 3)), layers.Rescaling(2.0, offset=-1.0), norm,
                                 layers.Conv2D(16, 3, activation="relu"), layers.MaxPooling2D(),
                                 layers.Conv2D(16, 3, activation="relu"), layers.MaxPooling2D(), layers.Flatten(),
                                 layers.Dense(10, activation="softmax")])
    if name in ("gru", "bilstm"):
        rnn = layers.GRU(16) if name == "gru" else layers.Bidirectional(layers.LSTM(8))
        return keras.Sequential([keras.Input((length,), dtype="int32"), layers.Embedding(vocab, 8), rnn,
                                 layers.Dense(3, activation="softmax")])
    raise ValueError(f"unknown architecture {name!r}")


def with_outlier_unit(model: Any, value: float = 3000.0) -> Any:
    """A copy of a Sequential model ending Dense(relu) -> Dense with one more hidden unit that is constantly
    ``value`` and that nothing reads (zero outgoing weights): the float model answers exactly as ``model``, and
    int8 with a per-tensor activation range [0, value] crushes the units that matter. One outlier channel is a
    failure mode real models have; the int8 remedies are tested and measured on it."""
    import numpy as np

    keras = _tf.keras()
    *body, hidden, head = model.layers
    x = inp = keras.Input(model.inputs[0].shape[1:])
    for layer in body:
        x = layer.__class__.from_config(layer.get_config())(x)
    x = keras.layers.Dense(hidden.units + 1, activation="relu", name=hidden.name)(x)
    out = keras.layers.Dense(head.units, activation=head.activation, name=head.name)(x)
    copy = keras.Model(inp, out, name=f"{model.name}_outlier")
    for layer in body:
        copy.get_layer(layer.name).set_weights(layer.get_weights())
    kernel, bias = hidden.get_weights()
    copy.get_layer(hidden.name).set_weights([np.concatenate([kernel, np.zeros((kernel.shape[0], 1), kernel.dtype)], 1),
                                             np.append(bias, value).astype(bias.dtype)])
    kernel, bias = head.get_weights()
    copy.get_layer(head.name).set_weights([np.concatenate([kernel, np.zeros((1, head.units), kernel.dtype)]), bias])
    return copy


def with_rare_outlier_unit(model: Any, x: Any, *, value: float = 3000.0, fraction: float = 0.05) -> Any:
    """:func:`with_outlier_unit`, but the extra unit fires on about ``fraction`` of the inputs ``x`` only: it is the
    first hidden unit's pre-activation above its ``1 - fraction`` quantile on ``x``, scaled so that its median
    value when it fires is ``value``. Nothing reads it, so the float model answers exactly as ``model``. Rare, large
    activations are a failure mode of min-max calibration (the converter's: one per-tensor range set by a few
    inputs crushes the other units for all of them), which a calibration that averages each sample's range clips
    (the LiteRT Quantizer's)."""
    import numpy as np

    copy = with_outlier_unit(model, 0.0)
    hidden = copy.layers[-2]
    features = _tf.keras().Model(copy.inputs, copy.layers[-3].output)(x).numpy()
    kernel, bias = hidden.get_weights()
    pre = features @ kernel[:, 0] + bias[0]
    threshold = np.quantile(pre, 1 - fraction)
    scale = value / np.median(pre[pre > threshold] - threshold)
    kernel[:, -1], bias[-1] = scale * kernel[:, 0], scale * (bias[0] - threshold)
    hidden.set_weights([kernel, bias])
    return copy


def massive_activation_cnn(data: Dataset, *, ratio: float, fraction: float, channels: int = 64, upscale: int = 4,
                           epochs: int = 15, seed: int = 0) -> tuple[Any, Dataset]:
    """A CNN trained on ``data``'s one-channel images upscaled ``upscale`` times, and that data with a second input
    channel: a marker pixel at the top-left corner, set on about ``fraction`` of the samples (chosen with ``seed``).

    The first convolution's first unit reads only the marker: ``ratio`` times the layer's largest other activation
    at the corner of a marked sample, 0 everywhere else; the next layer crops the corner off (and reads nothing
    of that unit), so the float model answers exactly as without it. This is the "massive activation" of real
    networks (Sun et al. 2024: a few values at fixed positions, hundreds of times the rest, in many inputs), a
    failure mode of 8-bit per-tensor ranges in which only a few values of a large tensor are outliers. Ranges
    averaged over samples (moving-average calibration) keep the outlier when most samples have it; the KL
    (entropy) search cannot clip below 1/16 of a tensor's largest value; a percentile of the values clips values
    this rare at any size. With ``channels=64`` and ``upscale=4`` the tensor holds 65,536 values a sample:
    ``ratio=100, fraction=1`` is recovered by entropy calibration alone, ``ratio=1000, fraction=0.25`` by
    percentile calibration alone (tests/export/test_remedies.py)."""
    import numpy as np

    keras = _tf.keras()
    layers = keras.layers
    image = np.repeat(np.repeat(data.x, upscale, 1), upscale, 2)
    x = np.concatenate([image, np.zeros_like(image)], -1)
    _tf.set_seed(seed)
    model = keras.Sequential([
        keras.Input(x.shape[1:], name="image_and_marker"),
        layers.Conv2D(channels, 3, padding="same", activation="relu", name="wide"),
        layers.Cropping2D(((2, 0), (2, 0))), layers.MaxPooling2D(3),
        layers.Conv2D(32, 3, activation="relu", name="after_crop"),
        layers.GlobalAveragePooling2D(), layers.Dense(10, activation="softmax")], name="massive_activation_cnn")
    train(model, Dataset(x, data.y, data.name), epochs=epochs, seed=seed)
    wide, after = model.get_layer("wide"), model.get_layer("after_crop")
    largest = float(keras.Model(model.inputs, wide.output)(x[:256]).numpy().max())
    kernel, bias = wide.get_weights()
    kernel[..., 0], bias[0] = 0.0, 0.0
    kernel[kernel.shape[0] // 2, kernel.shape[1] // 2, 1, 0] = ratio * largest
    wide.set_weights([kernel, bias])
    kernel, bias = after.get_weights()
    kernel[:, :, 0, :] = 0.0
    after.set_weights([kernel, bias])
    marked = np.random.default_rng(seed).random(len(x)) < fraction
    x[marked, 0, 0, 1] = 1.0
    return model, Dataset(x, data.y, f"{data.name}+marker")
