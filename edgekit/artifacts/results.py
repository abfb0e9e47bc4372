"""What a compression produced, as the report, the manifest and the CLI read it: each artifact measured in its own
runtime, each candidate recipe, and the result of a whole compression."""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.config import Budget, CompressConfig, Format, Quantization, Recipe


@dataclass
class ArtifactResult:
    """One exported file, measured in its own runtime."""

    format: Format
    filename: str
    data: bytes = field(repr=False)
    quantization: Quantization
    sparsity: float
    accuracy: float | None
    accuracy_drop: float | None
    top1_agreement: float
    max_abs_diff: float              # vs the source model
    conversion_max_abs_diff: float   # vs the Keras model it was converted from
    tolerance: float | None          # on conversion_max_abs_diff, for float artifacts
    runtime: str
    inputs: list
    outputs: list
    notes: list[str]
    latency_us: float = 0.0                 # median single-sample time in its runtime
    float32_latency_us: float | None = None  # the source's float32 artifact in the same runtime
    float32_bytes: int | None = None  # the source's float32 artifact in the same format
    # post-training int8 over the budget: the remedy kept ("" = the quantizer's defaults), its quantizer
    # options, and every remedy tried -> its accuracy drop (empty when the defaults were within the budget)
    # int8/QAT/dynamic: accuracy of the float model it was quantized from minus its own (what quantizing cost)
    quantization_drop: float | None = None
    remedy: str = ""
    quantizer_options: dict[str, Any] = field(default_factory=dict)
    remedies_tried: dict[str, float] = field(default_factory=dict)
    # where the accuracy-controlled search stopped at its time limit (None: it did not run out of time)
    search_stopped: str | None = None
    # int8 slower than float32: the speed rung kept ("" = none) and each rung's time over the first int8 artifact's
    # (inf: the rung did not run)
    speed_remedy: str = ""
    speed_tried: dict[str, float] = field(default_factory=dict)
    # int8 within the budget: the size rung kept ("" = none) and each rung's drop, bytes and time over the artifact's
    size_remedy: str = ""
    size_tried: dict[str, dict[str, float]] = field(default_factory=dict)
    # post-training int8: its time over the source's float32 artifact's, timed side by side (alternating blocks)
    float32_time_ratio: float | None = None
    float32_time_blocks: list[float] = field(default_factory=list)  # the side-by-side blocks' ratios behind it

    @property
    def search_stopped_words(self) -> str:
        """Where its accuracy-controlled search ran out of time, as the report and a budget error say it ("" when
        it did not)."""
        if not self.search_stopped:
            return ""
        return f"the accuracy-controlled search stopped at its time limit in {self.search_stopped}"

    @property
    def time_vs_float32(self) -> float | None:
        """Its time over the source's float32 artifact's in the same runtime: the side-by-side ratio where one was
        measured, else the ratio of the two medians (measured apart)."""
        if self.float32_time_ratio is not None:
            return self.float32_time_ratio
        return self.latency_us / self.float32_latency_us if self.float32_latency_us else None

    @property
    def slower_than_float32(self) -> bool:
        """Slower than the float32 artifact of the source in the same runtime: by more than 10%, or by more than
        the side-by-side measurement's own spread (:func:`~edgekit.export.remedies.slower_by_spread`)."""
        from edgekit.export.remedies import SLOWER, slower_by_spread

        ratio = self.time_vs_float32
        return ratio is not None and (ratio > SLOWER or slower_by_spread(self.float32_time_blocks))

    @property
    def larger_than_float32(self) -> bool:
        """More bytes than the source's float32 artifact in the same format (an unrolled recurrent model's int8
        graph: its quantization parameters outweigh its weights)."""
        return self.float32_bytes is not None and self.bytes > self.float32_bytes

    @property
    def bytes(self) -> int:
        return len(self.data)

    @property
    def gzip_bytes(self) -> int:
        return len(gzip.compress(self.data, compresslevel=9, mtime=0))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class CandidateResult:
    """One recipe: its artifacts (one per format) or the error that stopped it."""

    recipe: Recipe
    artifacts: list[ArtifactResult] = field(default_factory=list)
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    params: int | None = None
    error: str | None = None
    seconds: float = 0.0
    within_budget: bool | None = None
    keras_model: Any = field(default=None, repr=False)  # the float model behind the artifacts
    format_errors: dict[str, str] = field(default_factory=dict)  # format -> why its converter failed
    # technique ("prune", "qat") -> layer -> why the technique left that layer as it was
    skipped_layers: dict[str, dict[str, str]] = field(default_factory=dict)

    def size(self, metric: str) -> float:
        """``metric`` (bytes, gzip_bytes, latency_us) of the first format's artifact."""
        return getattr(self.artifacts[0], metric)

    @property
    def slower_than_float32(self) -> list[str]:
        """The formats whose artifact runs slower than the source's float32 artifact in the same runtime."""
        return [a.format.value for a in self.artifacts if a.slower_than_float32]

    @property
    def worst_drop(self) -> float | None:
        drops = [a.accuracy_drop for a in self.artifacts if a.accuracy_drop is not None]
        return max(drops) if drops else None

    @property
    def worst_quantization_drop(self) -> float | None:
        """The most accuracy quantizing cost any of its artifacts (vs the float model it was quantized from)."""
        drops = [a.quantization_drop for a in self.artifacts if a.quantization_drop is not None]
        return max(drops) if drops else None


@dataclass
class CompressResult:
    """What :func:`compress` did: the source, every candidate, the one selected, the output folder."""

    source: dict[str, Any]
    candidates: list[CandidateResult]
    selected: CandidateResult | None
    config: CompressConfig
    out: Path | None = None
    manifest: dict[str, Any] | None = None
    data_info: dict[str, Any] = field(default_factory=dict)
    # format -> the source's float32 artifact: bytes, gzip_bytes, latency_us
    reference: dict[str, dict[str, float]] = field(default_factory=dict)
    # what the user should hear about the data and the model (e.g. data outside the model's own preprocessing range)
    warnings: list[str] = field(default_factory=list)
    # the calibration data's reference statistics (device_agents.serving.stats.reference_of), for drift
    data_reference: dict[str, Any] | None = None

    @property
    def budget(self) -> Budget:
        """The budget the candidates were judged by."""
        return self.config.budget

    @property
    def evaluated(self) -> int:
        """How many samples every accuracy was measured on (the evaluation split)."""
        return int(self.data_info.get("evaluation", 0))

    def noise_margin(self, candidate: CandidateResult) -> float | None:
        """The 95% margin (points) of ``candidate``'s worst drop (:func:`~edgekit.artifacts.uncertainty.drop_margin`,
        from its least-agreeing artifact)."""
        from edgekit.artifacts.uncertainty import drop_margin

        agreements = [a.top1_agreement for a in candidate.artifacts if a.top1_agreement is not None]
        return drop_margin(min(agreements), self.evaluated) if agreements and self.evaluated else None

    def verdict_within_noise(self, candidate: CandidateResult) -> str:
        """A sentence when ``candidate``'s verdict (within the budget or not) is closer to the budget than the
        evaluation can tell; empty otherwise."""
        from edgekit.artifacts.uncertainty import within_noise

        budget, margin = self.budget, self.noise_margin(candidate)
        if not budget.judges(candidate.recipe.quantize) or margin is None:
            return ""
        score = budget.score(accuracy_drop=candidate.worst_drop, quantization_drop=candidate.worst_quantization_drop)
        if not within_noise(score, budget.points, margin):
            return ""
        return (f"{candidate.recipe.name}'s drop of {score:.2f} points is within {margin:.2f} points (95%, "
                f"{self.evaluated} evaluation samples) of the {budget.points:g}-point budget: the evaluation cannot "
                "tell which side it is on; a larger evaluation set would")
