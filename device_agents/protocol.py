"""The wire between edgekit's server and a device, in one place: message names, config and metric keys, the
enums both sides parse, the caps a device obeys, and the environment of every Flower process.

Imported by both sides (``edgekit.federated``, ``edgekit.fleet`` and this package's ClientApp and fleet agent);
imports nothing of either, so it sits at the bottom of the tree. A key spelled anywhere else is a bug.

>>> TrainConfig.LEARNING_RATE, sorted(TRAIN_METRICS)[:2]
('learning-rate', ['learning-rate', 'num-examples'])
>>> Codec("int4") is Codec.INT4
True
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
"""Set for every Flower process either side starts: Flower never calls out to the internet."""


class TrainConfig:
    """Keys of a train message's ``config`` record (server -> device): plain strings, as they go on the wire."""

    LOCAL_EPOCHS = "local-epochs"
    LEARNING_RATE = "learning-rate"
    MOMENTUM = "momentum"            # on-device heavy-ball momentum (0 if absent)
    PROXIMAL_MU = "proximal-mu"      # FedProx's proximal term
    COMPRESS_UPDATES = "compress-updates"  # a :class:`Codec` value
    SEED = "seed"
    DP_CLIPPING = "dp-clipping"      # a :class:`Clipping` value: the device clips its update with Flower's mod
    BASE_DIGEST = "base-sha256"      # the weights are an int8 delta against the model with this digest
    SERVER_ROUND = "server-round"    # set by Flower
    PERSONALIZE_EPOCHS = "personalize-epochs"  # in a personalize query


class Metric:
    """Metric keys of the replies (device -> server)."""

    NUM_EXAMPLES = "num-examples"        # counts; rounded to tens in evaluate and personalize replies
    TRAIN_LOSS = "train-loss"
    TRAIN_ACCURACY = "train-accuracy"
    LEARNING_RATE = "learning-rate"      # the rate the device trained at (halved when its local loss diverged)
    EVAL_LOSS = "eval-loss"              # to 2 places
    EVAL_ACCURACY = "eval-accuracy"      # on a 5-point grid
    ACCURACY_BEFORE = "accuracy-before"  # personalize: the global head on the device's held-out data, 5-point grid
    ACCURACY_AFTER = "accuracy-after"    # personalize: the fine-tuned head
    KEPT = "kept"                        # personalize: 1 when the device kept its fine-tuned head


TRAIN_METRICS = {Metric.NUM_EXAMPLES: int, Metric.TRAIN_LOSS: float, Metric.TRAIN_ACCURACY: float,
                 Metric.LEARNING_RATE: float}
"""A train reply's metrics and their types."""
EVAL_METRICS = {Metric.NUM_EXAMPLES: int, Metric.EVAL_LOSS: float, Metric.EVAL_ACCURACY: float}
"""An evaluate reply's metrics and their types."""
PERSONALIZE_METRICS = (Metric.NUM_EXAMPLES, Metric.ACCURACY_BEFORE, Metric.ACCURACY_AFTER, Metric.KEPT)
"""What a personalisation reply carries."""


class Query:
    """Query names (Flower message types ``query.<name>``) a device answers besides train and evaluate."""

    TRAINABLE = "trainable"      # which trainable model the device would train: ``tensors-sha256`` or a ``reason``
    PERSONALIZE = "personalize"  # fine-tune the head on the device's own data and keep it there
    INSTALL = "install"          # a ConfigRecord ``release`` of file name -> bytes
    ROLLBACK = "rollback"        # config ``from-id``: roll back only when that version is the one served
    STATUS = "status"            # the versions the store holds, and a measurement of the current one
    TELEMETRY = "telemetry"      # the serving-statistics windows of the store's spool (TelemetryWire)


class TelemetryWire:
    """The keys of a telemetry collection: the server's config says ``through`` (the newest spool sequence it has
    stored of this device) and ``spool`` (the id of the spool it counted in); the device drains those windows
    when that is its spool's id. The reply carries ``windows`` (a ConfigRecord of spool sequence, 12 digits -> the
    window's JSON bytes, oldest first, at most :data:`MAX_WINDOWS`), the metric ``last-sequence`` (the newest
    sequence the spool holds) and a ConfigRecord ``spool`` with the spool's ``id`` (16 hex digits)."""

    THROUGH = "through"
    SPOOL = "spool"
    SPOOL_ID = "id"
    WINDOWS = "windows"
    LAST_SEQUENCE = "last-sequence"


MAX_WINDOWS = 256
"""The most serving-statistics windows one telemetry reply carries (the rest come with the next collection)."""
MAX_WINDOW_BYTES = 1 << 20
"""The most bytes one window may take (a spool's default size)."""


MEASURE = ("inferences", "errors", "p50-ms", "p99-ms", "peak-rss-mib", "accuracy", "samples")
"""The numbers of one fleet measurement; ``accuracy`` is -1 when the device has no labels."""
FLEET_METRICS = ("ok", "release", "previous-release", *MEASURE, *(f"previous-{name}" for name in MEASURE))
"""Every metric a fleet reply carries (missing measurements are -1)."""
MAX_SAMPLES = 200
"""The most samples a fleet measurement runs (so the most inferences a reply can honestly claim)."""
MAX_FILES = 32
"""The most files a release message may carry."""
MAX_RELEASE_BYTES = 1 << 30
"""The most bytes a release message may carry."""


class Codec(str, Enum):
    """How a client encodes its update (:mod:`device_agents.federated.codec`)."""

    FLOAT32 = "float32"  # the new weights themselves
    INT8 = "int8"        # int8 deltas, one scale per tensor
    INT4 = "int4"        # packed int4 deltas, one scale per block, with error feedback


class Clipping(str, Enum):
    """How a device clips its update for central differential privacy (Flower's client-side mods)."""

    NONE = "none"
    FIXED = "fixed"        # fixedclipping_mod: to the norm the server sends
    ADAPTIVE = "adaptive"  # adaptiveclipping_mod: also reports whether its update was clipped (norm_bit)


class Fault(str, Enum):
    """A rehearsed client fault (tests and drills): what a faulty or hostile device does in a train round."""

    CRASH = "crash"                # raises: the round sees an error reply (a dropout)
    NAN = "nan"                    # replies with NaN weights
    SHAPE = "shape"                # replies with wrongly shaped tensors
    SCALE = "scale"                # weights x 1e30: finite, and poison to an average
    LIAR = "liar"                  # a plausible "always class 0" model claiming 1e12 examples
    FLOAT64 = "float64"            # float64 weights of 1e300
    NAN_EXAMPLES = "nan-examples"  # num-examples = NaN
    LIST_EXAMPLES = "list-examples"  # num-examples = [5]
    EXTRA_METRIC = "extra-metric"  # one metric key more than the protocol has
    CODEC_SCALE = "codec-scale"    # compressed update with a scale of 1e30
    SIGN_FLIP = "sign-flip"        # its update reversed and scaled x4.5, claiming 100x its examples
    LABEL_FLIP = "label-flip"      # trains honestly on permuted labels (class c taught as the last class - c)


@dataclass(frozen=True)
class ClientLimits:
    """What a device obeys of the server's round settings (node config keys in brackets).

    ``max_local_epochs`` [max-local-epochs], ``max_learning_rate`` [max-learning-rate], ``max_momentum``
    [max-momentum] and ``max_proximal_mu`` cap the values the server sends; non-finite values are refused.
    ``evaluate`` [evaluate]: ``"coarse"`` (default) or ``"off"``.
    ``local_dp_epsilon`` [local-dp-epsilon]: when set, the device adds its own Gaussian noise to every
    update (Flower's ``LocalDpMod``: clipped to ``local_dp_clip`` [local-dp-clip], sensitivity = that
    norm, ``local_dp_delta`` [local-dp-delta]), for devices that do not trust the server; updates are
    then sent uncompressed.
    """

    max_local_epochs: int = 10
    max_learning_rate: float = 1.0
    max_proximal_mu: float = 10.0
    max_momentum: float = 0.9
    evaluate: str = "coarse"
    local_dp_epsilon: float | None = None
    local_dp_clip: float = 1.0
    local_dp_delta: float = 1e-5

    def __post_init__(self) -> None:
        if not 0 <= self.max_momentum < 1:
            raise ValueError(f"max-momentum must be in [0, 1), got {self.max_momentum}")
        if self.evaluate not in ("coarse", "off"):
            raise ValueError(f"evaluate must be 'coarse' or 'off', got {self.evaluate!r}")
        if self.local_dp_epsilon is not None and not (self.local_dp_epsilon > 0 and self.local_dp_clip > 0
                                                      and 0 < self.local_dp_delta < 1):
            raise ValueError("local DP needs epsilon > 0, a clipping norm > 0 and delta in (0, 1)")

    @classmethod
    def from_node_config(cls, node: Any) -> ClientLimits:
        """The limits a SuperNode's ``--node-config`` sets (defaults for the keys it lacks)."""
        keys = {"max-local-epochs": ("max_local_epochs", int), "max-learning-rate": ("max_learning_rate", float),
                "max-momentum": ("max_momentum", float),
                "evaluate": ("evaluate", str), "local-dp-epsilon": ("local_dp_epsilon", float),
                "local-dp-clip": ("local_dp_clip", float), "local-dp-delta": ("local_dp_delta", float)}
        values = {field_name: kind(node[key]) for key, (field_name, kind) in keys.items() if key in node}
        return cls(**values)
