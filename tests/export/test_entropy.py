"""edgekit's KL threshold search against onnxruntime's own, on the histograms its calibrators build."""

import numpy as np
import pytest
from onnxruntime.quantization.calibrate import HistogramCollector

from edgekit.export.entropy import entropy_threshold, fast_histogram_collector

SETTINGS = {"method": "entropy", "symmetric": False, "num_bins": 2048, "num_quantized_bins": 128,
            "percentile": 99.999, "scenario": "same"}


def _histogram(values, bins=2048):
    top = np.abs(values).max()
    counts, edges = np.histogram(values, bins=bins, range=(-top, top))
    return counts.astype(np.int64), edges.astype(np.float32), np.float32(values.min()), np.float32(values.max())


def _cases():
    rng = np.random.default_rng(0)
    normal = rng.standard_normal(50_000)
    outliers = normal.copy()
    outliers[:3] = 3000.0  # a massive activation in a few samples: the case the entropy rung is for
    relu = np.abs(rng.standard_normal(20_000)) ** 3  # one-sided, heavy tail
    sparse = np.zeros(2048, np.int64)
    sparse[[1024, 1030, 2047]] = [5, 7, 1]  # mostly empty bins: smoothing and the infinite divergences
    yield "normal", _histogram(normal)
    yield "outliers", _histogram(outliers)
    yield "relu", _histogram(relu)
    yield "sparse", (sparse, np.linspace(-1, 1, 2049, dtype=np.float32), np.float32(-0.5), np.float32(1.0))
    yield "odd bins", _histogram(normal[:500], bins=301)


@pytest.mark.parametrize(("name", "histogram"), list(_cases()), ids=[name for name, _ in _cases()])
@pytest.mark.parametrize("quantized", [128, 7])
def test_the_same_threshold_as_onnxruntime(name, histogram, quantized):
    theirs = HistogramCollector(**SETTINGS).get_entropy_threshold(histogram, quantized)
    ours = entropy_threshold(histogram, quantized)
    assert [float(v) for v in ours] == [float(v) for v in theirs], name
    assert all(hasattr(v, "dtype") for v in ours)  # onnxruntime's compute_data asserts it


def test_the_collector_uses_it_and_falls_back_for_float_counts():
    histogram = next(h for name, h in _cases() if name == "outliers")
    collector = fast_histogram_collector(**SETTINGS)
    collector.histogram_dict = {"t": histogram, "f": (histogram[0].astype(np.float64), *histogram[1:])}
    thresholds = collector.compute_entropy()
    reference = HistogramCollector(**SETTINGS).get_entropy_threshold(histogram, 128)
    for name in ("t", "f"):
        assert [float(v) for v in thresholds[name][:2]] == [float(v) for v in reference]
    assert float(thresholds["t"][1]) < 1000  # the 3000 outlier is clipped (the search goes down to 1/16 of it)
