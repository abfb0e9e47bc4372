"""Options for :func:`edgekit.compress`, as validated dataclasses with enums (no string mini-languages:
``structured`` takes ``(2, 4)``; the command line parses its own ``2:4`` syntax)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from edgekit.errors import InputError


class Quantization(str, Enum):
    """How the exported weights (and activations) are quantized."""

    NONE = "none"          # float32
    DYNAMIC = "dynamic"    # int8 weights, float activations
    FLOAT16 = "float16"    # float16 weights
    INT8 = "int8"          # full integer, calibrated on the user's data (post-training)
    QAT = "qat"            # full integer after quantization-aware fine-tuning


class Format(str, Enum):
    """Artifact formats edgekit exports."""

    TFLITE = "tflite"
    ONNX = "onnx"


class SizeMetric(str, Enum):
    """Which size the accuracy-budget search minimises."""

    GZIP_BYTES = "gzip_bytes"  # download size: what pruning shrinks
    BYTES = "bytes"            # size on disk / in memory
    LATENCY = "latency_us"     # single-sample latency in its runtime (median, ``CompressConfig.threads``)


class BatchNorm(str, Enum):
    """What fine-tuning (pruning, QAT) does with BatchNormalization layers; distillation re-estimates unless KEEP.

    ``reestimate`` (default): BN trains, then its moving statistics are recomputed from the fine-tuning data.
    ``freeze``: BN runs in inference mode while fine-tuning, then its statistics are recomputed.
    ``keep``: as Keras leaves it (with momentum 0.99-0.999 a short fine-tune leaves the statistics stale).
    The default was chosen by measurement: ``benchmarks/batchnorm.py`` (BENCHMARKS.md).
    """

    REESTIMATE = "reestimate"
    FREEZE = "freeze"
    KEEP = "keep"


def coerce_enum(cls: type[Enum], value: object, option: str) -> Enum:
    """``value`` as a member of ``cls`` (by member or value, case-insensitive); else InputError with the valid list."""
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).lower())
    except ValueError:
        valid = ", ".join(m.value for m in cls)
        raise InputError(f"unknown {option} {value!r}; valid values: {valid}") from None


def _structured(value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        m, n = (int(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise InputError(f"structured sparsity must be a pair (M, N) such as (2, 4), got {value!r}") from None
    return (m, n)


@dataclass(frozen=True)
class Recipe:
    """One way to compress a model: pruning, a distilled student and a quantization mode.

    >>> Recipe(prune=0.75, quantize="int8").name
    'prune75+int8'
    """

    prune: float | None = None
    structured: tuple[int, int] | None = None
    quantize: Quantization = Quantization.INT8
    student_width: float | None = None
    student: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantize", coerce_enum(Quantization, self.quantize, "quantization"))
        object.__setattr__(self, "structured", _structured(self.structured))
        if self.prune is not None and not 0.0 < float(self.prune) < 1.0:
            raise InputError(f"prune sparsity must be between 0 and 1 (exclusive), got {self.prune}")
        if self.structured is not None and self.structured != (2, 4):
            raise InputError(f"structured sparsity {self.structured[0]}:{self.structured[1]} is not supported; use 2:4")
        if self.structured is not None and self.prune is not None:
            raise InputError("give either a magnitude pruning sparsity or 2:4 structured sparsity, not both")
        if self.student_width is not None and not 0.0 < float(self.student_width) < 1.0:
            raise InputError(f"student width must be between 0 and 1 (exclusive), got {self.student_width}")
        if self.student_width is not None and self.student is not None:
            raise InputError("give either a student width or a student model file, not both")
        if self.student is not None and not Path(self.student).exists():
            raise InputError(f"student model {self.student} does not exist")

    @property
    def name(self) -> str:
        parts = []
        if self.student_width is not None:
            parts.append(f"student{self.student_width:g}")
        if self.student is not None:
            parts.append(f"student:{Path(self.student).stem}")
        if self.prune is not None:
            parts.append(f"prune{round(self.prune * 100)}")
        if self.structured is not None:
            parts.append("prune2:4")
        parts.append("float32" if self.quantize is Quantization.NONE else self.quantize.value)
        return "+".join(parts)

    @property
    def distills(self) -> bool:
        return self.student_width is not None or self.student is not None

    @property
    def prunes(self) -> bool:
        return self.prune is not None or self.structured is not None


SEARCH_RECIPES: tuple[Recipe, ...] = (
    Recipe(quantize=Quantization.FLOAT16),
    Recipe(quantize=Quantization.DYNAMIC),
    Recipe(quantize=Quantization.INT8),
    Recipe(quantize=Quantization.QAT),
    Recipe(prune=0.5, quantize=Quantization.INT8),
    Recipe(prune=0.75, quantize=Quantization.INT8),
    Recipe(structured=(2, 4), quantize=Quantization.INT8),
    Recipe(student_width=0.5, quantize=Quantization.INT8),
)
"""The candidates tried by an accuracy-budget search when the user names no recipe."""


@dataclass(frozen=True)
class TrainingConfig:
    """Fine-tuning and distillation settings (small defaults suit models the size of the demo's)."""

    finetune_epochs: int = 4
    # pruning fine-tunes for at least this many optimizer steps (more epochs than finetune_epochs on a small
    # dataset): a sparsity ramp over ~150 steps removes weights faster than training recovers them (digits CNN,
    # 80% sparse: +1.39 points lost after 148 steps, -0.28 after 296; MobileNetV2 0.35, 85%: +3.62 after 111,
    # +0.56 after 222; BENCHMARKS.md, "prune+int8")
    prune_min_steps: int = 300
    distill_epochs: int = 12
    batch_size: int = 32
    learning_rate: float = 1e-3          # fine-tuning (pruning; QAT uses a tenth of it)
    distill_learning_rate: float = 3e-3  # a student learns from scratch: higher than fine-tuning
    temperature: float = 3.0
    distill_alpha: float = 0.5  # weight of the hard-label loss; the rest goes to the soft targets
    batchnorm: BatchNorm = BatchNorm.REESTIMATE

    def __post_init__(self) -> None:
        object.__setattr__(self, "batchnorm", coerce_enum(BatchNorm, self.batchnorm, "batchnorm mode"))
        for name in ("finetune_epochs", "distill_epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.prune_min_steps) < 0:
            raise InputError(f"prune_min_steps must be >= 0, got {self.prune_min_steps}")
        for name in ("learning_rate", "distill_learning_rate"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise InputError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")


DEFAULT_INT8_BUDGET = 2.0
"""Points of accuracy an int8 or QAT artifact may lose when no ``max_accuracy_drop`` is given."""

SEARCH_MINUTES = 15.0
"""How long one format's accuracy-controlled search may take when no ``search_minutes`` is given
(:mod:`edgekit.export.accuracy_control`: NNCF ranks every group of quantizers a model has)."""


class BudgetBasis(str, Enum):
    """What an accuracy budget is measured against."""

    QUANTIZATION = "quantization"  # what quantizing cost: an int8/QAT artifact against the float model it came from
    SOURCE = "source"              # every artifact against the source model (what pruning or a student cost too)


@dataclass(frozen=True)
class Budget:
    """The accuracy budget, the one place that says what it measures, its floor and how it is told.

    With ``max_accuracy_drop`` (:attr:`BudgetBasis.SOURCE`) every candidate is judged by its drop from the source
    model. Without one (:attr:`BudgetBasis.QUANTIZATION`), an explicit recipe's int8 and QAT artifacts may lose
    :data:`DEFAULT_INT8_BUDGET` points to quantizing (against the float model they were quantized from): what
    pruning or a student cost is the user's to judge, and other recipes are not judged.

    >>> Budget.of(CompressConfig()).describe()
    'int8 and QAT artifacts may lose at most 2 points to quantizing (against the float model they came from)'
    >>> Budget.of(CompressConfig(max_accuracy_drop=1)).score(accuracy_drop=1.5, quantization_drop=0.2)
    1.5
    """

    points: float
    basis: BudgetBasis

    @classmethod
    def of(cls, config: CompressConfig) -> Budget:
        """The budget of a compression."""
        if config.max_accuracy_drop is None:
            return cls(DEFAULT_INT8_BUDGET, BudgetBasis.QUANTIZATION)
        return cls(float(config.max_accuracy_drop), BudgetBasis.SOURCE)

    @property
    def against_source(self) -> bool:
        return self.basis is BudgetBasis.SOURCE

    def score(self, *, accuracy_drop: float | None, quantization_drop: float | None) -> float | None:
        """The points an artifact is judged by: its drop from the source, or what quantizing cost it."""
        return accuracy_drop if self.against_source else quantization_drop

    def allows(self, score: float | None) -> bool:
        return score is not None and score <= self.points

    def remedy_can_help(self, *, accuracy_drop: float, quantization_drop: float, min_gain: float) -> bool:
        """Over the budget in a way a quantizer remedy can help: on what quantizing cost; or, against the source,
        when quantizing cost at least ``min_gain`` points of the drop."""
        if not self.against_source:
            return quantization_drop > self.points
        return accuracy_drop > self.points and quantization_drop >= min_gain

    def floor(self, *, source_accuracy: float, float_accuracy: float) -> float:
        """The score below which no quantizer option can bring an artifact: what its float model already lost."""
        return source_accuracy - float_accuracy if self.against_source else 0.0

    def judges(self, quantization: Quantization) -> bool:
        """Whether a candidate of this quantization is judged at all (every one is, against the source)."""
        return self.against_source or quantization in (Quantization.INT8, Quantization.QAT)

    def line(self, source_accuracy: float) -> float | None:
        """The accuracy the budget allows, where it is one line for every artifact (against the source)."""
        return source_accuracy - self.points if self.against_source else None

    def describe(self) -> str:
        if self.against_source:
            return f"at most {self.points:g} points below the source"
        return (f"int8 and QAT artifacts may lose at most {self.points:g} points to quantizing (against the float "
                "model they came from)")


@dataclass(frozen=True)
class CompressConfig:
    """Everything :func:`edgekit.compress` does beyond the model and the data.

    ``recipe`` ``None`` means: search :data:`SEARCH_RECIPES` when ``max_accuracy_drop`` is set,
    else post-training int8.

    >>> CompressConfig(recipe=Recipe(prune=0.75), formats=("tflite",)).formats
    (<Format.TFLITE: 'tflite'>,)
    """

    recipe: Recipe | None = None
    formats: tuple[Format, ...] = (Format.TFLITE, Format.ONNX)
    max_accuracy_drop: float | None = None
    int8_io: bool = False
    select_by: SizeMetric = SizeMetric.GZIP_BYTES
    seed: int = 0
    training: TrainingConfig = field(default_factory=TrainingConfig)
    search: tuple[Recipe, ...] = SEARCH_RECIPES
    threads: int = 1  # interpreter threads for verification and latency (1: comparable across machines)
    search_minutes: float = SEARCH_MINUTES  # how long one format's accuracy-controlled search may take (remedies)

    def __post_init__(self) -> None:
        if not 1 <= int(self.threads) <= 256:
            raise InputError(f"threads must be between 1 and 256, got {self.threads}")
        if not 0 < float(self.search_minutes) <= 24 * 60:
            raise InputError(f"the search time must be more than 0 and at most 1440 minutes, got "
                             f"{self.search_minutes}")
        formats = (self.formats,) if isinstance(self.formats, (str, Format)) else tuple(self.formats)
        formats = tuple(coerce_enum(Format, f, "format") for f in formats)
        if not formats:
            raise InputError(f"no format asked for; give one or more of: {', '.join(f.value for f in Format)}")
        object.__setattr__(self, "formats", tuple(dict.fromkeys(formats)))
        object.__setattr__(self, "select_by", coerce_enum(SizeMetric, self.select_by, "size metric"))
        if self.max_accuracy_drop is not None and not float(self.max_accuracy_drop) >= 0:
            raise InputError(f"the maximum accuracy drop must be >= 0 points, got {self.max_accuracy_drop}")

    @property
    def budget(self) -> Budget:
        """The accuracy budget (:class:`Budget`): what it measures, its points, how it is told."""
        return Budget.of(self)

    def candidates(self) -> tuple[Recipe, ...]:
        if self.recipe is not None:
            return (self.recipe,)
        if self.budget.against_source:
            return self.search
        return (Recipe(quantize=Quantization.INT8),)
