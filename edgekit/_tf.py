"""The one place where TensorFlow is imported.

tensorflow-model-optimization works only with tf-keras (Keras 2), which TensorFlow uses for
``tf.keras`` only when ``TF_USE_LEGACY_KERAS=1`` is set *before* TensorFlow is imported. Every
edgekit module that needs TensorFlow calls :func:`tf` / :func:`keras` / :func:`tfmot` from here,
inside a function, so importing edgekit itself never loads TensorFlow.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

from edgekit.errors import EdgeKitError


def _prepare_environment() -> None:
    if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        import tensorflow as already  # noqa: F401  (only to read its keras version)

        if not already.keras.__version__.startswith("2."):
            raise EdgeKitError(
                "TensorFlow was imported with Keras 3 before edgekit; "
                "set TF_USE_LEGACY_KERAS=1 before importing tensorflow, or import edgekit first"
            )
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def tf() -> ModuleType:
    """Return the ``tensorflow`` module, imported with tf-keras as ``tf.keras``."""
    _prepare_environment()
    import tensorflow

    return tensorflow


def keras() -> ModuleType:
    """Return tf-keras (Keras 2), the Keras edgekit works in."""
    _prepare_environment()
    import tf_keras

    return tf_keras


def keras3() -> ModuleType:
    """Return Keras 3, used only to read Keras 3 model files before rebuilding them."""
    _prepare_environment()
    import keras as keras_3

    return keras_3


def tfmot() -> ModuleType:
    """Return tensorflow-model-optimization."""
    _prepare_environment()
    import tensorflow_model_optimization

    return tensorflow_model_optimization


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow for a reproducible run."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    tf().random.set_seed(seed)
