"""Quantization with accuracy control: NNCF's ``quantize_with_accuracy_control`` as a rung of the ONNX remedy ladder,
and the same greedy search on the TFLite converter's denylist (:func:`greedy_float_nodes`).

NNCF (OpenVINO's Neural Network Compression Framework, ONNX backend, no torch) quantizes the float model, ranks its
quantized operations by the accuracy each one costs on a labelled ranking subset, and reverts them to float one
group at a time, greedily, until the accuracy drop is within ``max_drop``. On Keras 3 MobileNetV3Small fed 0-1
pixels (its own ``Rescaling`` squeezes them into [-1, -0.992]) it kept the first convolution and the first
hard-swish float and lost 0.25 points where every onnxruntime rung lost 24-79 (issue 28).

The validation data is labelled samples outside the evaluation split the budget is judged on (the calibration
split, then fine-tuning samples); without labels the float model's own predictions stand in for them (the metric
is then top-1 agreement). Whatever NNCF returns is verified and scored by edgekit like every other rung.

NNCF's telemetry (``openvino-telemetry``, on by default) is switched off before NNCF is imported (:func:`_nncf`):
edgekit writes nothing outside its output and sends nothing anywhere.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.config import SEARCH_MINUTES

NNCF_RUNG = "nncf-accuracy-control"
"""The ONNX rung's name in the manifest's ``remedies_tried``."""
NNCF_NODES_RUNG = "nncf-float-nodes"
"""The ONNX rung tried before NNCF's own artifact: onnxruntime's int8 with the operations NNCF's search kept float
(and the nodes that feed them) kept float too. onnxruntime fuses its own QDQ placement into integer kernels; NNCF's
QDQ around the operations it reverts ran 3.1-3.9x the float32 time where onnxruntime's int8 ran 0.6-1.0x
(BENCHMARKS.md, "edgekit's int8 against its peers")."""
GREEDY_RUNG = "accuracy-control"
"""The TFLite rung's name: edgekit's own greedy search (:func:`greedy_float_nodes`), NNCF's algorithm on the
converter's denylist (NNCF has no TFLite backend)."""
VALIDATION_BATCH = 32
RANKING_SAMPLES = 128
"""Validation samples each candidate is ranked on, by both searches (NNCF's ``ranking_subset_size`` is 300 by
default)."""
MAX_CANDIDATES = 64
"""Candidate groups ranked at most (each is a re-quantization and a run on :data:`RANKING_SAMPLES` samples)."""
MAX_TRIALS = 16
"""Greedy steps at most, in both searches (NNCF's ``max_num_iterations``): each keeps the next ranked group float
and measures the whole validation split, so the time a search takes is bounded whatever the model's size."""


@dataclass(frozen=True)
class Labelled:
    """Samples and labels for an accuracy-controlled search (``y`` is ``None`` when the user has no labels)."""

    x: np.ndarray
    y: np.ndarray | None


SEARCH_SECONDS = 60.0 * SEARCH_MINUTES
"""How long one format's accuracy-controlled search may take by default. Its steps are bounded in number
(:data:`MAX_CANDIDATES`, :data:`MAX_TRIALS`), but NNCF ranks every group of quantizers the model has, each a
re-quantized model run on :data:`RANKING_SAMPLES` samples: on an untrained ConvNeXtTiny (28M parameters, 32x32
inputs) NNCF was still ranking 19 minutes into the compress, on 2 cores."""


class SearchTimeLimit(Exception):
    """A search ran past its :class:`SearchClock`'s limit."""


class SearchClock:
    """The time one format's accuracy-controlled searches may take together, from :meth:`start`; a search that
    passes it stops at its next measurement, keeping what it found (:attr:`stopped` says where)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.stopped: str | None = None
        self._deadline: float | None = None

    def start(self) -> None:
        if self._deadline is None:
            self._deadline = time.monotonic() + self.seconds

    def check(self, where: str) -> None:
        """Raise :class:`SearchTimeLimit` (and remember ``where``) when the time is up."""
        if self._deadline is not None and time.monotonic() > self._deadline:
            self.stopped = self.stopped or where
            raise SearchTimeLimit(where)


@dataclass(frozen=True)
class AccuracyControl:
    """What an accuracy-controlled search gets: labelled data, the drop (points) it may cost against the float
    model it quantizes, and how long it may take (seconds, for every search of one format together)."""

    validation: Labelled
    max_drop: float
    seconds: float = SEARCH_SECONDS
    clock: SearchClock = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "clock", SearchClock(self.seconds))


@dataclass(frozen=True)
class Controlled:
    """What NNCF returned: the quantized model and the operations it kept float (their names in its graph)."""

    data: bytes
    reverted: tuple[str, ...]


def _nncf() -> Any:
    """NNCF, imported with its telemetry off. Its ``NNCF_CI`` switch is not enough: NNCF builds its
    ``openvino_telemetry.Telemetry`` before it reads the switch, and that constructor writes a client ID under
    ``~/intel``. With ``openvino_telemetry`` unimportable, NNCF uses its own stub and nothing is written or sent."""
    if "nncf" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type] (None: the import fails)
        os.environ["NNCF_CI"] = "1"
    import nncf

    return nncf


class _Reverted(logging.Handler):
    """Collects the names of the operations NNCF reports reverted to float (its log is the only place it says)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "were reverted back to the floating-point precision" in message:
            self.names = [line.strip() for line in message.splitlines()[1:] if line.strip()]


def _predict(session: Any, x: np.ndarray, input_name: str, batch: int) -> np.ndarray:
    step = batch or VALIDATION_BATCH
    usable = len(x) - len(x) % batch if batch else len(x)
    return np.concatenate([np.asarray(session.run(None, {input_name: x[i:i + step]})[0])
                           for i in range(0, usable, step)])


def _session(model: Any) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def accuracy_controlled(model: Any, calibration: np.ndarray, validation: Labelled, *, max_drop: float,
                        input_name: str, batch: int = 0, clock: SearchClock | None = None) -> Controlled:
    """NNCF's accuracy-controlled int8 quantization of the float ONNX ``model`` (an ``onnx.ModelProto``): its
    top-1 accuracy on ``validation`` (percent) may drop at most ``max_drop`` points.

    ``batch``: the model's fixed batch dimension (0 when free); samples are fed in runs of that size. ``clock``:
    checked before each of NNCF's validations (:class:`SearchTimeLimit` ends the search: NNCF returns nothing
    part-way).

    >>> controlled = accuracy_controlled(proto, calibration, Labelled(x, y), max_drop=2.0,  # doctest: +SKIP
    ...                                  input_name="input")
    """
    nncf = _nncf()
    from nncf.common.logging import nncf_logger
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    step = batch or 1
    usable = len(calibration) - len(calibration) % step
    calibration_items = [calibration[i:i + step] for i in range(0, usable, step)]
    labels = validation.y
    if labels is None:  # no labels: the float model's own predictions (the metric becomes top-1 agreement)
        labels = _predict(_session(model), validation.x, input_name, batch).argmax(axis=-1)
    usable = len(validation.x) - len(validation.x) % step
    items = [(validation.x[i:i + step], labels[i:i + step]) for i in range(0, usable, step)]

    def validate(candidate: Any, data: Any) -> tuple[float, list[float]]:
        if clock is not None:
            clock.check("NNCF's search")
        session = _session(candidate)
        correct: list[float] = []
        for x, y in data:
            predicted = np.asarray(session.run(None, {input_name: x})[0]).reshape(len(x), -1).argmax(axis=-1)
            correct.extend(100.0 * (predicted == y).astype(np.float64))
        return (float(np.mean(correct)) if correct else 0.0), correct

    reverted = _Reverted()
    level = nncf_logger.level
    nncf_logger.addHandler(reverted)
    nncf_logger.setLevel(logging.INFO)
    quiet = [h for h in nncf_logger.handlers if h is not reverted]
    for handler in quiet:
        nncf_logger.removeHandler(handler)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            quantized = nncf.quantize_with_accuracy_control(
                model, nncf.Dataset(calibration_items, lambda item: {input_name: item}),
                nncf.Dataset(items, lambda item: {input_name: item[0]}), validate,
                max_drop=max(float(max_drop), 0.0), drop_type=nncf.DropType.ABSOLUTE,
                subset_size=len(calibration_items),
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                    max_num_iterations=MAX_TRIALS, ranking_subset_size=min(RANKING_SAMPLES, len(items))))
    finally:
        nncf_logger.removeHandler(reverted)
        for handler in quiet:
            nncf_logger.addHandler(handler)
        nncf_logger.setLevel(level)
    return Controlled(quantized.SerializeToString(), tuple(reverted.names))


def greedy_float_nodes(quantize: Callable[[tuple[str, ...]], bytes], candidates: Sequence[tuple[str, ...]],
                       float_data: bytes, control: AccuracyControl, *, max_nodes: int,
                       start: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Nodes to keep float, found as NNCF's accuracy control finds them: each candidate group (a node and the
    nodes that feed it, :func:`~edgekit.export.remedies.node_groups`: in a TFLite graph a node kept float still
    gets quantized inputs unless their producers are float too) is ranked by the accuracy the quantized model has
    with that group alone kept float (on :data:`RANKING_SAMPLES` validation samples; ties by the output's mean
    squared error against the float model), then groups are kept float in that order, one more a step, each step
    measured on the whole validation split, until the drop from the float model is within ``control.max_drop``
    (a step that does not raise the accuracy is undone), with at most ``max_nodes`` nodes; then every node the goal
    holds without goes back to int8 (:func:`_pruned`). ``quantize(nodes)``
    returns the artifact with ``nodes`` kept float; ``float_data`` is the float artifact of the same model.
    ``start``: nodes kept float from the first step (another search's choice, which the steps extend when it
    misses the goal; counted in ``max_nodes``).
    Each measurement checks ``control.clock``: out of time, the search returns the nodes it kept so far.

    It finds what an error ranking misses: a layer whose output is a large constant plus a tiny signal (a built-in
    ``Rescaling`` fed values far from its range) has a small relative error while the signal is gone.
    """
    from device_agents.serving.runtime import Model
    from edgekit.export.verify import load_probed

    x = control.validation.x
    reference = Model.load(float_data).predict(x)
    labels = control.validation.y if control.validation.y is not None else reference.argmax(axis=-1)

    def measure(nodes: tuple[str, ...], count: int) -> tuple[float, float]:
        control.clock.check("edgekit's greedy search")
        out = load_probed(quantize(nodes), x).predict(x[:count])
        correct = 100.0 * float(np.mean(out.reshape(len(out), -1).argmax(axis=-1) == labels[:count]))
        return correct, float(np.mean((out - reference[:count]) ** 2))

    goal = 100.0 * float(np.mean(reference.reshape(len(x), -1).argmax(axis=-1) == labels)) - control.max_drop
    kept = tuple(dict.fromkeys(start))
    ranked: dict[tuple[str, ...], tuple[float, float]] = {}
    try:
        best, _ = measure(kept, len(x))
        if best >= goal:
            return kept
        for group in dict.fromkeys(tuple(group) for group in candidates if len(group) + len(kept) <= max_nodes):
            try:
                ranked[group] = measure(tuple(dict.fromkeys((*kept, *group))), RANKING_SAMPLES)
            except SearchTimeLimit:
                raise
            except Exception:  # noqa: BLE001 (a node the quantizer cannot keep float is not a candidate)
                continue
        for group in sorted(ranked, key=lambda g: (-ranked[g][0], ranked[g][1]))[:MAX_TRIALS]:
            trial = tuple(dict.fromkeys((*kept, *group)))
            if trial == kept or len(trial) > max_nodes:
                continue
            accuracy, _ = measure(trial, len(x))
            if accuracy > best:
                kept, best = trial, accuracy
            if best >= goal:
                break
        return _pruned(kept, goal, measure, len(x)) if best >= goal else kept
    except SearchTimeLimit:  # out of time: what the trials found so far (the ranking alone keeps nothing)
        return kept


def _pruned(kept: tuple[str, ...], goal: float, measure: Callable[[tuple[str, ...], int], tuple[float, float]],
            count: int) -> tuple[str, ...]:
    """``kept`` less every node the goal holds without (a group brings in producers that may not need to be
    float): each is put back in int8 in turn, last kept first, and stays there when the accuracy holds."""
    for node in reversed(kept):
        trial = tuple(n for n in kept if n != node)
        if trial and measure(trial, count)[0] >= goal:
            kept = trial
    return kept
