"""Update compression: int8-quantized weight deltas with one scale per tensor.

A client sends ``round((w_new - w_global) / scale)`` as int8, ``scale = max|delta| / 127``; the
server adds ``q * scale`` back onto the global weights it sent. About 4x fewer bytes than float32
weights; the rounding error is at most ``scale / 2`` per weight.
"""

from __future__ import annotations

import numpy as np

MAX_SCALE = 10.0
"""The largest per-tensor scale a receiver accepts (a weight moving by over 1,270 in one round is an attack)."""


def encode(new: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(int8 deltas, per-tensor scales) of ``new`` relative to ``base``."""
    deltas, scales = {}, {}
    for name, value in new.items():
        delta = np.asarray(value, np.float32) - np.asarray(base[name], np.float32)
        peak = float(np.max(np.abs(delta))) if delta.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        deltas[name] = np.clip(np.round(delta / scale), -127, 127).astype(np.int8)
        scales[name] = scale
    return deltas, scales


def decode(deltas: dict[str, np.ndarray], scales: dict[str, float],
           base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Weights ``base + delta * scale`` from an :func:`encode` result."""
    return {name: (np.asarray(base[name], np.float32) + deltas[name].astype(np.float32) * np.float32(scales[name]))
            for name in deltas}
