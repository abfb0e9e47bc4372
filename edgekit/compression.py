"""``edgekit.compress``: load, compress by recipe(s), export, verify, select, write.

The top of the compression path: it may import every package below it (``loading``, ``optimize``,
``export``, ``artifacts``), never ``federated`` or the package face ``edgekit``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.errors import AgentError, first_line
from edgekit import _tf
from edgekit._io import StagedDir
from edgekit._progress import Progress
from edgekit.config import CompressConfig, Format, Quantization, Recipe
from edgekit.errors import BudgetError, ConversionError, EdgeKitError
from edgekit.export import exporter
from edgekit.export.verify import float_tolerance, verify
from edgekit.loading.data import Dataset, Splits, fit_to_model, load_data, split
from edgekit.loading.models import LoadedModel, accuracy, ends_in_softmax, load_model, predict


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
    # int8 slower than float32: the speed rung kept ("" = none) and each rung's time over the first int8 artifact's
    speed_remedy: str = ""
    speed_tried: dict[str, float] = field(default_factory=dict)
    # int8 within the budget: the size rung kept ("" = none) and each rung's drop, bytes and time over the artifact's
    size_remedy: str = ""
    size_tried: dict[str, dict[str, float]] = field(default_factory=dict)
    # post-training int8: its time over the source's float32 artifact's, timed side by side (alternating blocks)
    float32_time_ratio: float | None = None

    @property
    def time_vs_float32(self) -> float | None:
        """Its time over the source's float32 artifact's in the same runtime: the side-by-side ratio where one was
        measured, else the ratio of the two medians (measured apart)."""
        if self.float32_time_ratio is not None:
            return self.float32_time_ratio
        return self.latency_us / self.float32_latency_us if self.float32_latency_us else None

    @property
    def slower_than_float32(self) -> bool:
        """Slower than the float32 artifact of the source in the same runtime (by more than 10%: timing noise)."""
        from edgekit.export.remedies import SLOWER

        ratio = self.time_vs_float32
        return ratio is not None and ratio > SLOWER

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


def compress(model: Any, data: str | Path | Dataset = "digits", out: str | Path | None = None, *,
             config: CompressConfig | None = None, eval_data: str | Path | Dataset | None = None,
             progress: bool = True) -> CompressResult:
    """Compress ``model`` into verified TFLite/ONNX artifacts and write them to ``out``.

    ``model``: a path (SavedModel folder, ``.h5``, ``.keras`` of tf-keras or Keras 3) or a Keras
    model object. ``data``: ``"digits"``, an ``.npz`` path with ``x`` (and ``y``), or a Dataset.

    >>> from edgekit import CompressConfig, Recipe, compress
    >>> result = compress("cnn.keras", "digits", "out",                     # doctest: +SKIP
    ...                   config=CompressConfig(recipe=Recipe(prune=0.75, quantize="int8")))
    >>> result.selected.artifacts[0].accuracy                               # doctest: +SKIP
    97.2
    """
    config = config or CompressConfig()
    # the output's staging folder exists before any work: an unwritable output is refused at once
    with StagedDir(out, kind="compress") if out is not None else nullcontext() as stage:
        result = _compress(model, data, eval_data, config, Progress(enabled=progress))
        if stage is not None:
            _write(result, stage)
    if result.selected is None and any(c.within_budget is False for c in result.candidates):
        best = min((c.worst_drop for c in result.candidates if c.worst_drop is not None), default=None)
        report = str(Path(out).absolute() / "report.md") if out is not None else None
        if config.max_accuracy_drop is not None:
            best_text = f"; the best candidate lost {best:.2f} points" if best is not None else ""
            message = f"no candidate kept the accuracy drop within {config.budget:g} points{best_text}"
        else:
            recipe = result.candidates[0].recipe
            cost = result.candidates[0].worst_quantization_drop
            message = (f"{recipe.name}: quantizing costs {cost:.2f} points of accuracy, more than "
                       f"the {config.budget:g} points int8 artifacts may lose when no budget is given, after every "
                       "remedy; give a larger accuracy budget to accept it"
                       + (", or try quantization-aware training (the qat recipe)"
                          if recipe.quantize is Quantization.INT8 else ""))
        raise BudgetError(message + (f"; see {report}" if report else ""), budget=config.budget, best_drop=best,
                          report=report)
    return result


def _compress(model: Any, data: str | Path | Dataset, eval_data: str | Path | Dataset | None,
              config: CompressConfig, bars: Progress) -> CompressResult:
    """Load, measure the source, run every candidate recipe, select."""
    raw = load_data(data)
    loaded = load_model(model)
    dataset, evaluation, labels = _labelled(loaded, raw, eval_data)
    splits = split(dataset, seed=config.seed, eval_data=evaluation)
    source_out = predict(loaded.source, splits.evaluation.x)
    source = {
        "path": loaded.path, "sha256": loaded.sha256, "format": loaded.source_format,
        "accuracy": accuracy(source_out, splits.evaluation.y), "params": loaded.params,
        "input": {"shape": [None, *loaded.input_shape], "dtype": loaded.input_dtype},
        "output": {"shape": [None, loaded.num_classes], "kind": "probabilities" if loaded.outputs_probabilities
                   else "logits"},
        "rebuild_max_abs_diff": loaded.rebuild_max_abs_diff,
    }
    data_info = {"name": raw.name, "samples": len(dataset), "labels": labels, "seed": config.seed,
                 "finetune": len(splits.finetune), "calibration": len(splits.calibration),
                 "evaluation": len(splits.evaluation)}
    runner = _CandidateRunner(loaded, splits, source_out, source["accuracy"], config, bars)
    recipes = config.candidates()
    bar = bars.bar(len(recipes), "candidates", unit="recipe")
    candidates = []
    for recipe in recipes:
        bar.set_postfix_str(recipe.name)
        candidates.append(runner.run(recipe, keep_going=len(recipes) > 1))
        bar.update(1)
    bar.close()
    reference = runner.float32_reference(candidates)
    for cand in candidates:  # what quantizing bought (or cost) in time, in the same runtime
        for art in cand.artifacts:
            art.float32_latency_us = reference.get(art.format.value, {}).get("latency_us")
            art.float32_bytes = reference.get(art.format.value, {}).get("bytes")
    result = CompressResult(source, candidates, _select(candidates, config), config, data_info=data_info)
    result.reference = reference
    return result


def _labelled(loaded: LoadedModel, raw: Dataset,
              eval_data: str | Path | Dataset | None) -> tuple[Dataset, Dataset | None, str]:
    """The data fitted to the model; without labels, the source model's predictions serve as labels."""
    dataset = fit_to_model(raw, loaded.input_shape, loaded.input_dtype, loaded.num_classes)
    evaluation = None
    if eval_data is not None:
        evaluation = fit_to_model(load_data(eval_data), loaded.input_shape, loaded.input_dtype, loaded.num_classes)
    if dataset.y is not None:
        return dataset, evaluation, "given"
    dataset = Dataset(dataset.x, predict(loaded.source, dataset.x).argmax(1), dataset.name)
    if evaluation is not None and evaluation.y is None:
        evaluation = Dataset(evaluation.x, predict(loaded.source, evaluation.x).argmax(1), evaluation.name)
    return dataset, evaluation, "source model predictions (no y in the data)"


class _CandidateRunner:
    """Builds each recipe's Keras model (reusing distilled and pruned models) and its artifacts."""

    def __init__(self, loaded: LoadedModel, splits: Splits, source_out: np.ndarray, source_accuracy: float,
                 config: CompressConfig, progress: Progress) -> None:
        self.loaded, self.splits, self.source_out = loaded, splits, source_out
        self.source_accuracy, self.config, self.progress = source_accuracy, config, progress
        self._cache: dict[tuple, tuple] = {}
        self._skipped: dict[str, dict[str, dict[str, str]]] = {}  # recipe -> technique -> layer -> why

    def run(self, recipe: Recipe, *, keep_going: bool) -> CandidateResult:
        start = time.perf_counter()
        result = CandidateResult(recipe)
        try:
            try:
                model, float_model, result.layer_sparsity = self._keras_model(recipe)
                result.params = int(float_model.count_params()) if hasattr(float_model, "count_params") \
                    else self.loaded.params
                result.keras_model = float_model
                result.artifacts, result.format_errors = self._export_all(model, float_model, recipe)
                result.skipped_layers = self._skipped.get(recipe.name, {})
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

    def _base(self, recipe: Recipe) -> tuple[Any, tuple]:
        from edgekit.optimize.distill import distill, thin_student

        if not recipe.distills:
            return self.loaded.source, ("teacher",)
        key = ("student", recipe.student_width, recipe.student)
        if key not in self._cache:
            _tf.set_seed(self.config.seed)
            teacher = self.loaded.trainable_model("distillation")
            if recipe.student is not None:
                student_loaded = load_model(recipe.student)
                student, student_probs = student_loaded.trainable_model("distillation"), \
                    student_loaded.outputs_probabilities
            else:
                student, student_probs = thin_student(teacher, recipe.student_width), self.loaded.outputs_probabilities
            distill(teacher, student, self.splits.finetune, training=self.config.training,
                    teacher_probabilities=self.loaded.outputs_probabilities, student_probabilities=student_probs,
                    progress=self.progress, seed=self.config.seed)
            self._cache[key] = (student, {})
        return self._cache[key][0], key

    def _keras_model(self, recipe: Recipe) -> tuple[Any, Any, dict[str, float]]:
        """The model to export, its float twin (differs for QAT) and its per-layer sparsity."""
        from edgekit.optimize.prune import layer_sparsity, prune
        from edgekit.optimize.qat import float_twin, quantize_aware

        base, key = self._base(recipe)
        sparsity: dict[str, float] = {}
        if base is self.loaded.source and (recipe.prunes or recipe.quantize is Quantization.QAT):
            base = self.loaded.trainable_model("pruning" if recipe.prunes else "quantization-aware training")
        if base is self.loaded.graph and self.loaded.graph is not None:  # post-training from the graph
            return base, base, {}
        probabilities = ends_in_softmax(base)
        if recipe.prunes:
            pkey = (*key, "prune", recipe.prune, recipe.structured)
            if pkey not in self._cache:
                pruned = prune(base, self.splits.finetune, sparsity=recipe.prune, structured=recipe.structured,
                               training=self.config.training, probabilities=probabilities,
                               progress=self.progress, seed=self.config.seed)
                self._cache[pkey] = (pruned.model, pruned.per_layer, pruned.skipped)
            base, sparsity, skipped = self._cache[pkey]
            self._skipped.setdefault(recipe.name, {})["prune"] = skipped
        else:
            sparsity = layer_sparsity(base)
        if recipe.quantize is Quantization.QAT:
            qat_model, skipped = quantize_aware(base, self.splits.finetune, training=self.config.training,
                                                probabilities=probabilities, progress=self.progress,
                                                preserve_sparsity=recipe.prunes, seed=self.config.seed)
            self._skipped.setdefault(recipe.name, {})["qat"] = skipped
            twin = float_twin(qat_model, base)
            return qat_model, twin, layer_sparsity(twin)
        return base, base, sparsity

    def _export(self, model: Any, float_model: Any, recipe: Recipe, fmt: Format) -> ArtifactResult:
        from edgekit.optimize.prune import overall_sparsity

        spec = exporter(fmt)
        calibration = self.splits.calibration.x
        name = f"{recipe.name} {fmt.value}"
        with self.progress.step(f"export {name}"):
            data, notes = spec.convert(model, quantization=recipe.quantize, calibration=calibration,
                                       int8_io=self.config.int8_io)
        check = self._verify(data, name, recipe.quantize, model)
        sparsity = overall_sparsity(float_model) if hasattr(float_model, "layers") else 0.0
        art = ArtifactResult(fmt, spec.filename, data, recipe.quantize, sparsity, check.accuracy,
                             self._drop(check), check.top1_agreement, check.max_abs_diff,
                             check.conversion_max_abs_diff, check.tolerance, check.runtime, check.inputs,
                             check.outputs, notes, latency_us=check.latency_us)
        float_accuracy = self._float_accuracy(float_model)
        if recipe.quantize in _INTEGER and check.accuracy is not None and float_accuracy is not None:
            art.quantization_drop = float_accuracy - check.accuracy
        steps = []
        if recipe.quantize is Quantization.INT8 and art.quantization_drop is not None:
            if self._over_budget(art.accuracy_drop, art.quantization_drop):
                steps.append(("remedies", lambda: self._remedy(art, model, name, float_accuracy)))
            steps.append(("speed rungs", lambda: self._speed(art, model, name, float_accuracy)))
            steps.append(("size rungs", lambda: self._shrink(art, model, name, float_accuracy)))
        if recipe.quantize is Quantization.QAT and fmt in QAT_REQUANTIZE and float_accuracy is not None:
            steps.append(("requantizing the QAT weights", lambda: self._qat_requantize(art, float_model, name,
                                                                                        float_accuracy)))
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 (the artifact stands as measured; the budget still judges it)
                if os.environ.get("EDGEKIT_DEBUG") == "1":
                    raise
                art.notes.append(f"{what} could not run: {type(exc).__name__}: {_reason(exc)}")
        return art

    def _qat_requantize(self, art: ArtifactResult, twin: Any, name: str, float_accuracy: float) -> None:
        """Measure the format's own int8 quantizer on the QAT-tuned float weights against the QAT export, and keep
        it when it is as accurate (within half a point) and faster, or more accurate by more than half a point."""
        from edgekit.export.remedies import SPEED_GAIN, Int8Options

        spec = exporter(art.format)
        with self.progress.step(f"requantize {name}"), \
                spec.int8(twin, calibration=self.splits.calibration.x, int8_io=self.config.int8_io) as quantizer:
            data = quantizer.quantize(Int8Options())
        check = self._verify(data, name, Quantization.INT8, twin)
        ratio = self._time_ratio(art.data, data)
        art.speed_tried = {QAT_REQUANTIZED: round(ratio, 3)}
        gain = check.accuracy - art.accuracy
        if gain > 0.5 or (gain >= -0.5 and ratio <= SPEED_GAIN):
            from edgekit.export.remedies import Attempt

            art.notes.append(f"the QAT export ran {1 / ratio:.2f}x the time of the format's own int8 quantizer on the "
                             f"QAT-tuned weights, which scores {gain:+.2f} points against it: the latter is kept")
            art.speed_remedy = QAT_REQUANTIZED
            self._adopt(art, Attempt(QAT_REQUANTIZED, Int8Options(), data, 0.0, check), float_accuracy)

    def _over_budget(self, drop: float, quantization_drop: float) -> bool:
        """Over the budget in a way a quantizer remedy can help: with no ``max_accuracy_drop`` the default budget
        is on what quantizing cost; with one, on the drop from the source, when quantizing cost a point or more."""
        from edgekit.export.remedies import MIN_GAIN

        if self.config.max_accuracy_drop is None:
            return quantization_drop > self.config.budget
        return drop > self.config.budget and quantization_drop >= MIN_GAIN

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

    def _scorer(self, model: Any, name: str, float_accuracy: float) -> Callable[[bytes], tuple[float, Any]]:
        """An int8 artifact's score for the remedies: what quantizing cost when the budget is the default one,
        else its drop from the source; with its verification."""
        explicit = self.config.max_accuracy_drop is None

        def evaluate(data: bytes) -> tuple[float, Any]:
            check = self._verify(data, name, Quantization.INT8, model)
            return (float_accuracy - check.accuracy) if explicit else self._drop(check), check

        return evaluate

    def _score(self, art: ArtifactResult) -> float:
        return art.quantization_drop if self.config.max_accuracy_drop is None else art.accuracy_drop

    def _remedy(self, art: ArtifactResult, model: Any, name: str, float_accuracy: float) -> None:
        """Walk the format's remedy ladder (:mod:`edgekit.export.remedies`); keep the best attempt in ``art``."""
        from edgekit.export.remedies import Attempt, Int8Options, recover

        spec = exporter(art.format)
        with self.progress.step(f"remedies {name}"), \
                spec.int8(model, calibration=self.splits.calibration.x, int8_io=self.config.int8_io) as quantizer:
            recovery = recover(art.format, quantizer, Attempt("", Int8Options(), art.data, self._score(art)),
                               budget=self.config.budget, evaluate=self._scorer(model, name, float_accuracy))
        art.remedies_tried = {k: round(float(v), 4) for k, v in recovery.tried.items()}
        best = recovery.best
        if not best.remedy:
            art.notes.append(f"int8 lost {art.accuracy_drop:.2f} points; no remedy did better")
            return
        art.remedy = best.remedy
        self._adopt(art, best, float_accuracy)
        art.notes.append(f"int8 with the quantizer's defaults lost {recovery.tried['default']:.2f} points; "
                         f"remedy {best.remedy} ({best.options.changes()}) loses {best.score:.2f}")

    def _speed(self, art: ArtifactResult, model: Any, name: str, float_accuracy: float) -> None:
        """When the int8 artifact runs slower than the source's float32 one (side by side), try the format's speed
        rungs (:data:`~edgekit.export.remedies.SPEED_LADDERS` and the quantizer's own for this model) and keep the
        fastest within the budget."""
        from edgekit.export.remedies import SLOWER, SPEED_LADDERS, speed_up

        spec = exporter(art.format)
        reference = self._float32_data(art.format)
        if reference is None:
            return
        art.float32_time_ratio = round(self._time_ratio(reference, art.data), 3)
        extra_rungs = spec.speed_rungs(art.data)
        if art.float32_time_ratio <= SLOWER or (not SPEED_LADDERS[art.format] and not extra_rungs):
            return
        with self.progress.step(f"speed {name}"), \
                spec.int8(model, calibration=self.splits.calibration.x, int8_io=self.config.int8_io) as quantizer:
            current = self._attempt(art, self._score(art))
            best, art.speed_tried = speed_up(art.format, quantizer, current, budget=self.config.budget,
                                             evaluate=self._scorer(model, name, float_accuracy),
                                             ratio=self._time_ratio, extra_rungs=extra_rungs)
        if best is not current:
            art.speed_remedy = best.remedy
            self._adopt(art, best, float_accuracy)
            art.float32_time_ratio = round(self._time_ratio(reference, art.data), 3)
            art.notes.append(f"int8 ran slower than float32; {best.remedy} ({best.options.changes()}) runs "
                             f"{art.speed_tried[best.remedy]:.2f}x the time of the first int8 artifact")

    def _shrink(self, art: ArtifactResult, model: Any, name: str, float_accuracy: float) -> None:
        """When the int8 artifact is within the budget, try the format's size rungs
        (:data:`~edgekit.export.remedies.SIZE_RUNGS`) and keep the smallest that per-channel weights buy no accuracy
        over and that is no slower."""
        from edgekit.export.remedies import shrink

        score = self._score(art)
        if score is None or score > self.config.budget:
            return
        spec = exporter(art.format)
        with self.progress.step(f"size {name}"), \
                spec.int8(model, calibration=self.splits.calibration.x, int8_io=self.config.int8_io) as quantizer:
            current = self._attempt(art, score)
            floor = 0.0 if self.config.max_accuracy_drop is None else self.source_accuracy - float_accuracy
            best, art.size_tried = shrink(art.format, quantizer, current, budget=self.config.budget, floor=floor,
                                          evaluate=self._scorer(model, name, float_accuracy), ratio=self._time_ratio)
        if best is not current:
            before = len(art.data)
            art.size_remedy = best.remedy
            self._adopt(art, best, float_accuracy)
            reference = self._float32_data(art.format)
            if reference is not None:
                art.float32_time_ratio = round(self._time_ratio(reference, art.data), 3)
            art.notes.append(f"size rung {best.remedy} kept: {before:,} -> {len(art.data):,} bytes, "
                             f"{best.score - current.score:+.2f} points against the artifact it replaced")

    def _time_ratio(self, a: bytes, b: bytes) -> float:
        """b's single-sample time over a's, side by side (:func:`~edgekit.export.verify.latency_ratio`)."""
        from edgekit.export.verify import latency_ratio

        return latency_ratio(a, b, self.splits.evaluation.x[:1], threads=self.config.threads)

    @staticmethod
    def _attempt(art: ArtifactResult, score: float) -> Any:
        """``art`` as the attempt a speed or size ladder starts from: its remedy, its quantizer options, its bytes."""
        from edgekit.export.remedies import Attempt, Int8Options

        options = Int8Options(**art.quantizer_options) if art.quantizer_options else Int8Options()
        return Attempt(art.remedy, options, art.data, score)

    def _adopt(self, art: ArtifactResult, attempt: Any, float_accuracy: float) -> None:
        """``art`` becomes ``attempt``'s artifact, with its verification's figures."""
        check = attempt.extra
        art.data, art.quantizer_options = attempt.data, attempt.options.as_dict()
        art.accuracy, art.accuracy_drop, art.top1_agreement = check.accuracy, self._drop(check), check.top1_agreement
        art.quantization_drop = float_accuracy - check.accuracy
        art.max_abs_diff, art.conversion_max_abs_diff = check.max_abs_diff, check.conversion_max_abs_diff
        art.inputs, art.outputs, art.latency_us = check.inputs, check.outputs, check.latency_us

    def _outputs(self, model: Any) -> np.ndarray:
        if model is self.loaded.source:
            return self.source_out
        key = ("outputs", id(model))
        if key not in self._cache:
            self._cache[key] = (predict(model, self.splits.evaluation.x), model)  # keep model alive: id stays
        return self._cache[key][0]


_INTEGER = (Quantization.INT8, Quantization.QAT, Quantization.DYNAMIC)
QAT_REQUANTIZE = (Format.ONNX,)
"""Formats whose QAT export is measured against their own int8 quantizer run on the QAT-tuned weights: tf2onnx's
QAT graph keeps float ops between QDQ pairs (unfolded BatchNormalization, padding, weights off the int8 grid),
which onnxruntime runs unfused (MobileNetV2 0.35: 2.7x the float32 time, BENCHMARKS.md)."""
QAT_REQUANTIZED = "onnxruntime-int8-of-qat-weights"


def _reason(exc: BaseException) -> str:
    """The telling line of a library's long message: its last line naming an error, else its first."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    telling = [line for line in lines if "Error" in line or "not supported" in line]
    return (telling[-1] if telling else first_line(exc))[:240]


def _select(candidates: list[CandidateResult], config: CompressConfig) -> CandidateResult | None:
    ok = [c for c in candidates if c.error is None and c.artifacts]
    if config.max_accuracy_drop is None:  # one explicit recipe: int8 and QAT artifacts get the default budget
        if len(candidates) != 1 or not ok:
            return None
        chosen = ok[0]
        if chosen.recipe.quantize in (Quantization.INT8, Quantization.QAT) \
                and chosen.worst_quantization_drop is not None:
            chosen.within_budget = chosen.worst_quantization_drop <= config.budget
            return chosen if chosen.within_budget else None
        return chosen
    for c in candidates:
        c.within_budget = c.error is None and c.worst_drop is not None and c.worst_drop <= config.max_accuracy_drop
    within = [c for c in ok if c.within_budget]
    if not within:
        return None
    # every asked-for format written beats a smaller candidate that lacks one. Latency is measured, not
    # selected on unless asked (timings of small models are noisy): a slower-than-float32 pick gets a note
    return min(within, key=lambda c: (bool(c.format_errors), c.size(config.select_by.value), c.worst_drop))


def _write(result: CompressResult, stage: StagedDir) -> None:
    from edgekit.artifacts.manifest import KERAS_MODEL, inference_manifest, write_manifest
    from edgekit.artifacts.report import write_report

    if result.selected is not None:
        for art in result.selected.artifacts:
            (stage.path / art.filename).write_bytes(art.data)
        # the selected float Keras model (pruned/distilled/QAT-tuned): for further training or federation
        keras_model = result.selected.keras_model
        if hasattr(keras_model, "save"):  # a tf-keras model (a model known only by its graph has none)
            keras_model.save(stage.path / KERAS_MODEL)
        result.manifest = inference_manifest(result, keras_model=KERAS_MODEL if hasattr(keras_model, "save") else None)
        write_manifest(stage.path, result.manifest)
    write_report(result, stage.path)
    result.out = stage.commit()
