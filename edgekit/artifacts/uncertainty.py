"""How sure an accuracy is: every accuracy edgekit reports is measured on the evaluation split, often a few hundred
samples, so it carries sampling noise (EfficientNetB0's int8 ``.onnx`` was 2 points from its source on edgekit's
split and 2.8 on another split of the same size).

- :func:`wilson_interval`: the 95% Wilson score interval of one accuracy on ``n`` samples.
- :func:`drop_margin`: the 95% margin of a drop between two models measured on the same ``n`` samples. The two
  are paired: only samples where the models disagree can move the difference, and their share is at most
  ``1 - agreement`` (top-1 agreement), so the standard error is at most ``sqrt((1 - agreement) / n)``.

>>> [round(v, 1) for v in wilson_interval(96.0, 300)]
[93.1, 97.7]
>>> round(drop_margin(97.0, 300), 2)
1.96
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054
"""The two-sided 95% quantile of the standard normal."""


def wilson_interval(accuracy: float, n: int, *, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``accuracy`` (percent) measured on ``n`` samples, in percent."""
    if n <= 0:
        return (0.0, 100.0)
    p = min(max(accuracy / 100.0, 0.0), 1.0)
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (100.0 * max(center - half, 0.0), 100.0 * min(center + half, 1.0))


def drop_margin(agreement: float, n: int, *, z: float = Z95) -> float:
    """The 95% margin (points) of an accuracy drop between two models that agree on ``agreement`` percent of the
    same ``n`` samples; at least the resolution of one sample."""
    if n <= 0:
        return 100.0
    disagree = min(max(1.0 - agreement / 100.0, 0.0), 1.0)
    return max(100.0 * z * math.sqrt(disagree / n), 100.0 / n)


def within_noise(score: float | None, points: float, margin: float) -> bool:
    """Whether ``score`` (a drop) is so close to the budget's ``points`` that the evaluation cannot tell the side."""
    return score is not None and abs(score - points) <= margin
