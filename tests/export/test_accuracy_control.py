"""NNCF's accuracy control as a rung of the ONNX ladder: where it sits, what a failing search does, what the
speed and size rungs leave alone, and a real NNCF search (its telemetry off) on a real model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from edgekit.config import Format
from edgekit.export.accuracy_control import GREEDY_RUNG, NNCF_NODES_RUNG, NNCF_RUNG, AccuracyControl, Labelled
from edgekit.export.remedies import (
    BIAS_CORRECTION,
    FLOAT_FALLBACK,
    LADDERS,
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
    """A quantizer whose bytes name their options, with an accuracy-controlled search that finds ``found`` (and,
    as the ONNX quantizer does, onnxruntime's int8 with ``found``'s nodes kept float first, when ``nodes_rung``)."""

    def __init__(self, found: Int8Options | None = None, error: Exception | None = None, *,
                 nodes_rung: bool = False) -> None:
        self.found, self.error, self.searched, self.nodes_rung = found, error, [], nodes_rung

    def quantize(self, options: Int8Options) -> bytes:
        if options.searched and options != self.found:
            raise ValueError("not searched")
        return repr(options).encode()

    def sensitive_nodes(self, options: Int8Options) -> list[tuple[str, ...]]:
        return [("a",), ("b",)]

    def accuracy_controlled(self, control: AccuracyControl, base: Int8Options) -> list[tuple[str, Int8Options]]:
        self.searched.append(control)
        if self.error is not None:
            raise self.error
        nodes = [(NNCF_NODES_RUNG, replace(base, float_nodes=self.found.float_nodes))] if self.nodes_rung else []
        return [*nodes, (NNCF_RUNG, self.found)]


NNCF_FOUND = Int8Options(onnx_quantizer=OnnxQuantizer.NNCF, float_nodes=("conv0", "hswish0"))


def test_nncf_is_tried_after_onnxruntimes_own_rungs_and_fallback_and_before_16_bit_activations():
    quantizer = _Searching(NNCF_FOUND)
    recovery = recover(Format.ONNX, quantizer, Attempt("", Int8Options(), b"first", 40.0), budget=2.0,
                       evaluate=lambda data: (0.25 if b"NNCF" in data else 40.0, None), control=CONTROL)
    names = list(recovery.tried)
    assert names == ["default", *(r.name for r in LADDERS[Format.ONNX]), BIAS_CORRECTION, f"{FLOAT_FALLBACK}(1)",
                     f"{FLOAT_FALLBACK}(2)", NNCF_RUNG]
    assert recovery.within_budget and quantizer.searched == [CONTROL]
    assert recovery.best.remedy == NNCF_RUNG and recovery.best.score == 0.25
    assert recovery.best.options.changes() == "NNCF's accuracy control; 2 node(s) kept float: conv0, hswish0"
    assert recovery.best.options.as_dict()["onnx_quantizer"] == "nncf"


def test_a_search_that_fails_or_misses_the_budget_is_a_failed_rung_and_the_ladder_goes_on():
    failing = recover(Format.ONNX, _Searching(error=RuntimeError("nncf: unsupported op")),
                      Attempt("", Int8Options(), b"first", 40.0), budget=2.0,
                      evaluate=lambda data: (0.5 if b"INT16" in data else 40.0, None), control=CONTROL)
    assert failing.tried[NNCF_RUNG] == float("inf") and failing.best.remedy == WIDE_ACTIVATIONS
    names = list(failing.tried)
    assert names.index(f"{FLOAT_FALLBACK}(1)") < names.index(NNCF_RUNG) < names.index(WIDE_ACTIVATIONS)
    missing = recover(Format.ONNX, _Searching(NNCF_FOUND), Attempt("", Int8Options(), b"first", 40.0), budget=2.0,
                      evaluate=lambda data: (5.0 if b"NNCF" in data else 40.0, None), control=CONTROL)
    assert missing.tried[NNCF_RUNG] == 5.0 and list(missing.tried)[-1] == WIDE_ACTIVATIONS
    assert missing.best.remedy == NNCF_RUNG and not missing.within_budget  # the best it found, said to miss


def test_the_tflite_search_comes_before_the_error_ranked_fallback_and_builds_on_the_best_rung():
    """The greedy search keeps nodes float through the same converter: it goes first, from the best quantizer rung
    (a rung that gained more than a point), and the fallback after it keeps its nodes float too."""
    found = Int8Options(per_channel=False, float_nodes=("conv0", "rescale"))
    bases = []

    class Greedy(_Searching):
        def accuracy_controlled(self, control, base):
            bases.append(base)
            return [(GREEDY_RUNG, found)]

    scores = {b"per_channel=False, bias_correction=False": 20.0}  # the per-tensor rung gained; then the search gets 5
    recovery = recover(Format.TFLITE, Greedy(), Attempt("", Int8Options(), b"first", 40.0), budget=2.0,
                       evaluate=lambda data: (5.0 if b"'conv0', 'rescale'" in data and b"'a'" not in data else next(
                           (v for k, v in scores.items() if k in data and b"float_nodes=()" in data), 40.0), None),
                       control=CONTROL)
    names = list(recovery.tried)
    assert bases == [Int8Options(per_channel=False)]
    assert names[names.index("per-tensor") + 1] == f"per-tensor+{GREEDY_RUNG}"  # the last quantizer rung, then it
    fallback = [n for n in names if FLOAT_FALLBACK in n]
    assert fallback and recovery.tried[f"per-tensor+{GREEDY_RUNG}"] == 5.0
    assert all(n.startswith(f"per-tensor+{GREEDY_RUNG}+{FLOAT_FALLBACK}(") for n in fallback), fallback
    assert recovery.best.remedy == f"per-tensor+{GREEDY_RUNG}" and not recovery.within_budget


def test_onnxruntimes_int8_with_nncfs_float_nodes_comes_before_nncfs_own_artifact():
    """NNCF's QDQ placement runs several times slower than onnxruntime's own: NNCF's choice of nodes is tried in
    onnxruntime's quantizer first (on the best rung so far), and NNCF's artifact only when that misses."""
    def evaluate(data):
        if b"NNCF" in data:
            return 0.25, None
        return (nodes_score if b"'conv0', 'hswish0'" in data else 40.0), None

    nodes_score = 1.5
    fast = recover(Format.ONNX, _Searching(NNCF_FOUND, nodes_rung=True), Attempt("", Int8Options(), b"first", 40.0),
                   budget=2.0, evaluate=evaluate, control=CONTROL)
    assert list(fast.tried)[-1] == NNCF_NODES_RUNG and NNCF_RUNG not in fast.tried and fast.within_budget
    assert fast.best.remedy == NNCF_NODES_RUNG and not fast.best.options.searched
    assert fast.best.options.float_nodes == ("conv0", "hswish0")
    nodes_score = 9.0
    slow = recover(Format.ONNX, _Searching(NNCF_FOUND, nodes_rung=True), Attempt("", Int8Options(), b"first", 40.0),
                   budget=2.0, evaluate=evaluate, control=CONTROL)
    assert list(slow.tried)[-2:] == [NNCF_NODES_RUNG, NNCF_RUNG] and slow.tried[NNCF_NODES_RUNG] == 9.0
    assert slow.best.remedy == NNCF_RUNG and slow.within_budget


@pytest.mark.parametrize(("nncf_time", "kept"), [(0.5, NNCF_RUNG), (0.95, NNCF_NODES_RUNG), (3.5, NNCF_NODES_RUNG),
                                                 (None, NNCF_NODES_RUNG)])
def test_with_timing_both_search_rungs_are_tried_and_the_faster_within_the_budget_is_kept(nncf_time, kept):
    """NNCF's artifact replaces onnxruntime's only when it takes at most 90% of its time (SPEED_GAIN), as a speed
    rung would; both are within the budget here, onnxruntime's the more accurate. A timing that fails (None)
    keeps the first."""
    def evaluate(data):
        return (0.25 if b"NNCF" in data else 1.0 if b"'conv0', 'hswish0'" in data else 40.0), None

    timed = []

    def ratio(a, b):
        timed.append((a, b))
        if nncf_time is None:
            raise RuntimeError("the runtime could not time it")
        return nncf_time if b"NNCF" in b else 1.0

    recovery = recover(Format.ONNX, _Searching(NNCF_FOUND, nodes_rung=True),
                       Attempt("", Int8Options(), b"first", 40.0), budget=2.0, evaluate=evaluate, control=CONTROL,
                       ratio=ratio)
    assert list(recovery.tried)[-2:] == [NNCF_NODES_RUNG, NNCF_RUNG] and recovery.within_budget
    assert recovery.best.remedy == kept and len(timed) == 1 and b"NNCF" not in timed[0][0]


def test_a_failing_tflite_search_is_recorded_under_its_own_name():
    failing = recover(Format.TFLITE, _Searching(error=RuntimeError("no ranking")),
                      Attempt("", Int8Options(), b"first", 40.0), budget=2.0,
                      evaluate=lambda data: (40.0, None), control=CONTROL)
    assert failing.tried[GREEDY_RUNG] == float("inf") and NNCF_RUNG not in failing.tried


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
        rungs = dict(quantizer.accuracy_controlled(
            AccuracyControl(Labelled(x, y if labelled else None), max_drop=1.0), Int8Options(per_channel=False)))
        options = rungs[NNCF_RUNG]
        artifact = quantizer.quantize(options)
        if options.float_nodes:  # onnxruntime's int8 on the base options, NNCF's nodes (and their feeders) float
            nodes = rungs[NNCF_NODES_RUNG]
            assert list(rungs) == [NNCF_NODES_RUNG, NNCF_RUNG] and not nodes.per_channel and not nodes.searched
            assert set(options.float_nodes) <= set(nodes.float_nodes) <= {n.name for n in proto.graph.node}
            quantizer.quantize(nodes)
        else:
            assert list(rungs) == [NNCF_RUNG]
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


@pytest.fixture(scope="module")
def squeezed_path(tmp_path_factory):
    """A CNN whose own Rescaling (x / 127.5 - 1, built for 0-255 pixels) is fed 0-1 pixels, as many users feed
    keras.applications MobileNetV3Small: its inputs become [-1, -0.992], a large constant plus a tiny signal,
    which an 8-bit range that must hold 0 crushes (issue 28; this model is its small twin)."""
    from edgekit import _tf
    from edgekit.loading.data import load_digits

    keras = _tf.keras()
    layers = keras.layers
    keras.utils.set_random_seed(0)
    data = load_digits()
    model = keras.Sequential([
        layers.Input((8, 8, 1)), layers.Rescaling(1 / 127.5, -1, name="rescale"),
        layers.Conv2D(16, 3, padding="same", name="first_conv"), layers.BatchNormalization(), layers.ReLU(),
        layers.Conv2D(32, 3, padding="same", name="second_conv"), layers.BatchNormalization(), layers.ReLU(),
        layers.GlobalAveragePooling2D(), layers.Dense(10, activation="softmax", name="head")])
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(data.x[:1400], data.y[:1400], epochs=30, batch_size=32, verbose=0)
    norms = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    for layer in norms:  # batch statistics of so narrow a signal: the moving ones lag far behind after 30 epochs
        layer.momentum = 0.0
    model(data.x[:1400], training=True)
    path = tmp_path_factory.mktemp("squeezed") / "squeezed.h5"
    model.save(path)
    return path


def test_a_model_every_8_bit_rung_loses_is_recovered_by_accuracy_control_in_both_formats(squeezed_path, tmp_path):
    """Every 8-bit settings rung loses 50 points or more on a squeezed-input CNN. ONNX: bias correction recovers
    most of it (measured: 82.7 -> 4.7 points, the budget is 2); built on it, NNCF's nodes (the first convolution)
    and the nodes that feed it (Reshape, the Rescaling's Add) kept float in onnxruntime's int8, or NNCF's own
    artifact, whichever is faster, are within the budget. TFLite (no bias correction in the converter): edgekit's
    greedy search keeps the convolution and the Rescaling that feeds it (the error-ranked float fallback that came
    next before kept all six compute ops float)."""
    from edgekit import CompressConfig, Recipe, compress

    result = compress(squeezed_path, "digits", tmp_path / "out", progress=False,
                      config=CompressConfig(recipe=Recipe(quantize="int8")))
    assert result.source["accuracy"] >= 80 and any("Rescaling" in w for w in result.warnings)
    arts = {a.format.value: a for a in result.selected.artifacts}
    tflite, onnx = arts["tflite"], arts["onnx"]
    assert tflite.remedy.endswith(GREEDY_RUNG) and tflite.quantization_drop <= 2.0, tflite.remedies_tried
    assert onnx.quantization_drop <= 2.0, onnx.remedies_tried
    corrected = {name: onnx.remedies_tried.pop(name) for name in list(onnx.remedies_tried)
                 if name.endswith(BIAS_CORRECTION)}
    assert min(corrected.values()) < 0.5 * onnx.remedies_tried["default"], (corrected, onnx.remedies_tried)
    for art in (tflite, onnx):
        searched = (GREEDY_RUNG, NNCF_NODES_RUNG, NNCF_RUNG)
        assert all(score >= 50 for name, score in art.remedies_tried.items()
                   if BIAS_CORRECTION not in name and FLOAT_FALLBACK not in name
                   and not name.endswith(searched)), art.remedies_tried
    floats = tflite.quantizer_options["float_nodes"]
    assert any("first_conv" in n for n in floats) and len(floats) <= 3, floats
    assert not any("second_conv" in n or "head" in n for n in floats), floats
    if onnx.remedy.endswith(BIAS_CORRECTION):  # within the budget by itself on this CPU: nothing kept float
        assert not onnx.quantizer_options["float_nodes"] and onnx.quantizer_options["bias_correction"]
    elif onnx.remedy.endswith(NNCF_NODES_RUNG):  # fused by onnxruntime: the convolution, its Reshape, the Add
        assert onnx.quantizer_options["onnx_quantizer"] == "onnxruntime" and onnx.quantizer_options["bias_correction"]
        floats = onnx.quantizer_options["float_nodes"]
        assert len(floats) == 3 and any("rescale" in n for n in floats) and any("first_conv" in n for n in floats)
        assert onnx.remedies_tried[NNCF_RUNG] <= 2.0, onnx.remedies_tried
    else:  # NNCF's own artifact ran in at most 90% of the time of onnxruntime's
        assert onnx.remedy == NNCF_RUNG and onnx.quantizer_options["onnx_quantizer"] == "nncf", onnx.remedy
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {a["remedy"] for a in manifest["artifacts"]} == {tflite.remedy, onnx.remedy}


def test_the_greedy_search_extends_another_searchs_choice_when_it_misses_the_goal(cnn, digits):
    """NNCF's choice of nodes is the start of edgekit's greedy search in onnxruntime's quantizer: kept when it meets
    the goal (one measurement), extended by the group that recovers the accuracy when it does not."""
    from edgekit import _tf
    from edgekit.export.accuracy_control import greedy_float_nodes
    from edgekit.export.onnx import float_onnx

    keras = _tf.keras()
    keras.utils.set_random_seed(1)
    good = float_onnx(cnn).SerializeToString()
    bad = float_onnx(keras.models.clone_model(cnn)).SerializeToString()  # untrained: near chance
    control = AccuracyControl(Labelled(digits.x[:96], digits.y[:96]), max_drop=1.0)
    asked = []

    def quantize(names):
        asked.append(names)
        return good if {"start", "needed"} <= set(names) else bad

    nodes = greedy_float_nodes(quantize, [("other",), ("needed",), ("more", "feeder")], good, control, max_nodes=8,
                               start=("start",))
    assert nodes == ("start", "needed")
    assert asked[0] == ("start",)  # the start alone first, then every candidate on top of it
    assert {("start", "other"), ("start", "needed"), ("start", "more", "feeder")} <= set(asked)
    asked.clear()
    assert greedy_float_nodes(quantize, [("other",)], good, control, max_nodes=8, start=("start", "needed")) == (
        "start", "needed") and len(asked) == 1


def test_a_search_out_of_time_keeps_what_it_found_and_says_where_it_stopped(digits_cnn, cnn, digits):
    """NNCF ranks every group of quantizers a model has: on an untrained ConvNeXtTiny it was still ranking after 19
    minutes, and nothing bounded it. Each format's searches share a clock (CompressConfig.search_minutes)."""
    import time

    from edgekit.export.accuracy_control import SearchClock, SearchTimeLimit, accuracy_controlled, greedy_float_nodes
    from edgekit.export.onnx import float_onnx
    from edgekit.export.tuning import _stopped

    model, data = digits_cnn
    clock = SearchClock(1e-6)
    clock.start()
    time.sleep(0.01)
    with pytest.raises(SearchTimeLimit):  # raised from NNCF's validation, through NNCF
        accuracy_controlled(float_onnx(model), data.x[:64], Labelled(data.x[1200:1264], data.y[1200:1264]),
                            max_drop=1.0, input_name="input", clock=clock)
    assert clock.stopped == "NNCF's search"

    from edgekit import _tf

    keras = _tf.keras()
    keras.utils.set_random_seed(1)
    good = float_onnx(cnn).SerializeToString()
    bad = float_onnx(keras.models.clone_model(cnn)).SerializeToString()  # untrained: near chance
    control = AccuracyControl(Labelled(digits.x[:96], digits.y[:96]), max_drop=1.0, seconds=0.5)
    asked = []

    def slow(names):  # each measurement takes 0.3 s: the start's, then the first candidate's, then out of time
        asked.append(names)
        time.sleep(0.3)
        return bad

    control.clock.start()
    assert greedy_float_nodes(slow, [("a",), ("b",), ("c",)], good, control, max_nodes=8, start=("s",)) == ("s",)
    assert control.clock.stopped == "edgekit's greedy search" and asked == [("s",), ("s", "a")]
    assert _stopped(control) == ["the accuracy-controlled search stopped at its time limit (0.00833333 min) in "
                                 "edgekit's greedy search, keeping what it had found; a longer search time may find "
                                 "more"]
    assert _stopped(AccuracyControl(control.validation, max_drop=1.0)) == []


def test_a_search_out_of_time_is_a_failed_rung_and_the_ladder_goes_on():
    from edgekit.export.accuracy_control import SEARCH_SECONDS, SearchTimeLimit

    quantizer = _Searching(error=SearchTimeLimit("NNCF's search"))
    recovery = recover(Format.ONNX, quantizer, Attempt("", Int8Options(), b"d", 9.0), budget=1.0,
                       evaluate=lambda data: (9.0, None), control=CONTROL)
    assert recovery.tried[NNCF_RUNG] == float("inf") and WIDE_ACTIVATIONS in recovery.tried
    assert quantizer.searched[0].seconds == SEARCH_SECONDS == 900.0
