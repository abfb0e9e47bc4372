"""Personalisation after the rounds: a device fine-tunes the head of the global model on its own data and keeps it
only when it does at least as well on its own held-out data."""

from __future__ import annotations

from typing import Any

import numpy as np

from device_agents.errors import TrainingError
from device_agents.protocol import Metric

PERSONAL_HEAD = "personal-head"
"""The context-state record where a device keeps its fine-tuned head."""


def personalized_head(trainer: Any, weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, *,
                      epochs: int, learning_rate: float, seed: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Fine-tune the head of the global ``weights`` on 80% of the local data (the backbone frozen); return the
    coarse accuracies before and after on the other 20%, and the head the device keeps: the fine-tuned one
    when it is at least as accurate there, else the global one (personalising never makes a device worse on
    its own held-out data)."""
    head = set(trainer.spec.get("head_tensors") or ())
    if not head:
        raise ValueError("this trainable artifact names no head tensors (no Flatten or global pooling layer)")
    order = np.random.default_rng(seed).permutation(len(x))
    held = order[: max(1, len(x) // 5)]
    train = order[len(held):] if len(x) > 1 else order
    trainer.set_weights(weights)
    _, before = trainer.evaluate(x[held], y[held])
    try:
        trainer.fit_safely(x[train], y[train], epochs=epochs, learning_rate=learning_rate, seed=seed,
                           frozen=[k for k in trainer.tensors if k not in head])
    except TrainingError:
        after, kept = before, False  # the global head stays
    else:
        _, after = trainer.evaluate(x[held], y[held])
        kept = after >= before
    metrics = {Metric.NUM_EXAMPLES: max(10, len(held) // 10 * 10), Metric.ACCURACY_BEFORE: float(round(before / 5) * 5),
               Metric.ACCURACY_AFTER: float(round(after / 5) * 5), Metric.KEPT: int(kept)}
    return metrics, {k: v for k, v in (trainer.get_weights() if kept else weights).items() if k in head}
