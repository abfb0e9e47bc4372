"""``edgekit.compress``: load, compress by recipe(s), export, verify, select, write.

The top of the compression path: it may import every package below it (``loading``, ``optimize``,
``export``, ``artifacts``), never ``federated`` or the package face ``edgekit``. What the accuracy budget measures
is decided by :class:`~edgekit.config.Budget` alone.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.serving.stats import reference_of
from edgekit._io import StagedDir
from edgekit._progress import Progress
from edgekit.artifacts.results import CandidateResult, CompressResult
from edgekit.compression.candidates import CandidateRunner
from edgekit.config import CompressConfig, Quantization
from edgekit.errors import BudgetError, DataError
from edgekit.loading.data import Dataset, fit_to_model, load_data, shape_text, split
from edgekit.loading.input_range import input_range_warnings
from edgekit.loading.models import LoadedModel, accuracy, load_model, load_warnings, pin_input, predict


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
        report = str(Path(out).absolute() / "report.md") if out is not None else None
        best = min((c.worst_drop for c in result.candidates if c.worst_drop is not None), default=None)
        noise = [text for c in result.candidates if c.artifacts and (text := result.verdict_within_noise(c))]
        message = (_refusal(result) + (f" ({noise[0]})" if noise else "")
                   + "".join(f"; {line}" for line in result.warnings) + (f"; see {report}" if report else ""))
        raise BudgetError(message, budget=config.budget.points,
                          best_drop=best, report=report)
    return result


def _compress(model: Any, data: str | Path | Dataset, eval_data: str | Path | Dataset | None,
              config: CompressConfig, bars: Progress) -> CompressResult:
    """Load, measure the source, run every candidate recipe, select."""
    raw = load_data(data)
    loaded = load_model(model, sample=raw.x[:64])  # a Keras 3 rebuild is checked on the user's samples
    loaded, dataset, evaluation, labels = _labelled(loaded, raw, eval_data)
    splits = split(dataset, seed=config.seed, eval_data=evaluation)
    source_out = predict(loaded.source, splits.evaluation.x)
    source = {
        "path": loaded.path, "sha256": loaded.sha256, "format": loaded.source_format,
        "accuracy": accuracy(source_out, splits.evaluation.y), "params": loaded.params,
        "input": {"shape": [None, *(loaded.free_input_shape or loaded.input_shape)], "dtype": loaded.input_dtype},
        "output": {"shape": [None, loaded.num_classes], "kind": "probabilities" if loaded.outputs_probabilities
                   else "logits"},
        # a binary classifier's one output, served as two columns (column 1 is that output)
        "model_output": None if loaded.one_output is None else {"shape": [None, 1], "kind": loaded.one_output.value},
        "rebuild_max_abs_diff": loaded.rebuild_max_abs_diff,
    }
    data_info = {"name": raw.name, "samples": len(dataset), "labels": labels, "seed": config.seed,
                 "finetune": len(splits.finetune), "calibration": len(splits.calibration),
                 "evaluation": len(splits.evaluation),
                 # what the evaluation samples are: given ones (eval data, the data file's test split) or a split
                 "evaluation_data": "a split of the data" if evaluation is None else evaluation.name}
    runner = CandidateRunner(loaded, splits, source_out, source["accuracy"], config, bars)
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
    result = CompressResult(source, candidates, _select(candidates, config), config, data_info=data_info,
                            warnings=[*load_warnings(loaded), *_one_class_warning(source_out),
                                      *input_range_warnings(loaded.source, splits.calibration.x)])
    result.reference = reference
    result.data_reference = reference_of(splits.calibration.x, predict(loaded.source, splits.calibration.x))
    return result


def _one_class_warning(outputs: np.ndarray) -> list[str]:
    """A line when the source model gives one class for every evaluation sample (an untrained model, weights not
    loaded, data unlike its training data): no quantization error can change a top-1 agreement or accuracy there.

    >>> _one_class_warning(np.tile([0.1, 0.9], (40, 1)))[0][:56]
    'the source model gives class 1 for all 40 evaluation sam'
    """
    top = outputs.argmax(axis=1)
    if len(top) < 2 or (top != top[0]).any():
        return []
    return [f"the source model gives class {int(top[0])} for all {len(top)} evaluation samples: top-1 agreement and "
            "accuracy cannot show what compressing changed; check that the model is trained (its weights saved with "
            "it) and that the data is what it was trained on"]


def _labelled(loaded: LoadedModel, raw: Dataset, eval_data: str | Path | Dataset | None,
              ) -> tuple[LoadedModel, Dataset, Dataset | None, str]:
    """The model taking the data's sample shape (:func:`pin_input`) and the data fitted to it; without labels, the
    source model's predictions serve as labels."""
    dataset = fit_to_model(raw, loaded.input_shape, loaded.input_dtype, loaded.num_classes)
    loaded = pin_input(loaded, dataset.x.shape[1:])
    if eval_data is None:
        given = raw.held_out  # the data file's own test split (x_test, y_test), if it has one
    else:
        given = load_data(eval_data)
        given = given if given.held_out is None else given.held_out  # an evaluation file's test split
    evaluation = None if given is None else _fit_evaluation(loaded, given)
    if dataset.y is not None:
        return loaded, dataset, evaluation, "given"
    dataset = Dataset(dataset.x, predict(loaded.source, dataset.x).argmax(1), dataset.name)
    if evaluation is not None and evaluation.y is None:
        evaluation = Dataset(evaluation.x, predict(loaded.source, evaluation.x).argmax(1), evaluation.name)
    return loaded, dataset, evaluation, "source model predictions (no y in the data)"


def _fit_evaluation(loaded: LoadedModel, evaluation: Dataset) -> Dataset:
    """The evaluation data fitted to the model, whose free input dimensions the data fixed (:func:`pin_input`)."""
    try:
        return fit_to_model(evaluation, loaded.input_shape, loaded.input_dtype, loaded.num_classes)
    except DataError:
        if loaded.free_input_shape is None:
            raise
        raise DataError(f"{evaluation.name}: x has shape {evaluation.x.shape}, but the model's free input "
                        f"{shape_text(loaded.free_input_shape)} was fixed to {shape_text(loaded.input_shape)} by "
                        "the data's samples (the artifacts take one shape); evaluate on samples of that size") \
            from None


def _select(candidates: list[CandidateResult], config: CompressConfig) -> CandidateResult | None:
    """The candidate kept: every candidate the budget judges is marked within it or not; of those within, the
    smallest by ``select_by``. Without a budget against the source there is one explicit recipe, kept when its
    quantization stayed within the default budget (or the budget does not judge it)."""
    budget = config.budget
    for c in candidates:
        if c.error is None and c.artifacts and budget.judges(c.recipe.quantize):
            score = budget.score(accuracy_drop=c.worst_drop, quantization_drop=c.worst_quantization_drop)
            c.within_budget = budget.allows(score) if score is not None or budget.against_source else None
        elif budget.against_source:
            c.within_budget = False
    ok = [c for c in candidates if c.error is None and c.artifacts and c.within_budget is not False]
    if not budget.against_source:
        return ok[0] if len(candidates) == 1 and ok else None
    if not ok:
        return None
    # every asked-for format written beats a smaller candidate that lacks one. Latency is measured, not
    # selected on unless asked (timings of small models are noisy): a slower-than-float32 pick gets a note
    return min(ok, key=lambda c: (bool(c.format_errors), c.size(config.select_by.value), c.worst_drop))


def _refusal(result: CompressResult) -> str:
    """Why no candidate was kept, with the numbers."""
    budget = result.budget
    if budget.against_source:
        best = min((c.worst_drop for c in result.candidates if c.worst_drop is not None), default=None)
        best_text = f"; the best candidate lost {best:.2f} points" if best is not None else ""
        return f"no candidate kept the accuracy drop within {budget.points:g} points{best_text}"
    candidate = result.candidates[0]
    recipe, cost = candidate.recipe, candidate.worst_quantization_drop
    return (f"{recipe.name}: quantizing costs {cost:.2f} points of accuracy, more than the {budget.points:g} points "
            f"int8 artifacts may lose when no budget is given, after every remedy ({_outcomes(candidate)}); give a "
            "larger accuracy budget to accept it" + (", or try quantization-aware training (the qat recipe)"
                                                     if recipe.quantize is Quantization.INT8 else ""))


def _outcomes(candidate: CandidateResult) -> str:
    """What each format came to: its drop after how many rungs, or why it was not written."""
    import math

    parts = []
    for art in candidate.artifacts:
        rungs = sum(1 for name in art.remedies_tried if name != "default")
        ran = sum(1 for value in art.remedies_tried.values() if math.isfinite(value))
        parts.append(f"{art.format.value}: {art.quantization_drop:.2f} after {rungs} rung(s)"
                     + (f", {rungs + 1 - ran} of which did not run" if ran <= rungs else "")
                     + (f", best {art.remedy}" if art.remedy else "")
                     + (f", {art.search_stopped_words}" if art.search_stopped else ""))
    parts += [f"{fmt}: not written, {error[:200]}" for fmt, error in candidate.format_errors.items()]
    return "; ".join(parts)


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
