"""One candidate recipe, run: its model built, an artifact per format exported, verified in its own runtime and
tuned; and the source's float32 artifacts every candidate is compared with."""

from __future__ import annotations

import gzip
import os
import time
from typing import Any

import numpy as np

from device_agents.errors import AgentError, first_line
from edgekit._progress import Progress
from edgekit.artifacts.results import ArtifactResult, CandidateResult
from edgekit.compression.models import ModelFactory
from edgekit.config import CompressConfig, Format, Quantization, Recipe
from edgekit.errors import ConversionError, EdgeKitError
from edgekit.export import exporter
from edgekit.export.accuracy_control import Labelled
from edgekit.export.tuning import Int8Tuner, TuningContext
from edgekit.export.verify import float_tolerance, verify
from edgekit.loading.data import Splits
from edgekit.loading.models import LoadedModel, accuracy, predict

_INTEGER = (Quantization.INT8, Quantization.QAT, Quantization.DYNAMIC)


class CandidateRunner:
    """Runs one recipe: its Keras model (:class:`~edgekit.compression.models.ModelFactory`), an artifact per format,
    each verified in its own runtime and tuned (:class:`~edgekit.export.tuning.Int8Tuner`)."""

    def __init__(self, loaded: LoadedModel, splits: Splits, source_out: np.ndarray, source_accuracy: float,
                 config: CompressConfig, progress: Progress) -> None:
        self.loaded, self.splits, self.source_out = loaded, splits, source_out
        self.source_accuracy, self.config, self.progress = source_accuracy, config, progress
        self._cache: dict[tuple, tuple] = {}
        self.models = ModelFactory(loaded, splits, config, progress)
        self.tuner = Int8Tuner(TuningContext(
            budget=config.budget, calibration=splits.calibration.x, int8_io=config.int8_io, progress=progress,
            source_accuracy=source_accuracy, verify=self._verify, time_ratio=self._time_ratio,
            time_blocks=self._time_blocks, float32_data=self._float32_data,
            validation=_validation(splits), search_seconds=60.0 * config.search_minutes))

    def run(self, recipe: Recipe, *, keep_going: bool) -> CandidateResult:
        start = time.perf_counter()
        result = CandidateResult(recipe)
        try:
            try:
                model, float_model, result.layer_sparsity = self.models.build(recipe)
                result.params = int(float_model.count_params()) if hasattr(float_model, "count_params") \
                    else self.loaded.params
                result.keras_model = float_model
                result.artifacts, result.format_errors = self._export_all(model, float_model, recipe)
                result.skipped_layers = self.models.skipped.get(recipe.name, {})
            except EdgeKitError:
                raise
            except Exception as exc:  # a library (tfmot, a converter) failed on this model and recipe
                if os.environ.get("EDGEKIT_DEBUG") == "1":
                    raise
                raise ConversionError(f"{recipe.name} failed: {type(exc).__name__}: {_reason(exc)}") from None
        except EdgeKitError as exc:
            if not keep_going:
                raise
            result.error = str(exc)
        result.seconds = time.perf_counter() - start
        return result

    def float32_reference(self, candidates: list[CandidateResult]) -> dict[str, dict[str, float]]:
        """The source model's float32 artifact per format (bytes, gzip bytes, single-sample latency in its runtime):
        what every candidate is compared with."""
        from edgekit.export.verify import measure_latency

        plain = next((c for c in candidates if c.recipe == Recipe(quantize=Quantization.NONE) and c.artifacts), None)
        if plain is not None:
            return {a.format.value: {"bytes": a.bytes, "gzip_bytes": a.gzip_bytes, "latency_us": a.latency_us}
                    for a in plain.artifacts}
        reference = {}
        for fmt in self.config.formats:
            data = self._float32_data(fmt)
            if data is None:  # the format failed for every candidate too: nothing to compare
                continue
            try:
                latency = measure_latency(data, self.splits.evaluation.x[:1], threads=self.config.threads)
            except AgentError:
                continue
            reference[fmt.value] = {"bytes": len(data), "gzip_bytes": len(gzip.compress(data, 9, mtime=0)),
                                    "latency_us": latency}
        return reference

    def _float32_data(self, fmt: Format) -> bytes | None:
        """The source model's float32 artifact in ``fmt`` (converted once), or ``None`` when its converter fails."""
        key = ("float32", fmt)
        if key not in self._cache:
            try:
                with self.progress.step(f"float32 reference {fmt.value}"):
                    data, _ = exporter(fmt).convert(self.loaded.source, quantization=Quantization.NONE,
                                                    calibration=self.splits.calibration.x, int8_io=False)
            except EdgeKitError:
                data = None
            self._cache[key] = (data,)
        return self._cache[key][0]

    def _export_all(self, model: Any, float_model: Any,
                    recipe: Recipe) -> tuple[list[ArtifactResult], dict[str, str]]:
        """Every format's artifact; a format whose converter fails is recorded and the others still written
        (when every format fails, the first failure is raised)."""
        artifacts, errors = [], {}
        for fmt in self.config.formats:
            try:
                artifacts.append(self._export(model, float_model, recipe, fmt))
            except ConversionError as exc:
                errors[fmt.value] = str(exc)
        if not artifacts:
            raise ConversionError(next(iter(errors.values())))
        return artifacts, errors

    def _export(self, model: Any, float_model: Any, recipe: Recipe, fmt: Format) -> ArtifactResult:
        from edgekit.optimize.prune import overall_sparsity

        spec = exporter(fmt)
        calibration = self.splits.calibration.x
        name = f"{recipe.name} {fmt.value}"
        with self.progress.step(f"export {name}"):
            data, notes = spec.convert(model, quantization=recipe.quantize, calibration=calibration,
                                       int8_io=self.config.int8_io)
        float_accuracy = self._float_accuracy(float_model)
        rescued = None
        try:
            check = self._verify(data, name, recipe.quantize, model)
        except ConversionError as exc:  # e.g. LiteRT could not prepare it: int8 has other rungs to try
            if recipe.quantize is not Quantization.INT8:
                raise
            rescued = self.tuner.rescue(fmt, model, name, float_accuracy, exc)
            data, check = rescued.data, rescued.check
            notes = [*notes, rescued.note]
        sparsity = overall_sparsity(float_model) if hasattr(float_model, "layers") else 0.0
        art = ArtifactResult(fmt, spec.filename, data, recipe.quantize, sparsity, check.accuracy,
                             self._drop(check), check.top1_agreement, check.max_abs_diff,
                             check.conversion_max_abs_diff, check.tolerance, check.runtime, check.inputs,
                             check.outputs, notes, latency_us=check.latency_us)
        if rescued is not None:
            art.remedy, art.quantizer_options, art.remedies_tried = rescued.remedy, rescued.options, rescued.tried
        if recipe.quantize in _INTEGER and check.accuracy is not None and float_accuracy is not None:
            art.quantization_drop = float_accuracy - check.accuracy
        steps = self.tuner.steps(art, model, float_model, recipe.quantize, float_accuracy, name)
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 (the artifact stands as measured; the budget still judges it)
                if os.environ.get("EDGEKIT_DEBUG") == "1":
                    raise
                art.notes.append(f"{what} could not run: {type(exc).__name__}: {_reason(exc)}")
        return art

    def _float_accuracy(self, float_model: Any) -> float | None:
        if self.splits.evaluation.y is None:
            return None
        return accuracy(self._outputs(float_model), self.splits.evaluation.y)

    def _verify(self, data: bytes, name: str, quantization: Quantization, model: Any) -> Any:
        return verify(data, name=name, quantization=quantization, x=self.splits.evaluation.x,
                      y=self.splits.evaluation.y, source_outputs=self.source_out,
                      converted_outputs=self._outputs(model), tolerance_rule=float_tolerance(quantization),
                      threads=self.config.threads)

    def _drop(self, check: Any) -> float | None:
        return None if check.accuracy is None else self.source_accuracy - check.accuracy

    def _outputs(self, model: Any) -> np.ndarray:
        if model is self.loaded.source:
            return self.source_out
        key = ("outputs", id(model))
        if key not in self._cache:
            self._cache[key] = (predict(model, self.splits.evaluation.x), model)  # keep model alive: id stays
        return self._cache[key][0]

    def _time_blocks(self, a: bytes, b: bytes) -> list[float]:
        """Each alternating block's ratio of b's single-sample time over a's."""
        from edgekit.export.verify import latency_ratios

        return latency_ratios(a, b, self.splits.evaluation.x[:1], threads=self.config.threads)

    def _time_ratio(self, a: bytes, b: bytes) -> float:
        """b's single-sample time over a's, side by side (:func:`~edgekit.export.verify.latency_ratio`)."""
        from edgekit.export.verify import latency_ratio

        return latency_ratio(a, b, self.splits.evaluation.x[:1], threads=self.config.threads)


VALIDATION_SAMPLES = 1024
"""At most this many labelled samples for the accuracy-controlled search: the calibration split, then fine-tuning
samples (both disjoint from the evaluation split; 256 alone left a search within the budget on them and 1.6 points
over it on the evaluation split)."""


def _validation(splits: Splits) -> Labelled:
    """The accuracy-controlled search's labelled samples (never the evaluation split)."""
    parts = [splits.calibration, splits.finetune]
    if any(part.y is None for part in parts):
        return Labelled(splits.calibration.x, None)
    x = np.concatenate([part.x for part in parts])[:VALIDATION_SAMPLES]
    y = np.concatenate([part.y for part in parts])[:VALIDATION_SAMPLES]
    return Labelled(x, y)


def _reason(exc: BaseException) -> str:
    """The telling line of a library's long message: its last line naming an error, else its first."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    telling = [line for line in lines if "Error" in line or "not supported" in line]
    return (telling[-1] if telling else first_line(exc))[:240]
