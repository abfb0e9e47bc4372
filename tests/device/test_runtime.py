"""The device agent's runtimes: a loader per runtime, LiteRT and onnxruntime against the manifest, int8 I/O, bad
requests."""

import json

import numpy as np
import pytest

from device_agents import AgentError, ArtifactError, InputMismatchError, Model
from device_agents.serving.runtime import LOADERS, Runtime


def test_every_runtime_has_a_loader():
    assert set(LOADERS) == set(Runtime)


def test_litert_and_onnxruntime_agree_with_the_manifest(int8_out, digits):
    manifest = json.loads((int8_out / "manifest.json").read_text())
    from edgekit.loading.data import split

    ev = split(digits, seed=0).evaluation
    for entry in manifest["artifacts"]:
        model = Model.load(int8_out / entry["file"], num_threads=1)
        assert model.runtime is (Runtime.LITERT if entry["format"] == "tflite" else Runtime.ONNXRUNTIME)
        out = model.predict(ev.x)
        assert out.dtype == np.float32 and out.shape == (len(ev), 10)
        assert float(np.mean(out.argmax(1) == ev.y) * 100) == pytest.approx(entry["accuracy"], abs=1e-3)
        one = model.predict(ev.x[0])  # a single sample without the batch axis
        assert one.shape == (10,)


def test_int8_io_is_quantized_by_the_agent(int8_out, digits):
    model = Model.load(int8_out / "model.tflite")
    spec = model.inputs[0]
    assert spec.dtype == "int8" and spec.scale > 0 and model.outputs[0].dtype == "int8"
    probs = model.predict(digits.x[:20])
    assert probs.dtype == np.float32 and np.allclose(probs.sum(1), 1, atol=0.05)


def test_bad_requests_raise_one_documented_type(int8_out):
    model = Model.load(int8_out / "model.tflite")
    with pytest.raises(InputMismatchError, match=r"input has shape \(2, 9, 9, 1\), the model expects \(n, 8, 8, 1\)"):
        model.predict(np.zeros((2, 9, 9, 1), np.float32))
    with pytest.raises(InputMismatchError, match=r"input has shape \(50, 28, 28\), the model expects \(n, 8, 8, 1\)"):
        model.predict(np.zeros((50, 28, 28), np.float32))  # the user's own shape, not one with a batch axis added
    with pytest.raises(InputMismatchError, match="expects numbers"):
        model.predict(np.array([[["a"] * 1] * 8] * 8, dtype=object)[None])
    with pytest.raises(ArtifactError, match="neither a TFLite flatbuffer nor an ONNX model"):
        Model.load(b"\x00garbage")
    with pytest.raises(ArtifactError, match="unknown runtime 'coreml'"):
        Model.load(int8_out / "model.tflite", runtime="coreml")
    with pytest.raises(ArtifactError, match="cannot run tflite artifacts"):
        Model.load(int8_out / "model.tflite", runtime="onnxruntime")
    truncated = (int8_out / "model.tflite").read_bytes()[:2000]
    with pytest.raises(ArtifactError, match="litert cannot load the artifact"):
        Model.load(truncated)
    # an app that catches the one documented type catches every bad request
    for bad in (lambda: model.predict(np.zeros((2, 9, 9, 1), np.float32)), lambda: Model.load(b"\x00garbage"),
                lambda: Model.load(truncated), lambda: Model.load(int8_out / "model.tflite", runtime="coreml")):
        with pytest.raises(AgentError):
            bad()


def test_an_integer_input_refuses_what_its_cast_would_change(tmp_path):
    """A uint8-input model (a camera's frames) fed int32 values past 255 wrapped them silently (300 became 44) and
    answered; fed 0-1 floats, the error spoke of "token ids". Values its dtype cannot hold are refused, naming them."""
    from edgekit import _tf

    tf = _tf.tf()
    keras = _tf.keras()
    inputs = keras.Input((4,), dtype="uint8")
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Rescaling(1 / 255)(inputs)))
    (tmp_path / "u8.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    lite = Model.load(tmp_path / "u8.tflite")
    pixels = np.array([[0, 17, 200, 255]], np.int32)
    np.testing.assert_allclose(lite.predict(pixels), model(pixels.astype(np.uint8)).numpy(), atol=1e-5)
    with pytest.raises(InputMismatchError, match=r"input values range over \[0, 300\], outside what the model's uint8 "
                                                 r"input holds \(0..255\)"):
        lite.predict(np.array([[0, 17, 300, 255]], np.int32))
    with pytest.raises(InputMismatchError, match=r"input values range over \[-1, 255\]"):
        lite.predict(np.array([[-1, 17, 2, 255]], np.int64))
    with pytest.raises(InputMismatchError, match=r"input has dtype float32, the model expects integers \(uint8"):
        lite.predict(pixels.astype(np.float32) / 255)


def test_samples_with_the_channels_in_another_order_are_told_the_transpose(tmp_path):
    from edgekit import _tf

    tf, keras = _tf.tf(), _tf.keras()
    inputs = keras.Input((3, 4, 4))  # channels first, as a PyTorch export takes its images
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
    lite = Model.load(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    with pytest.raises(InputMismatchError, match=r"input has shape \(2, 4, 4, 3\), .*channels first in the model\): "
                                                 r"transpose the samples, np.transpose\(x, \(0, 3, 1, 2\)\)"):
        lite.predict(np.zeros((2, 4, 4, 3), np.float32))
    assert lite.predict(np.zeros((2, 4, 4, 3), np.float32).transpose(0, 3, 1, 2)).shape == (2, 2)
