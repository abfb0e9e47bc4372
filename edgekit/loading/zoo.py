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
