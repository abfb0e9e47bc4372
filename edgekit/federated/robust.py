"""Byzantine-robust aggregation: what keeps one lying device (or a few) from halting or wrecking training.

Updates are untrusted even after they pass the protocol checks. Every round, before the strategy
aggregates (:func:`defend`):

1. **Norm bound** (``update_norm_bound``): every update's distance from the global model is scaled down to
   at most that many times the round's median distance (norm clipping, Sun et al., "Can You Really Backdoor
   Federated Learning?", 2019). A sign-flipped or boosted update then weighs no more than an honest one.
2. **Screening on the server's evaluation data** (``screen_loss_ratio``): each update alone (global model +
   that update) is evaluated on the server's held-out data; an update whose loss is over that many times the
   round's median (and over the median plus 3 robust standard deviations of the round's losses) is dropped
   (validation scoring, as in Xie et al.'s Zeno, 2019). A sign-flipped update, or one trained on permuted
   labels, makes the model worse on data the device never saw; an honest device's, even on skewed data, does
   not rise that far above the others. The loss, not the accuracy: near convergence a harmful step barely
   moves the accuracy of a model alone, and it shows in the loss. The default ratio, 2.5, is measured
   (BENCHMARKS.md "Robust aggregation"): on digits with Dirichlet(0.5) label skew an honest device alone
   reached up to 2.3x the round's median loss, attacking ones 3-16x. At most
   ``(n - 1) // 2`` updates are dropped, so the honest majority always decides.

After aggregation, when the last-good-model guard would refuse the aggregate, :func:`recover` drops the
updates whose absence helps the most (leave-one-out on the evaluation data, one at a time, at most
``(n - 1) // 2``) until an aggregate passes, and commits that. Every dropped or bounded device is named in
the run's log and ``history.json``.

Why not Flower's Krum / Multi-Krum, median or Bulyan as the default: with 4 devices Krum's condition
(n > 2f + 2) fails for one attacker, and on skewed (non-IID) data distance-based rules discard honest
minority devices; the coordinate-wise median and trimmed mean are registered strategies
(``median``, ``trimmed``) and measured side by side in BENCHMARKS.md ("Robust aggregation").
Differentially private rounds skip both steps: the devices already clip, and a data-dependent choice of
updates is outside the privacy accounting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

Update = tuple[Any, dict[str, np.ndarray], int]
"""(reply, decoded weights, reported examples)."""


def distance(values: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> float:
    """The L2 norm of ``values - base`` over every tensor."""
    return math.sqrt(sum(float(np.sum((v.astype(np.float64) - base[k]) ** 2)) for k, v in values.items()))


def _node(update: Update) -> int:
    return int(update[0].metadata.src_node_id)


def bound_norms(updates: list[Update], weights: dict[str, np.ndarray], ratio: float) -> tuple[list[Update],
                                                                                              list[dict]]:
    """Scale every update whose distance from ``weights`` is over ``ratio`` x the round's median down to that
    bound; return the updates and one record per bounded update."""
    if len(updates) < 3:
        return updates, []
    norms = [distance(w, weights) for _, w, _ in updates]
    limit = ratio * float(np.median(norms))
    out, bounded = [], []
    for update, size in zip(updates, norms):
        if size <= limit or size == 0:
            out.append(update)
            continue
        scale = limit / size
        reply, values, examples = update
        out.append((reply, {k: (weights[k] + (v.astype(np.float64) - weights[k]) * scale).astype(v.dtype)
                            for k, v in values.items()}, examples))
        bounded.append({"node": _node(update), "norm": size, "bound": limit, "scale": scale})
    return out, bounded


def screen(updates: list[Update], loss: Callable[[dict[str, np.ndarray]], float],
           ratio: float) -> tuple[list[Update], list[dict]]:
    """Drop the updates whose own held-out loss (``loss``: the global model with that update alone, on the
    server's evaluation data) is far above the round's median: over ``ratio`` x the median and over the median
    plus 3 robust standard deviations (1.4826 x the median absolute deviation, so a round of very skewed honest
    devices, whose losses spread widely, widens the margin). Non-finite losses are dropped too; the worst go
    first, at most ``(n - 1) // 2``. Returns the kept updates and one record per dropped one."""
    if len(updates) < 3:
        return updates, []
    losses = [loss(w) for _, w, _ in updates]
    finite = [v for v in losses if math.isfinite(v)]
    median = float(np.median(finite)) if finite else math.nan
    spread = 3 * 1.4826 * float(np.median([abs(v - median) for v in finite])) if finite else 0.0
    limit = median + max((ratio - 1) * median, spread)
    order = sorted(range(len(updates)), key=lambda i: -losses[i] if math.isfinite(losses[i]) else -math.inf)
    drop = [i for i in order if not math.isfinite(losses[i]) or losses[i] > limit][:(len(updates) - 1) // 2]
    dropped = [{"node": _node(updates[i]), "loss_alone": losses[i], "round_median": median,
                "reason": f"alone it gives a held-out loss of {losses[i]:.4g} on the server's evaluation data, over "
                          f"the round's limit {limit:.4g} (median {median:.4g})"} for i in drop]
    return [u for i, u in enumerate(updates) if i not in set(drop)], dropped


def recover(updates: list[Update], aggregate: Callable[[list[Update]], tuple[Any, float]], good: float,
            max_drop: float) -> tuple[list[Update], list[dict], Any]:
    """Leave-one-out after a refused aggregate: drop, one at a time, the update whose absence raises the
    aggregate's held-out accuracy the most, until it is within ``max_drop`` points of ``good`` (at most
    ``(n - 1) // 2`` dropped). ``aggregate(updates)`` returns (result, accuracy). Returns the kept updates,
    the dropped ones' records and the passing result (None when none passes)."""
    kept, dropped = list(updates), []
    for _ in range((len(updates) - 1) // 2):
        trials = []
        for i in range(len(kept)):
            result, accuracy = aggregate(kept[:i] + kept[i + 1:])
            trials.append((accuracy if math.isfinite(accuracy) else -math.inf, i, result))
        accuracy, worst, result = max(trials, key=lambda t: t[0])
        dropped.append({"node": _node(kept[worst]), "accuracy_without": accuracy,
                        "reason": f"the aggregate without it scores {accuracy:.1f}% on the server's evaluation data"})
        kept.pop(worst)
        if accuracy >= good - max_drop:
            return kept, dropped, result
    return kept, dropped, None
