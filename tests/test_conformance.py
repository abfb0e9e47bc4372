"""Real architectures a user brings, built by Keras 3 itself, through post-training int8 in both formats.

Models tf-keras cannot rebuild (MultiHeadAttention, LayerNormalization, preprocessing layers,
keras.applications' MobileNetV3 with hard-swish and squeeze-excite) are converted from their own
TensorFlow graph; a plain SavedModel (``model.export()``) is used by its serving signature; recurrent
text models are rebuilt as tf-keras and their TFLite is unrolled (stateless).
"""

import numpy as np
import pytest

from edgekit import CompressConfig, Recipe, UnsupportedLayerError, _tf, compress
from edgekit.loading import zoo


@pytest.fixture(scope="module")
def text_data(text_npz):
    return text_npz


@pytest.fixture(scope="module")
def images32(tmp_path_factory):
    from edgekit.loading.data import load_digits

    data = load_digits(32, 3)
    path = tmp_path_factory.mktemp("conf") / "digits32.npz"
    np.savez(path, x=data.x[:600], y=data.y[:600])
    return path


def _trained(model, npz, epochs):
    keras = _tf.keras3()
    arrays = np.load(npz)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(arrays["x"], arrays["y"], epochs=epochs, batch_size=32, verbose=0)
    return model


ARCHITECTURES = ["transformer", "preprocessing-cnn", "mobilenetv3small", "gru", "bilstm", "model.export() savedmodel"]


@pytest.fixture(scope="module")
def saved(text_data, images32, tmp_path_factory):
    """Each architecture trained briefly and saved the way a Keras 3 user saves it."""
    keras = _tf.keras3()
    keras.utils.set_random_seed(0)
    d = tmp_path_factory.mktemp("conformance")
    models = {}
    for name in ARCHITECTURES[:-1]:
        data = images32 if name in ("preprocessing-cnn", "mobilenetv3small") else text_data
        model = zoo.keras3_architecture(name, sample=np.load(images32)["x"][:200])
        models[name] = (_trained(model, data, 1 if name == "mobilenetv3small" else 6), data)
    paths = {}
    for name, (model, data) in models.items():
        paths[name] = (d / f"{name}.keras", data)
        model.save(paths[name][0])
    cnn = models["preprocessing-cnn"][0]
    cnn.export(str(d / "exported"), format="tf_saved_model", verbose=False)
    paths["model.export() savedmodel"] = (d / "exported", images32)
    return paths


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_post_training_int8_in_both_formats(saved, name, tmp_path):
    path, data = saved[name]
    result = compress(path, data, tmp_path / "out", progress=False,
                      config=CompressConfig(recipe=Recipe(quantize="int8")))
    formats = {a.format.value: a for a in result.selected.artifacts}
    if name == "bilstm":  # TFLite's builtins lack the TensorList ops of a bidirectional loop: ONNX only, said why
        assert set(formats) == {"onnx"} and "TensorList" in result.selected.format_errors["tflite"]
    else:
        assert set(formats) == {"tflite", "onnx"}, result.selected.format_errors
    for art in formats.values():
        assert art.runtime in ("litert", "onnxruntime") and art.outputs[0].shape[-1] == result.source["output"][
            "shape"][-1]
        if name != "mobilenetv3small":  # one epoch: near chance, so only its agreement is asked
            assert result.source["accuracy"] >= 60 and art.accuracy_drop <= 5, (art.format, art.accuracy_drop)
        assert art.top1_agreement >= 80, (art.format, art.top1_agreement)
    graph_only = name not in ("gru", "bilstm")  # the recurrent ones are rebuilt as tf-keras: model.keras is kept
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert (tmp_path / "out" / "model.keras").exists() is not graph_only


def test_training_based_techniques_say_why_they_cannot_run(saved, tmp_path):
    path, data = saved["transformer"]
    with pytest.raises(UnsupportedLayerError, match="pruning needs a tf-keras model: the Keras 3 model is not rebuilt"):
        compress(path, data, None, progress=False, config=CompressConfig(recipe=Recipe(prune=0.5)))
    search = compress(path, data, None, progress=False, config=CompressConfig(
        max_accuracy_drop=5, search=(Recipe(quantize="int8"), Recipe(quantize="qat")), formats=("tflite",)))
    qat = next(c for c in search.candidates if c.recipe.quantize.value == "qat")
    assert "quantization-aware training needs a tf-keras model" in qat.error
    assert search.selected.recipe.name == "int8"
