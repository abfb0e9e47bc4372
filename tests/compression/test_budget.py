"""The accuracy budget (edgekit.config.Budget) alone says what is measured, and the search selects by it; each
recipe's model is built once and reused; a candidate runs through every format."""

import numpy as np
import pytest
from conftest import fast_training

from edgekit.artifacts.results import ArtifactResult, CandidateResult
from edgekit.compression.search import _refusal, _select
from edgekit.config import DEFAULT_INT8_BUDGET, Budget, BudgetBasis, CompressConfig, Format, Quantization, Recipe


def test_without_a_budget_only_what_quantizing_cost_is_judged():
    budget = CompressConfig().budget
    assert budget == Budget(DEFAULT_INT8_BUDGET, BudgetBasis.QUANTIZATION) and not budget.against_source
    assert budget.score(accuracy_drop=9.0, quantization_drop=1.5) == 1.5  # pruning's 7.5 points are the user's
    assert budget.judges(Quantization.INT8) and budget.judges(Quantization.QAT)
    assert not budget.judges(Quantization.FLOAT16) and not budget.judges(Quantization.NONE)
    assert budget.floor(source_accuracy=97, float_accuracy=90) == 0.0 and budget.line(97.0) is None
    assert budget.remedy_can_help(accuracy_drop=0.0, quantization_drop=2.5, min_gain=1.0)
    assert not budget.remedy_can_help(accuracy_drop=9.0, quantization_drop=1.5, min_gain=1.0)


def test_with_a_budget_every_artifact_is_judged_against_the_source():
    budget = CompressConfig(max_accuracy_drop=1.0).budget
    assert budget == Budget(1.0, BudgetBasis.SOURCE) and budget.describe() == "at most 1 points below the source"
    assert budget.score(accuracy_drop=1.5, quantization_drop=0.2) == 1.5
    assert all(budget.judges(q) for q in Quantization)
    assert budget.floor(source_accuracy=97.0, float_accuracy=96.0) == 1.0 and budget.line(97.0) == 96.0
    # a remedy can help only when quantizing cost at least its minimum gain of the drop
    assert budget.remedy_can_help(accuracy_drop=1.5, quantization_drop=1.0, min_gain=1.0)
    assert not budget.remedy_can_help(accuracy_drop=1.5, quantization_drop=0.3, min_gain=1.0)
    assert budget.allows(1.0) and not budget.allows(1.01) and not budget.allows(None)


def _candidate(name, quantize, drop, quantization_drop, size, error=None):
    art = ArtifactResult(Format.TFLITE, "model.tflite", b"x" * size, Quantization(quantize), 0.0, 90.0, drop, 99.0,
                         0.0, 0.0, None, "litert", [], [], [], quantization_drop=quantization_drop)
    return CandidateResult(Recipe(quantize=quantize) if name is None else name, [] if error else [art], error=error)


def test_the_search_keeps_the_smallest_candidate_within_the_budget_and_marks_every_one():
    config = CompressConfig(max_accuracy_drop=1.0, formats=("tflite",))
    small_over = _candidate(None, "int8", 1.4, 1.4, 100)
    mid_within = _candidate(Recipe(quantize="dynamic"), "dynamic", 0.9, 0.9, 200)
    large_within = _candidate(Recipe(quantize="float16"), "float16", 0.0, None, 300)
    failed = _candidate(Recipe(prune=0.5), "none", None, None, 1, error="tfmot failed")
    chosen = _select([small_over, mid_within, large_within, failed], config)
    assert chosen is mid_within
    assert [c.within_budget for c in (small_over, mid_within, large_within, failed)] == [False, True, True, False]


def test_an_explicit_int8_recipe_over_the_default_budget_is_refused_with_its_cost():
    config = CompressConfig(recipe=Recipe(quantize="int8"))
    over = _candidate(None, "int8", 0.5, 2.6, 100)
    assert _select([over], config) is None and over.within_budget is False
    from edgekit.artifacts.results import CompressResult

    message = _refusal(CompressResult({}, [over], None, config))
    assert message.startswith("int8: quantizing costs 2.60 points of accuracy, more than the 2 points")
    assert "quantization-aware training" in message
    float16 = _candidate(Recipe(quantize="float16"), "float16", 5.0, None, 100)  # not judged: kept
    assert _select([float16], CompressConfig(recipe=Recipe(quantize="float16"))) is float16
    assert float16.within_budget is None


@pytest.fixture(scope="module")
def prepared(cnn_path, digits):
    from edgekit.loading.data import split
    from edgekit.loading.models import load_model

    loaded = load_model(cnn_path)
    return loaded, split(digits, seed=0)


def test_a_recipes_model_is_built_once_and_reused_by_the_recipes_that_share_it(prepared):
    from edgekit._progress import Progress
    from edgekit.compression.models import ModelFactory

    loaded, splits = prepared
    factory = ModelFactory(loaded, splits, CompressConfig(training=fast_training(distill_epochs=1)), Progress(False))
    student, twin, _ = factory.build(Recipe(student_width=0.5, quantize="int8"))
    again, _, _ = factory.build(Recipe(student_width=0.5, quantize="none"))
    assert student is twin is again and student is not loaded.source
    assert student.count_params() < 0.5 * loaded.params
    pruned, _, sparsity = factory.build(Recipe(prune=0.5, quantize="none"))
    assert 0.4 <= np.mean([v for v in sparsity.values()]) <= 0.6, sparsity
    assert set(factory.skipped[Recipe(prune=0.5, quantize="none").name]) == {"prune"}


def test_a_candidate_runs_every_format_and_is_compared_with_the_sources_float32_artifacts(prepared):
    from edgekit._progress import Progress
    from edgekit.compression.candidates import CandidateRunner
    from edgekit.loading.models import accuracy, predict

    loaded, splits = prepared
    source_out = predict(loaded.source, splits.evaluation.x)
    config = CompressConfig(recipe=Recipe(quantize="float16"), training=fast_training())
    runner = CandidateRunner(loaded, splits, source_out, accuracy(source_out, splits.evaluation.y), config,
                             Progress(False))
    candidate = runner.run(Recipe(quantize="float16"), keep_going=False)
    assert [a.format for a in candidate.artifacts] == [Format.TFLITE, Format.ONNX] and candidate.error is None
    assert all(a.top1_agreement >= 99 and abs(a.accuracy_drop) <= 0.5 for a in candidate.artifacts)
    reference = runner.float32_reference([candidate])
    assert set(reference) == {"tflite", "onnx"}
    assert all(reference[a.format.value]["bytes"] > 1.5 * a.bytes for a in candidate.artifacts)  # float16 halves


def test_every_accuracy_carries_its_uncertainty_and_a_verdict_closer_than_the_noise_says_so(tmp_path):
    """Wilson intervals on the evaluation count, a paired margin from the top-1 agreement, and the words when a
    drop sits within that margin of the budget (the report and the manifest carry both)."""
    from edgekit.artifacts.manifest import artifact_entry
    from edgekit.artifacts.results import CompressResult
    from edgekit.artifacts.uncertainty import drop_margin, wilson_interval

    low, high = wilson_interval(90.0, 400)
    assert 86.6 < low < 86.8 and 92.5 < high < 92.7  # the Wilson interval, not the normal one (87.06-92.94)
    assert wilson_interval(100.0, 50)[1] == 100.0 and wilson_interval(100.0, 50)[0] < 93
    assert drop_margin(100.0, 400) == 0.25  # one sample's worth when the models never disagree
    assert abs(drop_margin(96.0, 400) - 1.96) < 0.01

    config = CompressConfig(max_accuracy_drop=1.0, formats=("tflite",))
    close = _candidate(Recipe(quantize="int8"), "int8", 1.3, 1.3, 100)  # 0.3 over, margin ~2.0 at 96% agreement
    close.artifacts[0].top1_agreement = 96.0
    far = _candidate(Recipe(quantize="float16"), "float16", 0.0, None, 300)
    far.artifacts[0].top1_agreement = 100.0
    result = CompressResult({"accuracy": 90.0}, [close, far], None, config, data_info={"evaluation": 400})
    assert "int8's drop of 1.30 points is within 1.96 points" in result.verdict_within_noise(close)
    assert result.verdict_within_noise(far) == ""
    entry = artifact_entry(close.artifacts[0], evaluated=400)
    assert entry["drop_margin95"] == 1.96 and entry["accuracy_ci95"][0] < 90 < entry["accuracy_ci95"][1]
    assert "accuracy_ci95" not in artifact_entry(close.artifacts[0])  # no evaluation count: no interval claimed


def test_an_int8_artifact_is_flagged_slower_when_the_blocks_agree_not_only_past_ten_percent():
    """The hidden depthwise CNN's int8 .tflite measured 1.099x float32 against the fixed 1.10 and was not flagged;
    blocks that all but agree on a slowdown flag it, noisy blocks around the same median do not."""
    steady = _candidate(None, "int8", 0.1, 0.1, 100).artifacts[0]
    steady.float32_time_ratio, steady.float32_time_blocks = 1.099, [1.08, 1.09, 1.10, 1.11, 1.07, 1.12, 1.09, 1.10]
    assert steady.slower_than_float32
    noisy = _candidate(None, "int8", 0.1, 0.1, 100).artifacts[0]
    noisy.float32_time_ratio, noisy.float32_time_blocks = 1.099, [0.9, 1.4, 1.0, 1.3, 0.95, 1.25, 1.05, 1.2]
    assert not noisy.slower_than_float32
    fast = _candidate(None, "int8", 0.1, 0.1, 100).artifacts[0]
    fast.float32_time_ratio, fast.float32_time_blocks = 0.7, [0.7] * 8
    assert not fast.slower_than_float32
    past_ten = _candidate(None, "int8", 0.1, 0.1, 100).artifacts[0]
    past_ten.float32_time_ratio = 1.2  # no blocks recorded (timed apart): the fixed threshold still applies
    assert past_ten.slower_than_float32
