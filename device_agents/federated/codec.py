"""Update compression: weight deltas in int8 (one scale per tensor) or packed int4 (one scale per block).

- ``int8``: a client sends ``round((w_new - w_global) / scale)`` as int8, ``scale = max|delta| / 127``;
  the server adds ``q * scale`` back onto the global weights it sent. About 4x fewer bytes than float32.
- ``int4``: the delta, plus the error the device kept from its last update (error feedback), is cut
  into blocks of :data:`BLOCK` values; each block has a float32 scale ``max|d| / 7`` and its values are
  rounded stochastically (unbiased) to the 15 levels -7..7, two per byte. What rounding lost stays on
  the device and is added to its next update. About 7.5x fewer bytes than float32.

>>> import numpy as np
>>> base, new = {"w": np.zeros(4, np.float32)}, {"w": np.array([0.5, -1, 0, 0.25], np.float32)}
>>> packed, scales, residual = encode_int4(new, base, {}, np.random.default_rng(0))
>>> decode_int4(packed, scales, base)["w"].shape, packed.dtype.name, packed.size, scales.size
((4,), 'uint8', 2, 1)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from device_agents.protocol import TrainConfig

BASE_DIGEST = TrainConfig.BASE_DIGEST
"""Config key of a train message whose weights are an int8 delta: the :func:`digest` of the model the
device must hold for the delta to apply (down-link compression)."""

MAX_SCALE = 10.0
"""The largest scale a receiver accepts (a weight moving by over 1,270 in one round is an attack)."""

BLOCK = 128
"""Values per int4 scale: 64 bytes of levels + 4 bytes of scale per 512 bytes of float32."""


def digest(weights: dict[str, np.ndarray]) -> str:
    """SHA-256 of a set of weights (names and bytes, in sorted-name order)."""
    import hashlib

    hashed = hashlib.sha256()
    for name in sorted(weights):
        hashed.update(name.encode() + np.ascontiguousarray(weights[name]).tobytes())
    return hashed.hexdigest()


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


def valid_scales(scales: dict[str, object], names: Iterable[str]) -> bool:
    """Whether received int8 scales name exactly ``names`` and are finite floats in (0, MAX_SCALE]."""
    return set(scales) == set(names) and all(
        isinstance(s, float) and math.isfinite(s) and 0 < s <= MAX_SCALE for s in scales.values())


def decode(deltas: dict[str, np.ndarray], scales: dict[str, float],
           base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Weights ``base + delta * scale`` from an :func:`encode` result."""
    return {name: (np.asarray(base[name], np.float32) + deltas[name].astype(np.float32) * np.float32(scales[name]))
            for name in deltas}


PACKED = "int4"
"""The one tensor of an int4 update: every tensor's levels (sorted by name), two per byte."""
SCALES = "scales"
"""The one tensor of an int4 update's scales: every tensor's block scales, in the same order."""


def int4_sizes(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """(bytes of packed levels, number of block scales) of an update of tensors of ``shapes``."""
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes.values()]
    return (sum(sizes) + 1) // 2, sum(max(1, -(-n // BLOCK)) for n in sizes)


def encode_int4(new: dict[str, np.ndarray], base: dict[str, np.ndarray], residual: dict[str, np.ndarray],
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(packed levels, block scales, error left on the device) of ``new - base + residual``.

    Each tensor is cut into its own blocks (a block never mixes two tensors); levels and scales of all
    tensors travel as one array each, in sorted-name order, so an update pays two array headers.
    ``residual``: what the last update's rounding lost (empty, or of other shapes, on a first round).
    """
    levels, scales, left = [], [], {}
    for name in sorted(new):
        delta = (np.asarray(new[name], np.float32) - np.asarray(base[name], np.float32)).ravel()
        carried = residual.get(name)
        if carried is not None and carried.shape == delta.shape:
            delta = delta + carried
        blocks = max(1, -(-delta.size // BLOCK))
        padded = np.zeros(blocks * BLOCK, np.float32)
        padded[:delta.size] = delta
        padded = padded.reshape(blocks, BLOCK)
        peak = np.abs(padded).max(axis=1)
        scale = np.where(peak > 0, peak / 7.0, 1.0).astype(np.float32)
        scaled = padded / scale[:, None]
        level = np.clip(np.floor(scaled + rng.random(scaled.shape, dtype=np.float32)), -7, 7).ravel()[:delta.size]
        left[name] = delta - level * np.repeat(scale, BLOCK)[:delta.size]
        levels.append(level.astype(np.int8))
        scales.append(scale)
    nibbles = (np.concatenate(levels) + 8).astype(np.uint8)  # 1..15
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(8))
    return nibbles[0::2] | (nibbles[1::2] << 4), np.concatenate(scales), left


def decode_int4(packed: np.ndarray, scales: np.ndarray, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Weights ``base + levels * block scale`` from an :func:`encode_int4` result (sizes already checked)."""
    nibbles = np.empty(packed.size * 2, np.int8)
    nibbles[0::2] = (packed & 0x0F).astype(np.int8)
    nibbles[1::2] = (packed >> 4).astype(np.int8)
    out, at, block = {}, 0, 0
    for name in sorted(base):
        reference = np.asarray(base[name], np.float32)
        blocks = max(1, -(-reference.size // BLOCK))
        level = (nibbles[at:at + reference.size] - 8).astype(np.float32)
        delta = level * np.repeat(np.asarray(scales[block:block + blocks], np.float32), BLOCK)[:reference.size]
        out[name] = reference + delta.reshape(reference.shape)
        at, block = at + reference.size, block + blocks
    return out
