"""NNCF's accuracy control as a rung of the ONNX ladder: where it sits, what a failing search does, what the
speed and size rungs leave alone, and a real NNCF search (its telemetry off) on a real model."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from edgekit.config import Format
from edgekit.export.accuracy_control import NNCF_RUNG, AccuracyControl, Labelled
from edgekit.export.remedies import (
    FLOAT_FALLBACK,
    WIDE_ACTIVATIONS,
    Attempt,
    Int8Options,
    OnnxQuantizer,
    recover,
    shrink,
    speed_up,
)

CONTROL = AccuracyControl(Labelled(np.zeros((4, 2), np.float32), np.zeros(4, np.int64)), max_drop=2.0)


class _Searching:
    """A quantizer whose bytes name their options, with an accuracy-controlled search that finds ``found``."""

    def __init__(self, found: Int8Options | None = None, error: Exception | None = None) -> None:
        self.found, self.error, self.searched = found, error, []

    def quantize(self, options: Int8Options) -> bytes:
        if options.searched and options != self.found:
            raise ValueError("not searched")
        return repr(options).encode()

    def sensitive_nodes(self, options: Int8Options) -> list[tuple[str, ...]]:
        return [("a",), ("b",)]

    def accuracy_controlled(self, control: AccuracyControl) -> Int8Options:
        self.searched.append(control)
        if self.error is not None:
            raise self.error
        return self.found


NNCF_FOUND = Int8Options(onnx_quantizer=OnnxQuantizer.NNCF, float_nodes=("conv0", "hswish0"))


def test_the_search_is_tried_after_the_float_fallback_and_before_16_bit_activations():
    quantizer = _Searching(NNCF_FOUND)
    recovery = recover(Format.ONNX, quantizer, Attempt("", Int8Options(), b"first", 40.0), budget=2.0,
                       evaluate=lambda data: (0.25 if b"NNCF" in data else 40.0, None), control=CONTROL)
    names = list(recovery.tried)
    assert names.index(f"{FLOAT_FALLBACK}(2)") < names.index(NNCF_RUNG) == len(names) - 1
    assert WIDE_ACTIVATIONS not in names and recovery.within_budget and quantizer.searched == [CONTROL]
    assert recovery.best.remedy == NNCF_RUNG and recovery.best.score == 0.25
    assert recovery.best.options.changes() == "NNCF's accuracy control; 2 node(s) kept float: conv0, hswish0"
    assert recovery.best.options.as_dict()["onnx_quantizer"] == "nncf"


def test_a_search_that_fails_or_misses_the_budget_is_a_failed_rung_and_the_ladder_goes_on():
    failing = recover(Format.ONNX, _Searching(error=RuntimeError("nncf: unsupported op")),
                      Attempt("", Int8Options(), b"first", 40.0), budget=2.0,
                      evaluate=lambda data: (0.5 if b"INT16" in data else 40.0, None), control=CONTROL)
    assert failing.tried[NNCF_RUNG] == float("inf") and failing.best.remedy == WIDE_ACTIVATIONS
    missing = recover(Format.ONNX, _Searching(NNCF_FOUND), Attempt("", Int8Options(), b"first", 40.0), budget=2.0,
                      evaluate=lambda data: (5.0 if b"NNCF" in data else 40.0, None), control=CONTROL)
    assert missing.tried[NNCF_RUNG] == 5.0 and list(missing.tried)[-1] == WIDE_ACTIVATIONS
    assert missing.best.remedy == NNCF_RUNG and not missing.within_budget  # the best it found, said to miss


def test_without_labelled_data_or_a_search_the_rung_is_not_tried():
    class Plain(_Searching):
        accuracy_controlled = None

    for quantizer, control in ((_Searching(NNCF_FOUND), None), (Plain(), CONTROL)):
        recovery = recover(Format.ONNX, quantizer, Attempt("", Int8Options(), b"first", 40.0), budget=2.0,
                           evaluate=lambda data: (40.0, None), control=control)
        assert NNCF_RUNG not in recovery.tried


def test_speed_and_size_rungs_leave_a_searched_artifact_as_it_is():
    """Per-tensor weights or another format on top of NNCF's result would need the search again."""
    current = Attempt(NNCF_RUNG, NNCF_FOUND, b"nncf", 0.25)
    best, tried = speed_up(Format.ONNX, _Searching(NNCF_FOUND), current, budget=2.0,
                           evaluate=lambda data: (0.0, None), ratio=lambda a, b: 0.1)
    assert best is current and tried == {}
    best, tried = shrink(Format.ONNX, _Searching(NNCF_FOUND), current, budget=2.0, floor=0.0,
                         evaluate=lambda data: (0.0, None), ratio=lambda a, b: 0.1)
    assert best is current and tried == {}


@pytest.fixture(scope="module")
def digits_cnn():
    from edgekit import _tf
    from edgekit.loading.data import load_digits

    keras = _tf.keras()
    data = load_digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Input((8, 8, 1)), keras.layers.Conv2D(16, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")])
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(data.x[:1200], data.y[:1200], epochs=8, verbose=0)
    return model, data


def _accuracy(data: bytes, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return 100.0 * float(np.mean(session.run(None, {"input": x})[0].argmax(-1) == y))


@pytest.mark.parametrize("labelled", [True, False])
def test_a_real_nncf_search_keeps_its_drop_and_names_nodes_of_the_float_graph(digits_cnn, labelled):
    """Without labels the float model's own predictions stand in (the metric is then agreement)."""
    from edgekit.export.onnx import OnnxInt8, float_onnx

    model, data = digits_cnn
    x, y = data.x[1200:1456], data.y[1200:1456]
    proto = float_onnx(model)
    float_accuracy = _accuracy(proto.SerializeToString(), x, y)
    with OnnxInt8(proto, data.x[:200]) as quantizer:
        options = quantizer.accuracy_controlled(AccuracyControl(Labelled(x, y if labelled else None), max_drop=1.0))
        artifact = quantizer.quantize(options)
        with pytest.raises(ValueError, match="search on labelled data"):
            quantizer.quantize(Int8Options(onnx_quantizer=OnnxQuantizer.NNCF, float_nodes=("other",)))
    import onnx

    graph = onnx.load_from_string(artifact).graph
    assert options.onnx_quantizer is OnnxQuantizer.NNCF and "QuantizeLinear" in {n.op_type for n in graph.node}
    assert set(options.float_nodes) <= {n.name for n in proto.graph.node}
    assert _accuracy(artifact, x, y) >= float_accuracy - 1.0 - 1e-9


def test_nncf_writes_and_sends_nothing(tmp_path):
    """NNCF's openvino-telemetry writes a client ID under ~/intel when NNCF is imported (it reads its NNCF_CI switch
    only afterwards); edgekit imports it so that its stub is used."""
    code = ("import sys; from edgekit.export.accuracy_control import _nncf; _nncf(); "
            "from nncf.telemetry.wrapper import NNCFTelemetry, telemetry; print(isinstance(telemetry, NNCFTelemetry), "
            "'openvino_telemetry' in sys.modules and sys.modules['openvino_telemetry'] is not None)")
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("NNCF_CI", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]  # NNCF's stub, and openvino_telemetry never loaded
    assert list(tmp_path.iterdir()) == []
