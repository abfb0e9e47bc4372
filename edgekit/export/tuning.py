"""The int8 tuning driver: what edgekit does with a post-training int8 artifact once it is measured. Over the budget,
walk the format's remedy ladder; slower than float32, its speed rungs; within the budget, its size rungs; a QAT
``.onnx``, measured against the format's own quantizer on the QAT-tuned weights. The ladders themselves are in
:mod:`edgekit.export.remedies`; the budget (:class:`~edgekit.config.Budget`) decides what every rung is scored by.

An artifact is tuned in place: the driver reads and sets an artifact result's documented fields (``data``,
``accuracy``, ``remedy``, ``speed_tried``, ...; :class:`~edgekit.artifacts.results.ArtifactResult`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekit._progress import Progress
from edgekit.config import Budget, Format, Quantization
from edgekit.export import exporter
from edgekit.export.accuracy_control import SEARCH_SECONDS, AccuracyControl, Labelled
from edgekit.export.remedies import MIN_GAIN

QAT_REQUANTIZE = (Format.ONNX,)
"""Formats whose QAT export is measured against their own int8 quantizer run on the QAT-tuned weights: tf2onnx's
QAT graph keeps float ops between QDQ pairs (unfolded BatchNormalization, padding, weights off the int8 grid),
which onnxruntime runs unfused (MobileNetV2 0.35: 2.7x the float32 time, BENCHMARKS.md)."""
QAT_REQUANTIZED = "onnxruntime-int8-of-qat-weights"


@dataclass(frozen=True)
class TuningContext:
    """What the driver needs from the compression it serves."""

    budget: Budget
    calibration: np.ndarray
    int8_io: bool
    progress: Progress
    source_accuracy: float
    verify: Callable[[bytes, str, Quantization, Any], Any]  # (data, name, quantization, model) -> verification
    time_ratio: Callable[[bytes, bytes], float]             # b's single-sample time over a's, side by side
    time_blocks: Callable[[bytes, bytes], list[float]]      # the same, each alternating block's ratio
    float32_data: Callable[[Format], bytes | None]          # the source's float32 artifact in a format
    # labelled samples for a format's accuracy-controlled search (never the evaluation split)
    validation: Labelled | None = None
    search_seconds: float = SEARCH_SECONDS  # how long a format's accuracy-controlled search may take


@dataclass(frozen=True)
class Rescued:
    """An int8 artifact found by the ladder when the defaults' did not run: its bytes, its verification, the rung,
    its quantizer options and every rung's score (``inf``: did not run)."""

    data: bytes
    check: Any
    remedy: str
    options: dict
    tried: dict[str, float]
    note: str


def _stopped(control: AccuracyControl | None) -> list[str]:
    """What the user should hear when a format's accuracy-controlled search ran out of time (nothing otherwise)."""
    if control is None or control.clock.stopped is None:
        return []
    return [f"the accuracy-controlled search stopped at its time limit ({control.seconds / 60:g} min) in "
            f"{control.clock.stopped}, keeping what it had found; a longer search time may find more"]


def _first_line(exc: Exception) -> str:
    from device_agents.errors import first_line

    return first_line(exc)[:200]


class Int8Tuner:
    """Remedy, speed and size rungs for one compression's int8 artifacts (:mod:`edgekit.export.remedies`).

    >>> tuner = Int8Tuner(context)                                                  # doctest: +SKIP
    >>> for what, step in tuner.steps(art, model, twin, Quantization.INT8, 97.0, "int8 tflite"):  # doctest: +SKIP
    ...     step()
    """

    def __init__(self, context: TuningContext) -> None:
        self.context = context

    def steps(self, art: Any, model: Any, float_model: Any, quantization: Quantization, float_accuracy: float | None,
              name: str) -> list[tuple[str, Callable[[], None]]]:
        """The tuning steps an artifact gets, each named for the note written when it cannot run."""
        steps: list[tuple[str, Callable[[], None]]] = []
        if quantization is Quantization.INT8 and art.quantization_drop is not None:
            if not art.remedies_tried and self.context.budget.remedy_can_help(
                    accuracy_drop=art.accuracy_drop, quantization_drop=art.quantization_drop, min_gain=MIN_GAIN):
                steps.append(("remedies", lambda: self._remedy(art, model, name, float_accuracy)))
            steps.append(("speed rungs", lambda: self._speed(art, model, name, float_accuracy)))
            steps.append(("size rungs", lambda: self._shrink(art, model, name, float_accuracy)))
        if quantization is Quantization.QAT and art.format in QAT_REQUANTIZE and float_accuracy is not None:
            steps.append(("requantizing the QAT weights",
                          lambda: self._qat_requantize(art, float_model, name, float_accuracy)))
        return steps

    def _qat_requantize(self, art: Any, twin: Any, name: str, float_accuracy: float) -> None:
        """Measure the format's own int8 quantizer on the QAT-tuned float weights against the QAT export, and keep
        it when it is as accurate (within half a point) and faster, or more accurate by more than half a point."""
        from edgekit.export.remedies import SPEED_GAIN, Int8Options

        spec = exporter(art.format)
        with self.context.progress.step(f"requantize {name}"), \
                spec.int8(twin, calibration=self.context.calibration, int8_io=self.context.int8_io) as quantizer:
            data = quantizer.quantize(Int8Options())
        check = self.context.verify(data, name, Quantization.INT8, twin)
        ratio = self.context.time_ratio(art.data, data)
        art.speed_tried = {QAT_REQUANTIZED: round(ratio, 3)}
        gain = check.accuracy - art.accuracy
        if gain > 0.5 or (gain >= -0.5 and ratio <= SPEED_GAIN):
            from edgekit.export.remedies import Attempt

            art.notes.append(f"the QAT export ran {1 / ratio:.2f}x the time of the format's own int8 quantizer on the "
                             f"QAT-tuned weights, which scores {gain:+.2f} points against it: the latter is kept")
            art.speed_remedy = QAT_REQUANTIZED
            self._adopt(art, Attempt(QAT_REQUANTIZED, Int8Options(), data, 0.0, check), float_accuracy)

    def _scorer(self, model: Any, name: str, float_accuracy: float) -> Callable[[bytes], tuple[float, Any]]:
        """An int8 artifact's score for the rungs, as the budget measures it; with its verification."""

        def evaluate(data: bytes) -> tuple[float, Any]:
            check = self.context.verify(data, name, Quantization.INT8, model)
            return self.context.budget.score(accuracy_drop=self._drop(check),
                                             quantization_drop=float_accuracy - check.accuracy), check

        return evaluate

    def _score(self, art: Any) -> float:
        return self.context.budget.score(accuracy_drop=art.accuracy_drop, quantization_drop=art.quantization_drop)

    def _drop(self, check: Any) -> float | None:
        return None if check.accuracy is None else self.context.source_accuracy - check.accuracy

    def _remedy(self, art: Any, model: Any, name: str, float_accuracy: float) -> None:
        """Walk the format's remedy ladder (:mod:`edgekit.export.remedies`); keep the best attempt in ``art``."""
        from edgekit.export.remedies import Attempt, Int8Options, recover

        spec = exporter(art.format)
        control = self._control(float_accuracy)
        with self.context.progress.step(f"remedies {name}"), \
                spec.int8(model, calibration=self.context.calibration, int8_io=self.context.int8_io) as quantizer:
            recovery = recover(art.format, quantizer, Attempt("", Int8Options(), art.data, self._score(art)),
                               budget=self.context.budget.points, evaluate=self._scorer(model, name, float_accuracy),
                               control=control, ratio=self.context.time_ratio)
        art.notes.extend(_stopped(control))
        art.search_stopped = control.clock.stopped if control is not None else None
        art.remedies_tried = {k: round(float(v), 4) for k, v in recovery.tried.items()}
        best = recovery.best
        if not best.remedy:
            art.notes.append(f"int8 lost {art.accuracy_drop:.2f} points; no remedy did better")
            return
        art.remedy = best.remedy
        self._adopt(art, best, float_accuracy)
        art.notes.append(f"int8 with the quantizer's defaults lost {recovery.tried['default']:.2f} points; "
                         f"remedy {best.remedy} ({best.options.changes()}) loses {best.score:.2f}")

    def _control(self, float_accuracy: float) -> AccuracyControl | None:
        """What an accuracy-controlled search may cost against its float model: the budget less what that model
        already lost (against the source)."""
        if self.context.validation is None:
            return None
        floor = self.context.budget.floor(source_accuracy=self.context.source_accuracy, float_accuracy=float_accuracy)
        return AccuracyControl(self.context.validation, self.context.budget.points - floor,
                               seconds=self.context.search_seconds)

    def rescue(self, fmt: Format, model: Any, name: str, float_accuracy: float | None,
               failure: Exception) -> Rescued:
        """The format's int8 artifact with the quantizer's defaults does not run in its runtime (``failure``: LiteRT
        could not prepare it, XNNPACK refusing a node): a failed first rung. Walk the format's ladder for artifacts
        that run; the best one is returned with every rung's outcome (``inf``: did not run). When none runs, the
        error names the format and what was tried."""
        from edgekit.errors import ConversionError
        from edgekit.export.remedies import Attempt, Int8Options, recover

        scorer = self._scorer(model, name, float_accuracy if float_accuracy is not None else 0.0)

        def evaluate(data: bytes) -> tuple[float, Any]:
            score, check = scorer(data)
            return (0.0 if score is None or float_accuracy is None else score), check  # unlabelled: it runs

        spec = exporter(fmt)
        control = self._control(float_accuracy) if float_accuracy is not None else None
        with self.context.progress.step(f"remedies {name}"), \
                spec.int8(model, calibration=self.context.calibration, int8_io=self.context.int8_io) as quantizer:
            recovery = recover(fmt, quantizer, Attempt("", Int8Options(), b"", float("inf")),
                               budget=self.context.budget.points, evaluate=evaluate, control=control,
                               ratio=self.context.time_ratio, first_rungs=quantizer.runnable_rungs())
        tried = {k: round(float(v), 4) for k, v in recovery.tried.items()}
        best = recovery.best
        if not best.remedy:
            raise ConversionError(f"{failure}; no remedy rung ran either ({len(tried) - 1} tried: "
                                  f"{', '.join(list(tried)[1:])})")
        note = "; ".join([f"the int8 artifact of the quantizer's defaults did not run ({_first_line(failure)}); "
                          f"remedy {best.remedy} ({best.options.changes() or 'defaults'}) runs and loses "
                          f"{best.score:.2f}", *_stopped(control)])
        return Rescued(best.data, best.extra, best.remedy, best.options.as_dict(), tried, note)

    def _speed(self, art: Any, model: Any, name: str, float_accuracy: float) -> None:
        """When the int8 artifact runs slower than the source's float32 one (side by side), try the format's speed
        rungs (:data:`~edgekit.export.remedies.SPEED_LADDERS` and the quantizer's own for this model) and keep the
        fastest within the budget."""
        from edgekit.export.remedies import SLOWER, SPEED_LADDERS, speed_up

        spec = exporter(art.format)
        reference = self.context.float32_data(art.format)
        if reference is None:
            return
        self._against_float32(art, reference)
        extra_rungs = spec.speed_rungs(art.data)
        if art.float32_time_ratio <= SLOWER or (not SPEED_LADDERS[art.format] and not extra_rungs):
            return
        with self.context.progress.step(f"speed {name}"), \
                spec.int8(model, calibration=self.context.calibration, int8_io=self.context.int8_io) as quantizer:
            current = self._attempt(art, self._score(art))
            best, art.speed_tried = speed_up(art.format, quantizer, current, budget=self.context.budget.points,
                                             evaluate=self._scorer(model, name, float_accuracy),
                                             ratio=self.context.time_ratio, extra_rungs=extra_rungs)
        if best is not current:
            art.speed_remedy = best.remedy
            self._adopt(art, best, float_accuracy)
            self._against_float32(art, reference)
            art.notes.append(f"int8 ran slower than float32; {best.remedy} ({best.options.changes()}) runs "
                             f"{art.speed_tried[best.remedy]:.2f}x the time of the first int8 artifact")

    def _shrink(self, art: Any, model: Any, name: str, float_accuracy: float) -> None:
        """When the int8 artifact is within the budget, try the format's size rungs
        (:data:`~edgekit.export.remedies.SIZE_RUNGS`) and keep the smallest that per-channel weights buy no accuracy
        over and that is no slower."""
        from edgekit.export.remedies import shrink

        score = self._score(art)
        if not self.context.budget.allows(score):
            return
        spec = exporter(art.format)
        with self.context.progress.step(f"size {name}"), \
                spec.int8(model, calibration=self.context.calibration, int8_io=self.context.int8_io) as quantizer:
            current = self._attempt(art, score)
            floor = self.context.budget.floor(source_accuracy=self.context.source_accuracy,
                                              float_accuracy=float_accuracy)
            best, art.size_tried = shrink(art.format, quantizer, current, budget=self.context.budget.points,
                                          floor=floor, evaluate=self._scorer(model, name, float_accuracy),
                                          ratio=self.context.time_ratio, extra_rungs=spec.size_rungs(art.data))
        if best is not current:
            before = len(art.data)
            art.size_remedy = best.remedy
            self._adopt(art, best, float_accuracy)
            reference = self.context.float32_data(art.format)
            if reference is not None:
                self._against_float32(art, reference)
            art.notes.append(f"size rung {best.remedy} kept: {before:,} -> {len(art.data):,} bytes, "
                             f"{best.score - current.score:+.2f} points against the artifact it replaced")

    def _against_float32(self, art: Any, reference: bytes) -> None:
        """Time ``art`` against the source's float32 artifact side by side: its ratio and every block's."""
        import statistics

        blocks = self.context.time_blocks(reference, art.data)
        art.float32_time_blocks = [round(b, 3) for b in blocks]
        art.float32_time_ratio = round(float(statistics.median(blocks)), 3)

    @staticmethod
    def _attempt(art: Any, score: float) -> Any:
        """``art`` as the attempt a speed or size ladder starts from: its remedy, its quantizer options, its bytes."""
        from edgekit.export.remedies import Attempt, Int8Options

        options = Int8Options(**art.quantizer_options) if art.quantizer_options else Int8Options()
        return Attempt(art.remedy, options, art.data, score)

    def _adopt(self, art: Any, attempt: Any, float_accuracy: float) -> None:
        """``art`` becomes ``attempt``'s artifact, with its verification's figures."""
        check = attempt.extra
        art.data, art.quantizer_options = attempt.data, attempt.options.as_dict()
        art.accuracy, art.accuracy_drop, art.top1_agreement = check.accuracy, self._drop(check), check.top1_agreement
        art.quantization_drop = float_accuracy - check.accuracy
        art.max_abs_diff, art.conversion_max_abs_diff = check.max_abs_diff, check.conversion_max_abs_diff
        art.inputs, art.outputs, art.latency_us = check.inputs, check.outputs, check.latency_us
