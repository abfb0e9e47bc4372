"""Serving statistics: what one model version served, as aggregates only, never a sample.

A :class:`ServingStats` is one window of one version: calls, samples, errors, a latency histogram with fixed
buckets (:data:`LATENCY_BUCKETS`, seconds, as Prometheus histograms count them), the distribution of predicted
classes and per-input-feature summaries (count, sum and sum of squares, so mean and variance; and counts in the
bins a release's reference gives, so the server can compute a population stability index against the data the
release was calibrated on). Windows merge by addition, and :meth:`ServingStats.from_dict` checks a window read
back from disk or received from a device as strictly as any message from outside.

>>> stats = ServingStats("v1", num_classes=3, features=2)
>>> stats.record(np.array([[0.0, 1.0], [2.0, 3.0]]), np.array([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7]]), seconds=0.002)
>>> stats.samples, stats.class_counts, stats.latency_counts[LATENCY_BUCKETS.index(0.0025)]
(2, [1, 0, 1], 1)
>>> ServingStats.from_dict(stats.to_dict()).feature_sum
[2.0, 4.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_agents.errors import StatsError

LATENCY_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                                      5.0, 10.0)
"""Upper bounds (seconds) of the latency histogram's buckets; one more bucket counts what is slower."""
MAX_FEATURES = 256
"""Input features summarised at most: images by channel, wider tables in contiguous groups (:func:`features_of`)."""
MAX_CLASSES = 100_000
MAX_BINS = 64
"""Reference bins a feature has at most."""
MAX_COUNT = 2**53
"""Counts beyond this are not exact in a float: a window claiming more is refused."""


def features_of(x: np.ndarray) -> np.ndarray:
    """``x`` (a batch) as ``(n, F)`` float64 features, ``F <= MAX_FEATURES``: a vector's own columns, an image's or
    sequence's channels (the mean over every axis but the batch and the last), a wider table's columns averaged in
    contiguous groups. The server summarises a release's calibration data with this same function.

    >>> features_of(np.ones((4, 8, 8, 3))).shape, features_of(np.ones((4, 1000))).shape
    ((4, 3), (4, 256))
    """
    x = np.asarray(x, np.float64)
    if x.ndim == 1:
        return x[:, None]
    if x.ndim > 2:
        x = x.reshape(len(x), -1, x.shape[-1]).mean(axis=1)
    if x.shape[1] > MAX_FEATURES:
        x = np.stack([part.mean(axis=1) for part in np.array_split(x, MAX_FEATURES, axis=1)], axis=1)
    return x


@dataclass
class ServingStats:
    """One window of what one model version served (see the module)."""

    version: str
    num_classes: int
    features: int
    edges: list[list[float]] | None = None  # per feature, the reference's bin edges (ascending)
    start: float = 0.0  # wall-clock seconds the window covers
    end: float = 0.0
    calls: int = 0
    samples: int = 0
    errors: int = 0
    latency_counts: list[int] = field(default_factory=list)
    latency_sum: float = 0.0
    class_counts: list[int] = field(default_factory=list)
    feature_count: int = 0
    feature_sum: list[float] = field(default_factory=list)
    feature_sumsq: list[float] = field(default_factory=list)
    bin_counts: list[list[int]] | None = None

    def __post_init__(self) -> None:
        self.latency_counts = self.latency_counts or [0] * (len(LATENCY_BUCKETS) + 1)
        self.class_counts = self.class_counts or [0] * self.num_classes
        self.feature_sum = self.feature_sum or [0.0] * self.features
        self.feature_sumsq = self.feature_sumsq or [0.0] * self.features
        if self.edges is not None and self.bin_counts is None:
            self.bin_counts = [[0] * (len(e) + 1) for e in self.edges]

    def record(self, x: np.ndarray, outputs: np.ndarray, *, seconds: float) -> None:
        """One call that served the batch ``x`` with ``outputs`` (one row of class scores per sample)."""
        self._latency(seconds)
        outputs = np.asarray(outputs).reshape(len(outputs), -1)
        self.samples += len(outputs)
        predicted = np.bincount(outputs.argmax(axis=1), minlength=self.num_classes)[:self.num_classes]
        self.class_counts = [a + int(b) for a, b in zip(self.class_counts, predicted, strict=True)]
        values = features_of(x)
        if values.shape[1] != self.features or not np.all(np.isfinite(values)):
            return  # summaries of one shape, of finite values only; the call itself is counted
        self.feature_count += len(values)
        self.feature_sum = [a + float(b) for a, b in zip(self.feature_sum, values.sum(axis=0), strict=True)]
        self.feature_sumsq = [a + float(b) for a, b in zip(self.feature_sumsq, (values ** 2).sum(axis=0),
                                                               strict=True)]
        if self.edges is not None and self.bin_counts is not None:
            for i, edges in enumerate(self.edges):
                counts = np.bincount(np.searchsorted(edges, values[:, i], side="right"), minlength=len(edges) + 1)
                self.bin_counts[i] = [a + int(b) for a, b in zip(self.bin_counts[i], counts, strict=True)]

    def record_error(self, *, seconds: float) -> None:
        """One call that failed (its time is in the histogram too)."""
        self._latency(seconds)
        self.errors += 1

    def _latency(self, seconds: float) -> None:
        self.calls += 1
        seconds = max(float(seconds), 0.0)
        self.latency_sum += seconds
        index = next((i for i, bound in enumerate(LATENCY_BUCKETS) if seconds <= bound), len(LATENCY_BUCKETS))
        self.latency_counts[index] += 1

    @property
    def empty(self) -> bool:
        return self.calls == 0

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "num_classes": self.num_classes, "features": self.features,
                "edges": self.edges, "start": self.start, "end": self.end, "calls": self.calls,
                "samples": self.samples, "errors": self.errors, "latency_buckets": list(LATENCY_BUCKETS),
                "latency_counts": self.latency_counts, "latency_sum": self.latency_sum,
                "class_counts": self.class_counts, "feature_count": self.feature_count,
                "feature_sum": self.feature_sum, "feature_sumsq": self.feature_sumsq, "bin_counts": self.bin_counts}

    @classmethod
    def from_dict(cls, data: Any) -> ServingStats:
        """A window read back or received: exact names, sizes that match, finite numbers, whole non-negative
        counts that add up (the histogram counts every call, classes count every sample); else
        :class:`StatsError`."""
        return _parse(data)


_KEYS = frozenset(ServingStats("", 0, 0).to_dict())


def _parse(data: Any) -> ServingStats:
    if not isinstance(data, dict) or set(data) != _KEYS:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise StatsError(f"a serving-statistics window has the keys {sorted(_KEYS)}; this one has {got}")
    if list(data["latency_buckets"] or []) != list(LATENCY_BUCKETS):
        raise StatsError("a serving-statistics window has other latency buckets than this agent's")
    if not isinstance(data["version"], str) or not 0 < len(data["version"]) <= 128:
        raise StatsError("a serving-statistics window names no version (or one over 128 characters)")
    classes, features = _count(data, "num_classes", MAX_CLASSES), _count(data, "features", MAX_FEATURES)
    calls, samples, errors = (_count(data, key, MAX_COUNT) for key in ("calls", "samples", "errors"))
    edges = _edges(data["edges"], features)
    stats = ServingStats(str(data["version"]), classes, features, edges, _number(data, "start"),
                         _number(data, "end"), calls, samples, errors,
                         _counts(data["latency_counts"], len(LATENCY_BUCKETS) + 1, "latency_counts"),
                         _number(data, "latency_sum"), _counts(data["class_counts"], classes, "class_counts"),
                         _count(data, "feature_count", MAX_COUNT),
                         _floats(data["feature_sum"], features, "feature_sum"),
                         _floats(data["feature_sumsq"], features, "feature_sumsq"), None)
    if edges is not None:
        if not isinstance(data["bin_counts"], list) or len(data["bin_counts"]) != len(edges):
            raise StatsError("a serving-statistics window's bin_counts do not match its edges")
        stats.bin_counts = [_counts(c, len(e) + 1, "bin_counts") for c, e in zip(data["bin_counts"], edges,
                                                                                  strict=True)]
    elif data["bin_counts"] is not None:
        raise StatsError("a serving-statistics window has bin_counts without edges")
    _consistent(stats)
    return stats


def _consistent(stats: ServingStats) -> None:
    if sum(stats.latency_counts) != stats.calls or stats.errors > stats.calls:
        raise StatsError(f"a serving-statistics window counts {stats.calls} calls and {stats.errors} errors but "
                         f"{sum(stats.latency_counts)} latencies")
    if sum(stats.class_counts) != stats.samples or stats.feature_count > stats.samples:
        raise StatsError(f"a serving-statistics window counts {stats.samples} samples but "
                         f"{sum(stats.class_counts)} predicted classes")
    if stats.end < stats.start or stats.latency_sum < 0 or any(v < 0 for v in stats.feature_sumsq):
        raise StatsError("a serving-statistics window ends before it starts or has negative sums")
    if stats.bin_counts is not None and any(sum(c) != stats.feature_count for c in stats.bin_counts):
        raise StatsError("a serving-statistics window's bins do not count every summarised sample")


def _count(data: dict, key: str, limit: int) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise StatsError(f"a serving-statistics window's {key} is {value!r}, not a whole number from 0 to {limit}")
    return value


def _number(data: dict, key: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise StatsError(f"a serving-statistics window's {key} is {value!r}, not a finite number")
    return float(value)


def _counts(values: Any, size: int, key: str) -> list[int]:
    if not isinstance(values, list) or len(values) != size:
        raise StatsError(f"a serving-statistics window's {key} has not {size} entries")
    return [_count({key: v}, key, MAX_COUNT) for v in values]


def _floats(values: Any, size: int, key: str) -> list[float]:
    if not isinstance(values, list) or len(values) != size:
        raise StatsError(f"a serving-statistics window's {key} has not {size} entries")
    return [_number({key: v}, key) for v in values]


def _edges(value: Any, features: int) -> list[list[float]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != features:
        raise StatsError(f"a serving-statistics window's edges are not one list per feature ({features})")
    edges = [_floats(e, len(e) if isinstance(e, list) else -1, "edges") for e in value]
    if any(not 0 < len(e) < MAX_BINS or e != sorted(e) for e in edges):
        raise StatsError(f"a serving-statistics window's edges are not ascending lists of 1 to {MAX_BINS - 1}")
    return edges


REFERENCE_BINS = 10
"""A release's reference bins per feature: its calibration data's deciles."""
PSI_FLOOR = 1e-4
"""A bin's share is at least this in the population stability index (an empty bin would make it infinite)."""


def reference_of(x: np.ndarray, outputs: np.ndarray) -> dict[str, Any]:
    """The reference statistics a release carries in its manifest (``reference``): of the data it was calibrated
    on, the predicted-class frequencies and per-feature (:func:`features_of`) means, variances, decile edges and
    the share of samples in each decile bin. Served traffic is counted in the same bins on the device
    (:class:`ServingStats` with ``edges``) and compared with :func:`stability_index`.

    >>> ref = reference_of(np.arange(100.0)[:, None], np.eye(2)[np.arange(100) % 2])
    >>> ref["class_frequencies"], len(ref["feature_edges"][0]), ref["feature_bin_frequencies"][0][0]
    ([0.5, 0.5], 9, 0.1)
    """
    values = features_of(x)
    outputs = np.asarray(outputs).reshape(len(outputs), -1)
    classes = np.bincount(outputs.argmax(axis=1), minlength=outputs.shape[1]) / max(len(outputs), 1)
    edges, shares = [], []
    for column in values.T:
        quantiles = np.quantile(column, np.linspace(0, 1, REFERENCE_BINS + 1)[1:-1])
        found = [float(e) for e in np.unique(quantiles)]
        counts = np.bincount(np.searchsorted(found, column, side="right"), minlength=len(found) + 1)
        edges.append(found)
        shares.append([round(float(c) / len(column), 6) for c in counts])
    return {"samples": len(values), "class_frequencies": [round(float(c), 6) for c in classes],
            "feature_mean": [float(v) for v in values.mean(axis=0)],
            "feature_var": [float(v) for v in values.var(axis=0)],
            "feature_edges": edges, "feature_bin_frequencies": shares}


def reference_edges(manifest: Any) -> list[list[float]] | None:
    """The reference bin edges of a manifest's ``reference``, checked as a window's are; ``None`` when it has none
    or they are malformed (a release without a reference is served without bins)."""
    reference = manifest.get("reference") if isinstance(manifest, dict) else None
    edges = reference.get("feature_edges") if isinstance(reference, dict) else None
    try:
        return _edges(edges, len(edges)) if isinstance(edges, list) and 0 < len(edges) <= MAX_FEATURES else None
    except StatsError:
        return None


def stability_index(expected: list[float], counts: list[int]) -> float:
    """The population stability index of served ``counts`` against the reference's bin shares ``expected``:
    sum of (a - e) * ln(a / e) over bins, each share floored at :data:`PSI_FLOOR`. Under 0.1 is commonly read as
    no shift, 0.1-0.25 as a moderate one, over 0.25 as a significant one.

    >>> round(stability_index([0.5, 0.5], [50, 50]), 6), round(stability_index([0.5, 0.5], [90, 10]), 3)
    (0.0, 0.879)
    """
    total = sum(counts)
    if total == 0 or len(expected) != len(counts):
        return 0.0
    psi = 0.0
    for e, c in zip(expected, counts, strict=True):
        a, e = max(c / total, PSI_FLOOR), max(float(e), PSI_FLOOR)
        psi += (a - e) * math.log(a / e)
    return psi
