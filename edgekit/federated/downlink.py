"""Down-link compression: the global model goes to a device as int8 deltas against the model it holds.

The server keeps one *broadcast model* ``b``: each round ``b`` moves towards the new global model ``w``
by an int8 delta, ``b' = b + q(w - b)`` (one scale per tensor, :func:`device_agents.federated.codec.encode`). A
device that holds ``b`` (it replied in the requested codec in the last round: it stored ``b`` and its
updates are not float32, so no local-DP mod reads the message as weights) receives only the int8 delta
and the SHA-256 of the ``b`` it must hold; any other device receives ``b'`` in float32. Every device
trains from ``b'``, which the server rebuilds with the same float32 arithmetic, so replies are decoded
against exactly what each device started from. The rounding error of ``w - b`` is at most half a step
of one round's change and is not carried over.

>>> import numpy as np
>>> link = Downlink()
>>> sent = link.advance({"w": np.ones(3, np.float32)})   # nobody holds anything yet: float32 to all
>>> sorted(link.holders), sent["w"].dtype.name
([], 'float32')
"""

from __future__ import annotations

from typing import Any

import numpy as np

from device_agents.federated import codec


class Downlink:
    """The broadcast model and which devices hold it."""

    def __init__(self) -> None:
        self.base: dict[str, np.ndarray] | None = None
        self.holders: set[int] = set()
        self._delta: tuple[dict[str, np.ndarray], dict[str, float], str] | None = None

    def advance(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Move the broadcast model towards ``weights``; return the model every device trains from this round."""
        if self.base is None:
            self.base, self._delta = {k: np.array(v, np.float32) for k, v in weights.items()}, None
            return self.base
        deltas, scales = codec.encode(weights, self.base)
        previous = codec.digest(self.base)
        self.base = codec.decode(deltas, scales, self.base)
        self._delta = (deltas, scales, previous)
        return self.base

    def compress(self, messages: list[Any]) -> None:
        """Replace the content of each message to a holder with the int8 delta (in place)."""
        from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

        if self._delta is None:
            return
        deltas, scales, previous = self._delta
        for message in messages:
            if message.metadata.dst_node_id not in self.holders:
                continue
            config = dict(message.content["config"].items())
            message.content = RecordDict({
                "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in deltas.items()}),
                "codec": ConfigRecord({k: float(s) for k, s in scales.items()}),
                "config": ConfigRecord({**config, codec.BASE_DIGEST: previous})})

    def settle(self, replied_in_codec: set[int]) -> None:
        """After a round: the devices that replied in the requested codec now hold the broadcast model."""
        self.holders = set(replied_in_codec)


def payload_bytes(content: Any) -> int:
    """Bytes of the tensors and codec scales a message carries (a ConfigRecord float travels as 8 bytes)."""
    from flwr.app import ArrayRecord

    total = 0
    for name in ("arrays", "codec"):
        if name in content:
            record = content[name]
            total += sum(len(a.data) for a in record.values()) if isinstance(record, ArrayRecord) else 8 * len(record)
    return total
