"""What edgekit tries when a post-training int8 artifact loses more accuracy than the budget allows.

Each format has a ladder of remedies (:data:`LADDERS`): the real quantizer's own options, tried in order,
each measured in the artifact's runtime; the first within the budget wins. When none is, the format's
:data:`STAGES` follow: an accuracy-controlled search keeps nodes float greedily by the accuracy each recovers on
labelled calibration data (:mod:`edgekit.export.accuracy_control`: NNCF's for ONNX, the same algorithm on the
converter's denylist for TFLite); a float fallback gives the best settings found so far the nodes whose
quantization hurts most (ranked by how much each one adds to the relative error of the intermediate tensors,
float vs quantized, as Intel Neural Compressor ranks them), 1, 2, 4 ... groups at a time, up to
:data:`MAX_FLOAT_NODES` nodes. Last comes :data:`WIDE_ACTIVATIONS`: int8 weights with 16-bit activations,
accurate but slower than float32.

The quantizers themselves live with their formats: :class:`edgekit.export.onnx.OnnxInt8` (onnxruntime's
``quantize_static``) and :class:`edgekit.export.tflite.TfliteInt8` (the TFLite converter, calibrated once,
re-quantized with ``mlir_quantize`` as TensorFlow's quantization debugger does; its entropy and percentile rungs
write onnxruntime's histogram calibrators' ranges into the calibrated model, :func:`edgekit.export.tflite.clip_ranges`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Protocol

import numpy as np

from edgekit.config import Format
from edgekit.export.accuracy_control import GREEDY_RUNG, NNCF_RUNG

if TYPE_CHECKING:
    from edgekit.export.accuracy_control import AccuracyControl


class Calibration(str, Enum):
    """How activation ranges are taken from the calibration data (onnxruntime's calibration methods)."""

    MINMAX = "minmax"
    MOVING_AVERAGE = "moving-average"  # min-max, each tensor's range the mean of each sample's (CalibMovingAverage)
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


class IntType(str, Enum):
    """An integer type of quantized activations or weights (onnxruntime's U8S8, S8S8, U8U8; A16W8)."""

    INT8 = "int8"
    UINT8 = "uint8"
    INT16 = "int16"  # activations only: onnxruntime's QInt16, the TFLite converter's 16x8 mode


class TfliteQuantizer(str, Enum):
    """Which library quantizes a ``.tflite`` (its float32 file, for the LiteRT Quantizer)."""

    CONVERTER = "converter"              # the TFLite converter's post-training quantization (what edgekit does first)
    LITERT = "litert-quantizer"          # the LiteRT Quantizer (ai-edge-quantizer), recipe static_wi8_ai8


class OnnxQuantizer(str, Enum):
    """Which library quantizes an ``.onnx``."""

    ONNXRUNTIME = "onnxruntime"  # onnxruntime's quantize_static (what edgekit does first)
    NNCF = "nncf"                # NNCF's quantize_with_accuracy_control (:mod:`edgekit.export.accuracy_control`)


class OnnxFormat(str, Enum):
    """How onnxruntime writes a quantized graph."""

    QDQ = "qdq"              # QuantizeLinear/DequantizeLinear pairs around float ops, fused by the runtime
    QOPERATOR = "qoperator"  # QLinearConv, QLinearMatMul ... written out


@dataclass(frozen=True)
class Int8Options:
    """One way to run a format's int8 quantizer. The defaults are what edgekit does first.

    >>> Int8Options(calibration=Calibration.ENTROPY).changes()
    'entropy calibration'
    """

    calibration: Calibration = Calibration.MINMAX
    # U8S8 (onnxruntime's default): x86 VNNI's vpdpbusd and AVX2's vpmaddubsw multiply u8 by s8 natively;
    # ARM64 runs it with its dot-product instructions. S8S8 is converted on x86 (slower, measured)
    activations: IntType = IntType.UINT8
    weights: IntType = IntType.INT8
    reduce_range: bool = False  # 7-bit weights: onnxruntime's remedy for int16 saturation on x86 without VNNI
    per_channel: bool = True
    bias_correction: bool = False  # ONNX: each Conv/Gemm bias moved by its mean output error (bias_correction.py)
    onnx_format: OnnxFormat = OnnxFormat.QDQ
    float_nodes: tuple[str, ...] = ()  # kept in float (their names in the float graph)
    float_ops: tuple[str, ...] = ()  # TFLite op types kept in float (the converter's denylisted ops)
    # ONNX op types whose weights onnxruntime's static (QDQ) quantizer leaves float, quantized after it by its
    # dynamic quantizer: int8 weights, activations quantized at run time (LSTM -> DynamicQuantizeLSTM)
    dynamic_ops: tuple[str, ...] = ()
    tflite_quantizer: TfliteQuantizer = TfliteQuantizer.CONVERTER
    onnx_quantizer: OnnxQuantizer = OnnxQuantizer.ONNXRUNTIME

    def __post_init__(self) -> None:
        for name, cls in (("calibration", Calibration), ("activations", IntType), ("weights", IntType),
                          ("onnx_format", OnnxFormat), ("tflite_quantizer", TfliteQuantizer),
                          ("onnx_quantizer", OnnxQuantizer)):
            object.__setattr__(self, name, cls(getattr(self, name)))
        object.__setattr__(self, "float_nodes", tuple(self.float_nodes))
        object.__setattr__(self, "float_ops", tuple(self.float_ops))
        object.__setattr__(self, "dynamic_ops", tuple(self.dynamic_ops))
        if self.weights is IntType.INT16:
            raise ValueError("weights are quantized to 8 bits (int8 or uint8); int16 is for activations")

    @property
    def wide_activations(self) -> bool:
        """16-bit activations (int8 weights): no integer kernels on CPUs run them (onnxruntime and XNNPACK go
        through float or reference kernels), so they are accurate but slower than float32."""
        return self.activations is IntType.INT16

    def changes(self) -> str:
        """What differs from the defaults, in words ("" for the defaults)."""
        base = Int8Options()
        words = []
        if self.calibration is not base.calibration:
            words.append(f"{self.calibration.value} calibration")
        if self.activations is not base.activations:
            words.append(f"{self.activations.value} activations")
        if self.weights is not base.weights:
            words.append(f"{self.weights.value} weights")
        if self.reduce_range:
            words.append("reduced range (7-bit weights)")
        if not self.per_channel:
            words.append("per-tensor weights")
        if self.bias_correction:
            words.append("bias correction")
        if self.onnx_format is not base.onnx_format:
            words.append(f"{self.onnx_format.value} format")
        if self.float_nodes:
            words.append(f"{len(self.float_nodes)} node(s) kept float: {', '.join(self.float_nodes)}")
        if self.float_ops:
            words.append(f"{', '.join(self.float_ops)} kept float")
        if self.dynamic_ops:
            words.append(f"{', '.join(self.dynamic_ops)} weights int8 by dynamic quantization")
        if self.tflite_quantizer is not base.tflite_quantizer:
            words.append("the LiteRT Quantizer")
        if self.onnx_quantizer is not base.onnx_quantizer:
            words.insert(0, "NNCF's accuracy control")
        return "; ".join(words)

    @property
    def float_fallback(self) -> bool:
        """Whether nodes can be kept float on top of these options (the converter's denylists; not yet through the
        LiteRT Quantizer's per-op recipes)."""
        return self.tflite_quantizer is TfliteQuantizer.CONVERTER and self.onnx_quantizer is OnnxQuantizer.ONNXRUNTIME

    @property
    def searched(self) -> bool:
        """Found by a search on labelled data (NNCF's accuracy control): no option can be changed on top of it
        without repeating the search, so speed and size rungs leave it as it is."""
        return self.onnx_quantizer is OnnxQuantizer.NNCF

    def as_dict(self) -> dict:
        return {"calibration": self.calibration.value, "activations": self.activations.value,
                "weights": self.weights.value,
                "reduce_range": self.reduce_range, "per_channel": self.per_channel,
                "bias_correction": self.bias_correction,
                "onnx_format": self.onnx_format.value, "float_nodes": list(self.float_nodes),
                "float_ops": list(self.float_ops), "dynamic_ops": list(self.dynamic_ops),
                "tflite_quantizer": self.tflite_quantizer.value,
                "onnx_quantizer": self.onnx_quantizer.value}


@dataclass(frozen=True)
class Remedy:
    """One rung of a ladder: a name (recorded in the manifest) and the quantizer options it sets."""

    name: str
    options: Int8Options


LADDERS: dict[Format, tuple[Remedy, ...]] = {
    Format.ONNX: (
        # min-max ranges averaged over the samples: values only a few inputs reach are clipped, as the LiteRT
        # Quantizer's calibration clips them; as cheap as min-max. It kept EfficientNetB0's .onnx in 8 bits (-0.70
        # points where min-max lost 3.48 and the other 8-bit rungs 2.09-9.06; BENCHMARKS.md, "int8 remedies")
        Remedy("moving-average-calibration", Int8Options(calibration=Calibration.MOVING_AVERAGE)),
        Remedy("entropy-calibration", Int8Options(calibration=Calibration.ENTROPY)),
        Remedy("percentile-calibration", Int8Options(calibration=Calibration.PERCENTILE)),
        Remedy("reduce-range", Int8Options(reduce_range=True)),
        Remedy("s8s8", Int8Options(activations=IntType.INT8)),
        Remedy("u8u8", Int8Options(weights=IntType.UINT8)),
        Remedy("per-tensor", Int8Options(per_channel=False)),
        Remedy("qoperator", Int8Options(onnx_format=OnnxFormat.QOPERATOR)),
    ),
    Format.TFLITE: (
        # Google's successor to the converter's (deprecated) quantization; on EfficientNetB0 its full-int8 recipe
        # lost nothing where the converter lost 6.9 points (BENCHMARKS.md, "LiteRT Quantizer")
        Remedy("litert-quantizer", Int8Options(tflite_quantizer=TfliteQuantizer.LITERT)),
        # the converter's calibration with each range clipped by onnxruntime's histogram calibrators (the converter
        # has no such option): outliers in many samples but few positions, which averaged ranges keep
        Remedy("entropy-calibration", Int8Options(calibration=Calibration.ENTROPY)),
        Remedy("percentile-calibration", Int8Options(calibration=Calibration.PERCENTILE)),
        Remedy("per-tensor", Int8Options(per_channel=False)),
    ),
}
"""Format -> the quantizer options tried, in order, after the defaults (then the float fallback, then
:data:`WIDE_ACTIVATIONS`)."""

SPEED_LADDERS: dict[Format, tuple[tuple[str, dict[str, object]], ...]] = {
    Format.ONNX: (
        ("s8s8", {"activations": IntType.INT8}),
        ("reduce-range", {"reduce_range": True}),
        ("qoperator", {"onnx_format": OnnxFormat.QOPERATOR}),
    ),
    Format.TFLITE: (),
}
"""Format -> (name, option changes) tried when an int8 artifact runs slower than the float32 one: the changes
apply on top of the options kept for accuracy. Which is fastest depends on the model and the CPU (measured in
BENCHMARKS.md), so each is measured in the artifact's runtime; the fastest within the budget is kept. A quantizer
adds rungs of its own for the artifact at hand (:attr:`edgekit.export.Exporter.speed_rungs`: TFLite keeps float the
op types XNNPACK does not run in int8)."""
FLOAT_OPS = "float-ops"
SLOWER = 1.1  # an int8 artifact is slower than float32 when it takes more than this (10%: timing noise)
MIN_SLOWDOWN = 1.03
"""A slowdown the side-by-side blocks must all but agree on to be flagged below :data:`SLOWER`."""


def slower_by_spread(blocks: Sequence[float]) -> bool:
    """Slower than float32 beyond the measurement's own spread: the lower quartile of the alternating blocks'
    ratios (three blocks in four) is above :data:`MIN_SLOWDOWN`.

    >>> slower_by_spread([1.08, 1.09, 1.10, 1.11, 1.07, 1.12, 1.09, 1.10]), slower_by_spread([0.9, 1.3, 1.0, 1.2])
    (True, False)
    """
    import statistics

    return len(blocks) >= 4 and statistics.quantiles(blocks, n=4)[0] > MIN_SLOWDOWN
SPEED_GAIN = 0.9  # a rung replaces the artifact only if it takes at most this fraction of its time

SIZE_RUNGS: dict[Format, tuple[tuple[str, dict[str, object]], ...]] = {
    Format.ONNX: (("per-tensor", {"per_channel": False}),),
    Format.TFLITE: (("per-tensor", {"per_channel": False}),),
}
"""Format -> (name, option changes) tried on every int8 artifact within the budget to make it smaller: per-tensor
weights drop a float scale and an 8- (ONNX) or 64-bit (TFLite) zero point per output channel. On MobileNetV2 0.35
those took 93 KB of the 545 KB int8 ``.onnx`` and 168 KB of the 632 KB int8 ``.tflite`` (BENCHMARKS.md); per-tensor
weights lost nothing there. A rung is kept only where per-channel weights buy no accuracy (:data:`SIZE_TOLERANCE`)
and it is no slower (:data:`SLOWER`)."""
DYNAMIC_LSTM = "dynamic-lstm"
"""The ONNX size rung for LSTMs: onnxruntime's static quantizer has no QDQ rule for LSTM and leaves its weights
float (an LSTM(128) classifier's int8 ``.onnx`` was 301,221 bytes against 301,522 in float32); its dynamic quantizer
stores them int8 (compress kept the rung there: 85,288 bytes, 0.65x the float32 time on one thread)."""
SIZE_RUNG_WORDS = {
    "per-tensor": ("per-tensor weights", "per-channel weights bought no accuracy"),
    DYNAMIC_LSTM: ("its LSTM weights int8 by dynamic quantization", "onnxruntime's static quantizer leaves them float"),
}
"""Size rung -> (what the artifact was kept with, why), as the CLI and the report say it."""
SIZE_TOLERANCE = 0.5
"""Points: a size rung may score at most this much worse than the artifact it would replace (and stay within the
budget); more means per-channel weights buy accuracy, and accuracy comes before bytes."""

ENTROPY_BINS = (2048, 128)  # histogram bins, quantized bins of the KL (entropy) search (TensorRT's calibration)

RUNNABLE = "runnable-float-op"
"""The first rung where the defaults' int8 artifact does not run in its runtime: the op type whose int8 kernel fails
or crashes kept float, found by trying each (LiteRT aborts in ``allocate_tensors()`` on the converter's int8
SQUARED_DIFFERENCE of a Keras time-series Transformer's LayerNormalization; kept float, the rest runs in int8)."""
FLOAT_FALLBACK = "float-fallback"
BIAS_CORRECTION = "bias-correction"
WIDE_ACTIVATIONS = "int16-activations"
# the other rungs' changes serve 8-bit activations; 16 bits take min-max ranges (65,536 levels: nothing to clip)
# and per-channel weights (the converter's 16x8 mode has no per-tensor depthwise convolution)
WIDE_RUNGS: dict[Format, tuple[tuple[str, Int8Options], ...]] = {
    Format.ONNX: ((WIDE_ACTIVATIONS, Int8Options(activations=IntType.INT16)),),
    Format.TFLITE: (
        (WIDE_ACTIVATIONS, Int8Options(activations=IntType.INT16)),
        # where the converter's 16x8 mode fails (no 16x8 HARD_SWISH) or writes a file LiteRT aborts on (a Keras
        # transformer's), the LiteRT Quantizer's static_wi8_ai16 recipe ran (BENCHMARKS.md, "LiteRT Quantizer")
        (f"litert-quantizer+{WIDE_ACTIVATIONS}",
         Int8Options(activations=IntType.INT16, tflite_quantizer=TfliteQuantizer.LITERT)),
    ),
}
"""Format -> the last rungs, tried in order after the float fallback: int8 weights with 16-bit activations
(onnxruntime's A16W8 QDQ, the TFLite converter's 16x8 mode, then the LiteRT Quantizer's). They keep the int8
weights (EfficientNetB0: 3.0-3.6x smaller than float32) and recover models whose activations have outlier
channels in many layers (per-tensor 8-bit ranges crush the other channels; EfficientNet's swish and
squeeze-excite layers, BENCHMARKS.md), at the cost of speed: slower than float32, which the report flags."""
MAX_FLOAT_NODES = 8
MIN_GAIN = 1.0  # points: a remedy that gains less is noise; the float fallback starts from the defaults
SENSITIVITY_SAMPLES = 64  # calibration samples the sensitivity pass runs


class Int8Quantizer(Protocol):
    """A format's int8 quantizer, prepared once (converted, calibrated) and re-run with options."""

    def quantize(self, options: Int8Options) -> bytes: ...

    def sensitive_nodes(self, options: Int8Options) -> list[tuple[str, ...]]:
        """Groups of node names, most harmful when quantized with ``options`` first (:func:`rank_nodes`)."""
        ...

    def accuracy_controlled(self, control: AccuracyControl, base: Int8Options) -> Sequence[tuple[str, Int8Options]]:
        """The format's accuracy-controlled artifacts (a search on labelled data from ``base``'s options,
        :mod:`edgekit.export.accuracy_control`), the preferred first: (rung name, options whose :meth:`quantize`
        returns it); none when the search finds nothing to try."""
        ...

    def runnable_rungs(self) -> Sequence[tuple[str, Int8Options]]:
        """Where the defaults' artifact does not run in its runtime: the rung (:data:`RUNNABLE`) that keeps float the
        one op type whose int8 kernel fails or crashes, when keeping one does; none otherwise."""
        ...


@dataclass
class Attempt:
    """One quantized artifact and what it cost. ``score`` is its accuracy drop (lower is better)."""

    remedy: str  # "" for the defaults
    options: Int8Options
    data: bytes
    score: float
    extra: object = None  # what the caller's evaluation returned (its verification)


@dataclass
class Recovery:
    """The attempt kept and every attempt made (name -> score)."""

    best: Attempt
    tried: dict[str, float] = field(default_factory=dict)
    within_budget: bool = False


class Stage(str, Enum):
    """A stage of a remedy ladder, after the format's quantizer rungs (:data:`LADDERS`)."""

    BIAS = "bias"              # bias correction on the best rung's settings, then the defaults' (:func:`_corrected`)
    SEARCH = "search"          # the accuracy-controlled search (:mod:`edgekit.export.accuracy_control`)
    FALLBACK = "fallback"      # the error-ranked float fallback (:data:`FLOAT_FALLBACK`)
    WIDE = "wide"              # 16-bit activations (:data:`WIDE_RUNGS`)


STAGES: dict[Format, tuple[Stage, ...]] = {
    # NNCF quantizes with its own scheme and placement (its EfficientNetB0 .onnx ran 3.65-4.35x the float32 time,
    # most convolutions left float, where onnxruntime's own int8 ran 0.62-0.79x): onnxruntime's fallback first
    # bias correction first (edgekit/export/bias_correction.py: a model run per corrected node, so after the settings
    # rungs): on MobileNetV3Small fed 0-1 pixels (its own Rescaling squeezes them into [-1, -0.992]) it took
    # onnxruntime's int8 from 66.7% to 93.1% held-out (float32 95.8%), where every settings rung lost 6-63 points;
    # the stages after it build on it
    Format.ONNX: (Stage.BIAS, Stage.FALLBACK, Stage.SEARCH, Stage.WIDE),
    # the search keeps nodes float through the same converter, by what the budget measures: before the cruder
    # error-ranked fallback (which kept all six compute ops of a squeezed-input CNN float, where the search kept
    # its first convolution and Rescaling)
    Format.TFLITE: (Stage.SEARCH, Stage.FALLBACK, Stage.WIDE),
}
"""Format -> the stages tried, in order, after its quantizer rungs when none is within the budget."""
SEARCH_RUNGS: dict[Format, str] = {Format.ONNX: NNCF_RUNG, Format.TFLITE: GREEDY_RUNG}
"""Format -> the name its accuracy-controlled search is recorded under when the search itself fails."""


def recover(fmt: Format, quantizer: Int8Quantizer, first: Attempt, *, budget: float,
            evaluate: Callable[[bytes], tuple[float, object]],
            on_attempt: Callable[[str], None] | None = None, control: AccuracyControl | None = None,
            ratio: Callable[[bytes, bytes], float] | None = None,
            first_rungs: Sequence[tuple[str, Int8Options]] = ()) -> Recovery:
    """Walk ``fmt``'s ladder from ``first`` (the default artifact, over budget) until an attempt is within ``budget``:
    ``first_rungs`` (the quantizer's :meth:`~Int8Quantizer.runnable_rungs` where the defaults' artifact did not
    run), its quantizer rungs (:data:`LADDERS`), then its :data:`STAGES`.

    ``evaluate(data)`` returns the artifact's accuracy drop and whatever the caller wants kept with it.
    A remedy whose quantizer fails is recorded as failed (score ``inf``) and the ladder goes on. ``control``:
    labelled data for the format's accuracy-controlled search (NNCF's for ONNX, the same greedy search on the
    converter's denylist for TFLite); without it the search stage is skipped. ``ratio(a, b)``: b's time over
    a's, measured side by side; with it, every rung of the search is tried and the fastest within the budget
    kept (:func:`_controlled`).
    """
    recovery = Recovery(first, {"default": first.score})

    def attempt(name: str, options: Int8Options) -> Attempt | None:
        """The attempt, when it is within the budget."""
        if on_attempt is not None:
            on_attempt(name)
        try:
            data = quantizer.quantize(options)
            score, extra = evaluate(data)
        except Exception:  # noqa: BLE001 (a remedy the library cannot apply to this model is just not a remedy)
            recovery.tried[name] = float("inf")
            return None
        recovery.tried[name] = score
        made = Attempt(name, options, data, score, extra)
        if score < recovery.best.score:
            recovery.best = made
        recovery.within_budget = score <= budget
        return made if recovery.within_budget else None

    def failed(name: str) -> None:
        if on_attempt is not None:
            on_attempt(name)
        recovery.tried[name] = float("inf")

    if any(attempt(name, options) is not None for name, options in first_rungs):
        return recovery
    for remedy in LADDERS[fmt]:
        if attempt(remedy.name, remedy.options) is not None:
            return recovery
    for stage in STAGES[fmt]:
        gained = recovery.best.score < first.score - MIN_GAIN and recovery.best.options.float_fallback
        base = recovery.best if gained else first  # what the stage builds on
        if stage is Stage.SEARCH:
            found = None if control is None else _controlled(fmt, quantizer, control, base, attempt, failed, ratio)
            if found is not None:
                recovery.best, recovery.within_budget = found, True
            done = found is not None
        elif stage is Stage.BIAS:
            done = _corrected((base, first), attempt)
        elif stage is Stage.FALLBACK:
            done = _fallback(quantizer, base, attempt)
        else:
            done = any(attempt(name, options) is not None for name, options in WIDE_RUNGS[fmt])
        if done:
            return recovery
    recovery.within_budget = recovery.best.score <= budget
    return recovery


def _corrected(bases: Sequence[Attempt], attempt: Callable[[str, Int8Options], Attempt | None]) -> bool:
    """Bias correction (:data:`BIAS_CORRECTION`) on each of ``bases``' options in turn (the best rung's, then the
    defaults'), until one is within the budget."""
    tried: list[Int8Options] = []
    for base in bases:
        options = replace(base.options, bias_correction=True)
        if options in tried or base.options.bias_correction:
            continue
        tried.append(options)
        if attempt(_rung_name(base.remedy, BIAS_CORRECTION), options) is not None:
            return True
    return False


def _fallback(quantizer: Int8Quantizer, base: Attempt, attempt: Callable[[str, Int8Options], Attempt | None]) -> bool:
    """The error-ranked float fallback on top of ``base``: the most harmful node groups kept float (with the nodes
    ``base`` already keeps float), 1, 2, 4 ... groups, up to :data:`MAX_FLOAT_NODES` nodes."""
    try:
        groups = quantizer.sensitive_nodes(base.options)
    except Exception:  # noqa: BLE001 (no ranking on this model, e.g. its runtime cannot prepare it: no fallback)
        return False
    count = 1
    while count <= len(groups):
        nodes = tuple(dict.fromkeys((*base.options.float_nodes, *(n for group in groups[:count] for n in group))))
        if len(nodes) > MAX_FLOAT_NODES:
            return False
        if attempt(_rung_name(base.remedy, f"{FLOAT_FALLBACK}({len(nodes)})"),
                   replace(base.options, float_nodes=nodes)) is not None:
            return True
        count *= 2
    return False


def _rung_name(*parts: str) -> str:
    """A rung's name: the remedies it stacks, in order, joined by ``+`` (empty parts left out)."""
    return "+".join(part for part in parts if part)


def _settings_only(name: str) -> str:
    """``name`` (a :func:`_rung_name`) without its float-fallback part: the settings a rung that keeps other
    nodes float builds on."""
    return _rung_name(*(part for part in name.split("+") if not part.startswith(FLOAT_FALLBACK)))


def _controlled(fmt: Format, quantizer: Int8Quantizer, control: AccuracyControl, base: Attempt,
                attempt: Callable[[str, Int8Options], Attempt | None], failed: Callable[[str], None],
                ratio: Callable[[bytes, bytes], float] | None) -> Attempt | None:
    """The accuracy-controlled rungs, searching from ``base``'s options (the best rung so far, where nodes can be
    kept float on top of it): the one kept, or ``None`` when none is within the budget (a search that fails is a
    failed rung, named by :data:`SEARCH_RUNGS`). The rungs come in the quantizer's order, the one expected
    fastest first; with ``ratio`` each is tried and a later one replaces the kept one only if it takes at most
    :data:`SPEED_GAIN` of its time (NNCF's own artifact against onnxruntime's int8 with NNCF's nodes float: on
    a large model NNCF's QDQ placement is several times slower, on an 8x8 CNN it was the faster); without
    ``ratio``, the first within the budget."""
    search = getattr(quantizer, "accuracy_controlled", None)
    if search is None:
        return None
    control.clock.start()
    try:
        rungs = search(control, base.options)
    except Exception:  # noqa: BLE001 (a search the library cannot run on this model is a failed rung)
        failed(SEARCH_RUNGS[fmt])
        return None
    kept: Attempt | None = None
    for name, options in rungs:
        # a rung is named after what it builds on (a searched one builds on nothing); one that replaces base's
        # float nodes builds on its settings only
        keeps_nodes = set(base.options.float_nodes) <= set(options.float_nodes)
        built_on = "" if options.searched else base.remedy if keeps_nodes else _settings_only(base.remedy)
        made = attempt(_rung_name(built_on, name), options)
        if made is not None and (kept is None or _faster(kept, made, ratio)):
            kept = made
        if kept is not None and ratio is None:
            break
    return kept


def _faster(kept: Attempt, made: Attempt, ratio: Callable[[bytes, bytes], float] | None) -> bool:
    """Whether ``made`` takes at most :data:`SPEED_GAIN` of ``kept``'s time (a timing that fails: it does not)."""
    try:
        return ratio is not None and ratio(kept.data, made.data) <= SPEED_GAIN
    except Exception:  # noqa: BLE001 (both ran in evaluate; a timing failure keeps what was kept)
        return False


def speed_up(fmt: Format, quantizer: Int8Quantizer, current: Attempt, *, budget: float,
             evaluate: Callable[[bytes], tuple[float, object]], ratio: Callable[[bytes, bytes], float],
             extra_rungs: Sequence[tuple[str, dict[str, object]]] = ()) -> tuple[Attempt, dict[str, float]]:
    """Try ``fmt``'s speed rungs on top of ``current``'s options; return the fastest attempt within ``budget``
    (``current`` unless a rung takes at most :data:`SPEED_GAIN` of its time) and each rung's time ratio (``inf``:
    the rung did not run: its quantizer, runtime or timing raised).

    ``ratio(a, b)``: b's time over a's, measured side by side.
    """
    best, best_ratio, tried = current, 1.0, {}
    if current.options.wide_activations or current.options.searched:  # 16 bits: no rung makes them fast
        return best, tried
    for name, changes in (*SPEED_LADDERS[fmt], *extra_rungs):
        options = replace(current.options, **changes)
        if options == current.options:
            continue
        try:
            data = quantizer.quantize(options)
            score, extra = evaluate(data)
            time_ratio = ratio(current.data, data)
        except Exception:  # noqa: BLE001 (a rung the library cannot apply here is recorded as not run: inf)
            tried[name] = float("inf")
            continue
        tried[name] = round(time_ratio, 3)
        if score <= max(budget, current.score) and time_ratio <= SPEED_GAIN and time_ratio < best_ratio:
            best, best_ratio = Attempt(name, options, data, score, extra), time_ratio
    return best, tried


def shrink(fmt: Format, quantizer: Int8Quantizer, current: Attempt, *, budget: float, floor: float,
           evaluate: Callable[[bytes], tuple[float, object]], ratio: Callable[[bytes, bytes], float],
           extra_rungs: Sequence[tuple[str, dict[str, object]]] = ()) -> tuple[Attempt, dict[str, dict[str, float]]]:
    """Try ``fmt``'s size rungs (:data:`SIZE_RUNGS`, then ``extra_rungs``: the quantizer's own for this artifact,
    :attr:`edgekit.export.Exporter.size_rungs`) on top of ``current``'s options; return the smallest attempt
    that is within ``budget``, at most :data:`SIZE_TOLERANCE` points worse than ``current`` and no slower than it
    (``current`` when none is), and each rung's measurements (``drop``, ``bytes``, ``saved`` bytes, ``time`` over
    ``current``'s; only ``bytes`` when it was not smaller; ``{"ran": False}`` when it raised).

    ``floor``: the score of the float model ``current`` was quantized from. A quantized artifact that scores better
    than its float model does so by chance (MobileNetV2 0.35's int8 .tflite: one sample of 359), so ``current`` is
    credited with at most that score: per-tensor weights are not refused for losing what per-channel ones won by
    chance. ``ratio(a, b)``: b's time over a's, measured side by side.
    """
    best, tried = current, {}
    if current.options.wide_activations or current.options.searched:  # 16x8: no per-tensor depthwise conv
        return best, tried
    for name, changes in (*SIZE_RUNGS[fmt], *extra_rungs):
        options = replace(current.options, **changes)
        if options == current.options:
            continue
        try:
            data = quantizer.quantize(options)
            if len(data) >= len(best.data):
                tried[name] = {"bytes": len(data)}
                continue
            score, extra = evaluate(data)
            time_ratio = ratio(current.data, data)
        except Exception:  # noqa: BLE001 (a rung the library cannot apply here is recorded as not run)
            tried[name] = {"ran": False}
            continue
        tried[name] = {"drop": round(float(score), 4), "bytes": len(data), "saved": len(current.data) - len(data),
                       "time": round(time_ratio, 3)}
        if score <= budget and score <= max(current.score, floor) + SIZE_TOLERANCE and time_ratio <= SLOWER:
            best = Attempt(name, options, data, score, extra)
    return best, tried


def rank_nodes(nodes: Sequence[tuple[str, Sequence[str], Sequence[str]]],
               errors: dict[str, float]) -> list[tuple[str, ...]]:
    """Groups of node names, the group whose first node adds the most error first. A node adds its output's
    error minus the largest of its inputs' errors.

    ``nodes``: (name, input tensor names, output tensor names) in graph order; ``errors``: tensor name ->
    relative error of the quantized tensor vs the float one (tensors missing from it count as exact). Each
    group holds the node and the nodes that produce its inputs (:func:`_upstream`): a consumer whose
    quantized input is crushed (an outlier channel widening the range) is only helped when that input stays
    float too.
    """
    groups = node_groups(nodes)
    added: dict[str, float] = {}
    for name, inputs, outputs in nodes:
        out_error = max((errors.get(t, 0.0) for t in outputs), default=0.0)
        in_error = max((errors.get(t, 0.0) for t in inputs), default=0.0)
        added[name] = out_error - in_error
    return [groups[name] for name in sorted((n for n in added if added[n] > 1e-3), key=lambda n: -added[n])]


def node_groups(nodes: Sequence[tuple[str, Sequence[str], Sequence[str]]]) -> dict[str, tuple[str, ...]]:
    """Node name -> the node and the nodes that produce its inputs (:func:`_upstream`), in graph order: what must
    stay float with it for its inputs to reach it unquantized (``nodes`` as :func:`rank_nodes` takes them)."""
    producer = {out: name for name, _, outs in nodes for out in outs}
    inputs_of = {name: list(inputs) for name, inputs, _ in nodes}
    return {name: (name, *_upstream(name, inputs_of, producer)) for name, _, _ in nodes}


def _upstream(name: str, inputs_of: dict[str, list[str]], producer: dict[str, str]) -> list[str]:
    """The producers of ``name``'s inputs; through a pass-through producer (one input, itself produced, no
    constants: ReLU, pooling, reshape) the walk goes on up to the op that computed the values."""
    found = []
    for tensor in inputs_of[name]:
        node = producer.get(tensor)
        while node is not None and node not in found:
            found.append(node)
            ins = inputs_of[node]
            node = producer.get(ins[0]) if len(ins) == 1 else None
    return found


class ErrorSums:
    """Relative L2 error of quantized tensors against float ones, accumulated batch by batch (memory: one batch).

    >>> sums = ErrorSums()
    >>> sums.add("t", np.array([1.0, 2.0]), np.array([1.0, 1.0]))
    >>> round(sums.errors()["t"], 3)
    0.707
    """

    def __init__(self) -> None:
        self._diff: dict[str, float] = {}
        self._norm: dict[str, float] = {}

    def add(self, name: str, quantized: np.ndarray, reference: np.ndarray) -> None:
        if quantized.shape != reference.shape or not np.issubdtype(reference.dtype, np.floating):
            return
        self._diff[name] = self._diff.get(name, 0.0) + float(np.sum((quantized.astype(np.float64) - reference) ** 2))
        self._norm[name] = self._norm.get(name, 0.0) + float(np.sum(reference.astype(np.float64) ** 2))

    def errors(self) -> dict[str, float]:
        """Tensor name -> ||quantized - reference|| / ||reference|| (0 when both are zero)."""
        return {name: float(np.sqrt(d / self._norm[name])) if self._norm[name] > 0 else (0.0 if d == 0 else np.inf)
                for name, d in self._diff.items()}
