"""What crosses the wire on a device, checked before it is used: the global weights a server sends (float32, or an
int8 delta against the model the device holds), the round settings (capped by :class:`ClientLimits`), and the update
the device sends back, encoded as the round asks (:mod:`device_agents.federated.codec`).

The server is not trusted to behave: incoming tensors are checked by name, shape and dtype before they are decoded;
round settings are capped to documented limits and non-finite ones are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agents.federated import codec
from device_agents.protocol import ClientLimits, Clipping, Codec, TrainConfig


def checked_weights(arrays: Any, tensors: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The global weights of a message, each checked by name, dtype and shape before it is decoded."""
    names = set(arrays.keys())
    if names != set(tensors):
        raise ValueError(f"the server sent tensors that are not this model's ({len(names)} sent, {len(tensors)} "
                         f"expected; unknown: {sorted(names - set(tensors))[:3]}); refusing the round")
    for name, array in arrays.items():
        if array.dtype != "float32" or tuple(array.shape) != tuple(tensors[name]):
            raise ValueError(f"the server sent tensor {name} as {array.dtype} {tuple(array.shape)}, expected "
                             f"float32 {tuple(tensors[name])}; refusing the round")
    return {name: array.numpy() for name, array in arrays.items()}


BASE = "codec-base"
"""The context-state record where a device keeps the global model it last received, for down-link deltas."""


def received_weights(content: Any, tensors: dict[str, tuple[int, ...]], context: Any) -> dict[str, np.ndarray]:
    """The global weights of a train message: float32 weights, or an int8 delta (with per-tensor scales in
    ``codec``) against the model this device holds, whose SHA-256 the config names. Everything is checked
    before it is decoded. With update compression on, the result is kept for the next round's delta."""
    from flwr.app import ArrayRecord

    if "codec" not in content.keys():
        weights = checked_weights(content["arrays"], tensors)
    else:
        state = context.state
        base = {k: v.numpy() for k, v in state[BASE].items()} if BASE in state else None
        if base is None or codec.digest(base) != content["config"].get(codec.BASE_DIGEST):
            raise ValueError("the server sent a delta against a model this device does not hold; refusing the round")
        arrays, scales = content["arrays"], dict(content["codec"].items())
        if set(arrays.keys()) != set(tensors):
            raise ValueError("the server sent a delta of tensors that are not this model's; refusing the round")
        for name, array in arrays.items():
            if array.dtype != "int8" or tuple(array.shape) != tuple(tensors[name]):
                raise ValueError(f"the server sent delta {name} as {array.dtype} {tuple(array.shape)}, expected "
                                 f"int8 {tuple(tensors[name])}; refusing the round")
        if not codec.valid_scales(scales, tensors):
            raise ValueError("the server sent a delta with invalid scales; refusing the round")
        weights = codec.decode({k: v.numpy() for k, v in arrays.items()}, scales, base)
    if codec_of(content["config"]) is not Codec.FLOAT32:
        context.state[BASE] = ArrayRecord({k: as_array(v) for k, v in weights.items()})
    return weights


def clipping_of(config: Any) -> Clipping:
    """The clipping a round asks for; a value the device does not know refuses the round."""
    value = config.get(TrainConfig.DP_CLIPPING, Clipping.NONE.value)
    try:
        return Clipping(value)
    except ValueError:
        raise ValueError(f"the server asked for {TrainConfig.DP_CLIPPING} {str(value)[:40]!r}; "
                         "refusing the round") from None


@dataclass(frozen=True)
class LocalRound:
    """How this device trains in one round, as the server asked and this device's limits allow."""

    epochs: int
    learning_rate: float
    mu: float        # FedProx's proximal term
    momentum: float  # on-device heavy-ball momentum (0: plain SGD)
    seed: int

    def fit_options(self) -> dict[str, float]:
        """The keyword arguments :meth:`Trainer.fit_safely` takes from this round (but the seed)."""
        return {"epochs": self.epochs, "learning_rate": self.learning_rate, "mu": self.mu, "momentum": self.momentum}


def round_settings(config: Any, limits: ClientLimits) -> LocalRound:
    """The round's local training from the server's config: capped, non-finite or out-of-range refused."""

    def number(key: str, default: float) -> float:
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"the server's {key} {value!r} is not a finite number; refusing the round")
        return value

    learning_rate = number(TrainConfig.LEARNING_RATE, 0.05)
    if learning_rate <= 0:
        raise ValueError(f"the server's learning-rate {learning_rate} is not positive; refusing the round")
    momentum = number(TrainConfig.MOMENTUM, 0.0)
    if not 0 <= momentum < 1:
        raise ValueError(f"the server's momentum {momentum} is not in [0, 1); refusing the round")
    return LocalRound(epochs=min(max(1, int(number(TrainConfig.LOCAL_EPOCHS, 1))), limits.max_local_epochs),
                      learning_rate=min(learning_rate, limits.max_learning_rate),
                      mu=min(max(0.0, number(TrainConfig.PROXIMAL_MU, 0.0)), limits.max_proximal_mu),
                      momentum=min(momentum, limits.max_momentum),
                      seed=int(number(TrainConfig.SEED, 0)) % 2**31)


def tensors_digest(tensors: dict[str, tuple[int, ...]]) -> str:
    """SHA-256 of a trainable model's tensor names and shapes (what must match between server and devices)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(sorted((k, list(v)) for k, v in tensors.items())).encode()).hexdigest()


def codec_of(config: Any) -> Codec:
    """The codec a round asks for (``True``/``False`` from older servers: int8 / none)."""
    value = config.get(TrainConfig.COMPRESS_UPDATES, Codec.FLOAT32.value)
    if isinstance(value, bool):
        return Codec.INT8 if value else Codec.FLOAT32
    try:
        return Codec(value)
    except ValueError:
        raise ValueError(f"the server asked for update codec {value!r}; this device knows "
                         f"{', '.join(c.value for c in Codec)}") from None


RESIDUAL = "codec-residual"
"""The context-state record where an int4 device keeps what its last update's rounding lost."""


def encode_update(content: Any, used: Codec, new: dict[str, np.ndarray], base: dict[str, np.ndarray], context: Any,
            *, rng: np.random.Generator, hostile_scale: bool) -> None:
    """Put the update into ``content`` as ``used`` encodes it."""
    from flwr.app import ArrayRecord, ConfigRecord

    if used is Codec.INT8:
        deltas, scales = codec.encode(new, base)
        content["arrays"] = ArrayRecord({k: as_array(v) for k, v in deltas.items()})
        content["codec"] = ConfigRecord({k: 1e30 if hostile_scale else float(s) for k, s in scales.items()})
    elif used is Codec.INT4:
        state = context.state
        kept = {k: v.numpy() for k, v in state[RESIDUAL].items()} if RESIDUAL in state else {}
        packed, scales, left = codec.encode_int4(new, base, kept, rng)
        state[RESIDUAL] = ArrayRecord({k: as_array(v) for k, v in left.items()})
        content["arrays"] = ArrayRecord({codec.PACKED: as_array(packed)})
        sent = np.full_like(scales, 1e30) if hostile_scale else scales
        content["codec"] = ArrayRecord({codec.SCALES: as_array(sent)})
    else:
        content["arrays"] = ArrayRecord({k: as_array(v) for k, v in new.items()})


def as_array(value: np.ndarray) -> Any:
    from flwr.app import Array

    return Array(np.ascontiguousarray(value))
