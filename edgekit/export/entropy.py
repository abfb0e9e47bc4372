"""onnxruntime's KL (entropy) threshold search, computed the same way without its per-bin Python loops.

``HistogramCollector.get_entropy_threshold`` (onnxruntime 1.x) walks every candidate threshold of a 2048-bin
histogram (961 for 128 quantized bins) and, for each, sums the outliers with Python's ``sum`` over array elements
and merges and expands the 128 quantized bins in two Python loops: about 0.9 s per tensor on this machine, paid on
every entropy rung of both formats' remedy ladders (a model of 21 activation tensors spent 20 of its 38 seconds
of compression there). :func:`entropy_threshold` computes each candidate's two distributions with array
operations on the same integer counts (exact: integer sums do not depend on their order, and the expanded bins
are truncated as onnxruntime's ``int64`` assignment truncates) and then calls onnxruntime's own
``smooth_distribution`` and ``entropy``, so it chooses the same threshold; ``tests/export/test_entropy.py``
compares the two on real and adversarial histograms. Histograms of non-integer counts use onnxruntime's method.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np


def entropy_threshold(histogram: tuple, num_quantized_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """The KL-optimal ``(low, high)`` of ``histogram`` (``(counts, edges, min, max, ...)``, as onnxruntime's
    ``HistogramCollector`` keeps it) for ``num_quantized_bins`` bins: what its ``get_entropy_threshold`` returns.

    >>> counts = np.array([0, 1, 2, 50, 60, 3, 1, 0], np.int64)
    >>> edges = np.linspace(-4, 4, 9, dtype=np.float32)
    >>> low, high = entropy_threshold((counts, edges, np.float32(-3.5), np.float32(3.5)), 4)
    >>> float(low), float(high)
    (-2.0, 3.0)
    """
    from onnxruntime.quantization.calibrate import entropy
    from onnxruntime.quantization.quant_utils import smooth_distribution

    hist, edges = histogram[0], histogram[1]
    num_bins = hist.size
    zero = num_bins // 2
    half = num_quantized_bins // 2
    dtype = edges.dtype
    counts = np.asarray(hist, np.int64)
    before = np.concatenate(([0], np.cumsum(counts)))  # before[k] = sum(counts[:k])
    total = before[-1]
    divergences = np.zeros(zero - half + 1)
    thresholds = []
    for i in range(half, zero + 1):
        start, end = zero - i, min(zero + i + 1, num_bins)
        thresholds.append((edges[start], edges[end]))
        sliced = counts[start:end]
        p = sliced.copy()
        p[0] += before[start]
        p[-1] += total - before[end]
        nonzeros = (p != 0).astype(np.int64)
        merged = sliced.size // num_quantized_bins
        body = num_quantized_bins * merged
        quantized = sliced[:body].reshape(num_quantized_bins, merged).sum(axis=1) if merged else \
            np.zeros(num_quantized_bins, np.int64)
        quantized[-1] += sliced[body:].sum()
        q = np.zeros(p.size, np.int64)
        if merged:
            norms = nonzeros[:body].reshape(num_quantized_bins, merged).sum(axis=1)
            values = np.zeros(num_quantized_bins, np.int64)
            kept = norms != 0
            values[kept] = (quantized[kept] / norms[kept]).astype(np.int64)
            q[:body] = np.repeat(values, merged)
        p, q = smooth_distribution(p), smooth_distribution(q)
        divergences[i - half] = np.inf if p is None or q is None else np.array(entropy(p, q), dtype=dtype)
    low, high = thresholds[int(np.argmin(divergences))]
    if low < histogram[2]:
        low = histogram[2]
    if high > histogram[3]:
        high = histogram[3]
    return low, high


def fast_histogram_collector(**settings: Any) -> Any:
    """onnxruntime's ``HistogramCollector(**settings)`` whose entropy search is :func:`entropy_threshold`."""
    return _fast_collector_class()(**settings)


@cache
def _fast_collector_class() -> type:
    from onnxruntime.quantization.calibrate import HistogramCollector

    class FastHistogramCollector(HistogramCollector):
        def get_entropy_threshold(self, histogram: tuple, num_quantized_bins: int) -> Any:
            if not np.issubdtype(np.asarray(histogram[0]).dtype, np.integer):  # onnxruntime's search for float counts
                return super().get_entropy_threshold(histogram, num_quantized_bins)
            return entropy_threshold(histogram, num_quantized_bins)

    return FastHistogramCollector
