"""The Flower ClientApp of a device: trains edgekit's trainable artifact on local data with LiteRT.

Only weights (or int8 weight deltas) and aggregate metrics leave the device: the number of examples,
the mean loss and the accuracy. No sample, label or per-sample value is ever put in a reply.

Message protocol (Flower Message API):

- train: content ``arrays`` (global weights by tensor name) and ``config`` (``local-epochs``,
  ``learning-rate``, ``momentum`` (on-device heavy-ball momentum, 0 if absent), ``proximal-mu``,
  ``compress-updates`` (``float32``, ``int8`` or ``int4``; see
  :mod:`device_agents.codec`), ``seed``, ``dp-clipping``: ``fixed`` or ``adaptive`` when the round is
  differentially private, and Flower's DP wrapper adds the clipping norm; the device clips its update with
  Flower's mod). Reply: ``arrays`` (weights; int8 deltas; or packed int4
  deltas in one ``int4`` tensor), ``codec`` (int8: a ConfigRecord of per-tensor scales; int4: one ``scales``
  tensor of block scales)
  and ``metrics`` (``num-examples``, ``train-loss``, ``train-accuracy``, ``learning-rate``: the rate the
  device trained at, below the server's when its local loss diverged and it halved it,
  :meth:`~device_agents.training.Trainer.fit_safely`). An int4 device keeps what
  rounding lost in its Flower context state (``codec-residual``) and adds it to its next update.
  With compression on, the server may send the global model as an int8 delta (``arrays`` int8, ``codec``
  per-tensor scales, config ``base-sha256``) against the model the device kept from the last round
  (context state ``codec-base``); a device that does not hold that exact model refuses the round.
- evaluate: content ``arrays``; reply ``metrics`` (``num-examples``, ``eval-loss``, ``eval-accuracy``).

The server is not trusted to behave (:class:`ClientLimits`): incoming tensors are checked by name,
shape and dtype before they are decoded; round settings are capped to documented limits and
non-finite ones are refused; evaluation answers only for the global weights the device last
trained from, once per train round, with coarse metrics (accuracy on a 5-point grid, counts to tens),
so crafted weights cannot probe the device's label counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from device_agents import codec, fleet
from device_agents.errors import TrainingError
from device_agents.files import read_npz
from device_agents.training import Trainer

_TRAINERS: dict[str, Trainer] = {}


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


class Clipping(str, Enum):
    """How a device clips its update for central differential privacy (Flower's client-side mods)."""

    NONE = "none"
    FIXED = "fixed"        # fixedclipping_mod: to the norm the server sends
    ADAPTIVE = "adaptive"  # adaptiveclipping_mod: also reports whether its update was clipped (norm_bit)


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
        keys = {"max-local-epochs": ("max_local_epochs", int), "max-learning-rate": ("max_learning_rate", float),
                "max-momentum": ("max_momentum", float),
                "evaluate": ("evaluate", str), "local-dp-epsilon": ("local_dp_epsilon", float),
                "local-dp-clip": ("local_dp_clip", float), "local-dp-delta": ("local_dp_delta", float)}
        values = {field_name: kind(node[key]) for key, (field_name, kind) in keys.items() if key in node}
        return cls(**values)


@dataclass(frozen=True)
class ClientSettings:
    """Where a client finds its artifact and its private data.

    ``data_dir`` holds ``<partition-id>.npz`` files (x, y); a real device points at its own file.
    ``faults`` maps a partition id to a :class:`Fault` to rehearse faulty clients.
    ``audit_dir`` keeps a copy of every outgoing reply (arrays and records), so a device owner can
    check what left the device.
    """

    artifact_dir: str | None = None  # None: read "artifact-dir" from the SuperNode's --node-config
    data_dir: str | None = None      # None: read "data-dir" from the SuperNode's --node-config
    faults: dict[int, Fault] = field(default_factory=dict)
    audit_dir: str | None = None  # when set, every reply this client sends is also written here
    limits: ClientLimits | None = None  # None: ClientLimits from the SuperNode's --node-config

    def __post_init__(self) -> None:
        object.__setattr__(self, "faults", {int(k): Fault(v) for k, v in self.faults.items()})


def _trainer(artifact_dir: str) -> Trainer:
    if artifact_dir not in _TRAINERS:  # one interpreter per process, reused across rounds
        # the runtime is picked as the agent picks it: LiteRT, else tflite-runtime
        _TRAINERS[artifact_dir] = Trainer.load(artifact_dir, num_threads=1)
    return _TRAINERS[artifact_dir]


def _artifact_dir(settings: ClientSettings, context: Any) -> str:
    """The trainable artifact: ``artifact-dir`` of the node config, else the store's newest trainable version
    (a trainable release rolled out to the fleet)."""
    node = context.node_config
    if settings.artifact_dir or "artifact-dir" in node:
        return settings.artifact_dir or str(node["artifact-dir"])
    if "store" in node:
        from device_agents.store import ModelStore

        folder = ModelStore(str(node["store"])).newest("trainable")
        if folder is not None:
            return str(folder)
    raise ValueError("this device has no trainable artifact: roll out a trainable release to it first")


def _local_data(settings: ClientSettings, context: Any) -> tuple[int, np.ndarray, np.ndarray]:
    node = context.node_config
    pid = int(node.get("partition-id", 0))
    if settings.data_dir is None and "data-file" in node:
        path = Path(str(node["data-file"]))
    else:
        path = Path(settings.data_dir or str(node["data-dir"])) / f"{pid}.npz"
    arrays = read_npz(path, names=("x", "y"))  # sizes checked before reading
    if "x" not in arrays or "y" not in arrays:
        raise ValueError(f"{path} needs arrays x and y to train on")
    return pid, arrays["x"].astype(np.float32), arrays["y"].astype(np.int64)


_LAST_TRAINED: dict[tuple[str, int], str] = {}  # (artifact dir, partition) -> digest of the weights last trained from


def _limits(settings: ClientSettings, context: Any) -> ClientLimits:
    return settings.limits or ClientLimits.from_node_config(context.node_config)


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
    if _codec(content["config"]) is not codec.Codec.FLOAT32:
        context.state[BASE] = ArrayRecord({k: _array(v) for k, v in weights.items()})
    return weights


DP_CLIPPING = "dp-clipping"
"""The train config key that asks devices to clip their updates (``fixed``/``adaptive``; ``none`` or absent: no
central differential privacy this round)."""


def clipping_of(config: Any) -> Clipping:
    """The clipping a round asks for; a value the device does not know refuses the round."""
    value = config.get(DP_CLIPPING, Clipping.NONE.value)
    try:
        return Clipping(value)
    except ValueError:
        raise ValueError(f"the server asked for {DP_CLIPPING} {str(value)[:40]!r}; refusing the round") from None


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

    learning_rate = number("learning-rate", 0.05)
    if learning_rate <= 0:
        raise ValueError(f"the server's learning-rate {learning_rate} is not positive; refusing the round")
    momentum = number("momentum", 0.0)
    if not 0 <= momentum < 1:
        raise ValueError(f"the server's momentum {momentum} is not in [0, 1); refusing the round")
    return LocalRound(epochs=min(max(1, int(number("local-epochs", 1))), limits.max_local_epochs),
                      learning_rate=min(learning_rate, limits.max_learning_rate),
                      mu=min(max(0.0, number("proximal-mu", 0.0)), limits.max_proximal_mu),
                      momentum=min(momentum, limits.max_momentum),
                      seed=int(number("seed", 0)) % 2**31)


def make_client_app(settings: ClientSettings) -> Any:
    """A ``flwr.clientapp.ClientApp`` bound to ``settings``."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def audit_mod(message: Any, context: Any, call_next: Any) -> Any:
        """Outermost mod: records each reply exactly as it leaves the device (after clipping)."""
        reply = call_next(message, context)
        if settings.audit_dir is not None and not reply.has_error():
            pid = int(context.node_config.get("partition-id", 0))
            kind = message.metadata.message_type.split(".")[0]
            rnd = int(message.content["config"].get("server-round", 0)) if "config" in message.content else 0
            _audit(settings, pid, f"{kind}-r{rnd}", reply.content)
        return reply

    def local_dp_mod(message: Any, context: Any, call_next: Any) -> Any:
        """Flower's LocalDpMod, when this device's limits ask for local DP (read per message: node config)."""
        limits = _limits(settings, context)
        if limits.local_dp_epsilon is None:
            return call_next(message, context)
        from flwr.clientapp.mod import LocalDpMod

        mod = LocalDpMod(limits.local_dp_clip, limits.local_dp_clip, limits.local_dp_epsilon, limits.local_dp_delta)
        return mod(message, context, call_next)

    def central_dp_mod(message: Any, context: Any, call_next: Any) -> Any:
        """Flower's fixed or adaptive clipping mod, as the round's ``dp-clipping`` asks (central DP with
        client-side clipping: the server adds the noise, each device clips its own update)."""
        clipping = clipping_of(message.content["config"] if "config" in message.content.keys() else {})
        if clipping is Clipping.NONE:
            return call_next(message, context)
        from flwr.clientapp import mod

        chosen = mod.fixedclipping_mod if clipping is Clipping.FIXED else mod.adaptiveclipping_mod
        return chosen(message, context, call_next)

    mods = [audit_mod, local_dp_mod, central_dp_mod]

    @app.train(mods=mods)
    def train(message: Any, context: Any) -> Any:
        artifact_dir = _artifact_dir(settings, context)
        trainer = _trainer(artifact_dir)
        config = message.content["config"]
        local_round = round_settings(config, _limits(settings, context))
        global_weights = received_weights(message.content, trainer.tensors, context)
        pid, x, y = _local_data(settings, context)
        fault = settings.faults.get(pid)
        if fault is Fault.LABEL_FLIP:
            y = (trainer.tensors[list(trainer.tensors)[-1]][-1] - 1 - y).astype(y.dtype)
        trainer.set_weights(global_weights)
        _LAST_TRAINED[(artifact_dir, pid)] = codec.digest(global_weights)
        local = trainer.fit_safely(x, y, **local_round.fit_options(), seed=local_round.seed * 100_003 + pid)
        metrics = {"num-examples": len(x), "train-loss": float(local.losses[-1]),
                   "train-accuracy": float(local.accuracy), "learning-rate": float(local.learning_rate)}
        new = trainer.get_weights()
        if fault is not None:
            new, metrics = _rehearse(fault, pid, new, metrics, output_bias=list(trainer.tensors)[-1],
                                     base=global_weights)
        content = RecordDict({"metrics": MetricRecord(metrics)})
        used = _codec(config) if _limits(settings, context).local_dp_epsilon is None else codec.Codec.FLOAT32
        if fault not in (None, Fault.CODEC_SCALE, Fault.LABEL_FLIP):
            used = codec.Codec.FLOAT32
        _encode(content, used, new, global_weights, context, rng=np.random.default_rng([local_round.seed, pid]),
                hostile_scale=fault is Fault.CODEC_SCALE)
        return Message(content, reply_to=message)

    @app.query(PERSONALIZE, mods=[audit_mod])
    def personalize(message: Any, context: Any) -> Any:
        trainer = _trainer(_artifact_dir(settings, context))
        config = message.content["config"]
        local_round = round_settings({**dict(config.items()), "local-epochs": config.get(
            "personalize-epochs", 1)}, _limits(settings, context))
        weights = checked_weights(message.content["arrays"], trainer.tensors)
        pid, x, y = _local_data(settings, context)
        metrics, head = personalized_head(trainer, weights, x, y, epochs=local_round.epochs,
                                          learning_rate=local_round.learning_rate,
                                          seed=local_round.seed * 100_003 + pid)
        context.state[PERSONAL_HEAD] = ArrayRecord({k: _array(v) for k, v in head.items()})
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)

    def fleet_reply(message: Any, result: tuple[dict[str, float], dict[str, str]]) -> Any:
        from flwr.app import ConfigRecord

        metrics, text = result
        return Message(RecordDict({"metrics": MetricRecord(fleet.finite(metrics)), "text": ConfigRecord(text)}),
                       reply_to=message)

    @app.query(TRAINABLE, mods=[audit_mod])
    def trainable(message: Any, context: Any) -> Any:
        from flwr.app import ConfigRecord

        try:
            digest, reason = tensors_digest(_trainer(_artifact_dir(settings, context)).tensors), ""
        except Exception as exc:  # noqa: BLE001 (no trainable artifact, or one that does not load: say so)
            digest, reason = "", " ".join(str(exc).split())[:200]
        return Message(RecordDict({"text": ConfigRecord({"tensors-sha256": digest, "reason": reason})}),
                       reply_to=message)

    @app.query(fleet.INSTALL, mods=[audit_mod])
    def install(message: Any, context: Any) -> Any:
        return fleet_reply(message, fleet.install(message.content["release"], context.node_config))

    @app.query(fleet.ROLLBACK, mods=[audit_mod])
    def rollback(message: Any, context: Any) -> Any:
        from_id = str(message.content["config"].get("from-id", ""))
        return fleet_reply(message, fleet.rollback(from_id, context.node_config))

    @app.query(fleet.STATUS, mods=[audit_mod])
    def status(message: Any, context: Any) -> Any:
        return fleet_reply(message, fleet.status(context.node_config))

    @app.evaluate(mods=[audit_mod])
    def evaluate(message: Any, context: Any) -> Any:
        artifact_dir = _artifact_dir(settings, context)
        trainer = _trainer(artifact_dir)
        if _limits(settings, context).evaluate == "off":
            raise ValueError("this device does not answer evaluation requests (node config evaluate=off)")
        weights = checked_weights(message.content["arrays"], trainer.tensors)
        pid, x, y = _local_data(settings, context)
        # only the global model this device last trained from, once: crafted weights cannot probe labels
        if _LAST_TRAINED.pop((artifact_dir, pid), None) != codec.digest(weights):
            raise ValueError("evaluation is answered once per train round, for the weights last trained from")
        trainer.set_weights(weights)
        loss, accuracy = trainer.evaluate(x, y)
        metrics = MetricRecord({"num-examples": max(10, len(x) // 10 * 10), "eval-loss": round(loss, 2),
                                "eval-accuracy": float(round(accuracy / 5) * 5)})
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    return app


TRAINABLE = "trainable"
"""The query a server sends before federated rounds: which trainable model (its tensor names and shapes) the
device would train; the reply's ``tensors-sha256`` is :func:`tensors_digest`, or empty with a ``reason``."""


def tensors_digest(tensors: dict[str, tuple[int, ...]]) -> str:
    """SHA-256 of a trainable model's tensor names and shapes (what must match between server and devices)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(sorted((k, list(v)) for k, v in tensors.items())).encode()).hexdigest()


PERSONALIZE = "personalize"
"""The query action after the rounds: fine-tune the head on the device's own data and keep it there."""
PERSONAL_HEAD = "personal-head"
"""The context-state record where a device keeps its fine-tuned head."""
PERSONALIZE_METRICS = ("num-examples", "accuracy-before", "accuracy-after", "kept")
"""What a personalisation reply carries: counts in tens, accuracies on a 5-point grid, whether the device
kept its fine-tuned head (1) or the global one (0)."""


def personalized_head(trainer: Trainer, weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, *,
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
    metrics = {"num-examples": max(10, len(held) // 10 * 10), "accuracy-before": float(round(before / 5) * 5),
               "accuracy-after": float(round(after / 5) * 5), "kept": int(kept)}
    return metrics, {k: v for k, v in (trainer.get_weights() if kept else weights).items() if k in head}


def _codec(config: Any) -> codec.Codec:
    """The codec a round asks for (``True``/``False`` from older servers: int8 / none)."""
    value = config.get("compress-updates", codec.Codec.FLOAT32.value)
    if isinstance(value, bool):
        return codec.Codec.INT8 if value else codec.Codec.FLOAT32
    try:
        return codec.Codec(value)
    except ValueError:
        raise ValueError(f"the server asked for update codec {value!r}; this device knows "
                         f"{', '.join(c.value for c in codec.Codec)}") from None


RESIDUAL = "codec-residual"
"""The context-state record where an int4 device keeps what its last update's rounding lost."""


def _encode(content: Any, used: codec.Codec, new: dict[str, np.ndarray], base: dict[str, np.ndarray], context: Any,
            *, rng: np.random.Generator, hostile_scale: bool) -> None:
    """Put the update into ``content`` as ``used`` encodes it."""
    from flwr.app import ArrayRecord, ConfigRecord

    if used is codec.Codec.INT8:
        deltas, scales = codec.encode(new, base)
        content["arrays"] = ArrayRecord({k: _array(v) for k, v in deltas.items()})
        content["codec"] = ConfigRecord({k: 1e30 if hostile_scale else float(s) for k, s in scales.items()})
    elif used is codec.Codec.INT4:
        state = context.state
        kept = {k: v.numpy() for k, v in state[RESIDUAL].items()} if RESIDUAL in state else {}
        packed, scales, left = codec.encode_int4(new, base, kept, rng)
        state[RESIDUAL] = ArrayRecord({k: _array(v) for k, v in left.items()})
        content["arrays"] = ArrayRecord({codec.PACKED: _array(packed)})
        content["codec"] = ArrayRecord({codec.SCALES: _array(np.full_like(scales, 1e30) if hostile_scale else scales)})
    else:
        content["arrays"] = ArrayRecord({k: _array(v) for k, v in new.items()})


def _rehearse(fault: Fault, pid: int, new: dict[str, np.ndarray], metrics: dict[str, Any], *,
              output_bias: str, base: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """What a faulty or hostile device sends instead of its honest reply (tests and drills)."""
    if fault is Fault.CRASH:
        raise RuntimeError(f"client {pid}: simulated crash")
    if fault is Fault.NAN:
        new = {k: np.full_like(v, np.nan) for k, v in new.items()}
    elif fault is Fault.SHAPE:
        new = {k: v[..., :1] if v.ndim else v for k, v in new.items()}
    elif fault is Fault.SCALE:
        new = {k: (v * np.float32(1e30)).astype(np.float32) for k, v in new.items()}
    elif fault is Fault.LIAR:  # the output bias makes every prediction class 0
        bias = np.zeros_like(new[output_bias])
        bias[..., 0] = 100.0
        new = {**new, output_bias: bias}
        metrics = {**metrics, "num-examples": 10**12}
    elif fault is Fault.SIGN_FLIP:
        new = {k: (base[k] - np.float32(4.5) * (v - base[k])).astype(v.dtype) for k, v in new.items()}
        metrics = {**metrics, "num-examples": int(metrics["num-examples"]) * 100}
    elif fault is Fault.FLOAT64:
        new = {k: np.full(v.shape, 1e300, np.float64) for k, v in new.items()}
    elif fault is Fault.NAN_EXAMPLES:
        metrics = {**metrics, "num-examples": float("nan")}
    elif fault is Fault.LIST_EXAMPLES:
        metrics = {**metrics, "num-examples": [5]}
    elif fault is Fault.EXTRA_METRIC:
        metrics = {**metrics, "label-0-count": 17}
    return new, metrics


def _array(value: np.ndarray) -> Any:
    from flwr.app import Array

    return Array(np.ascontiguousarray(value))


def _audit(settings: ClientSettings, pid: int, kind: str, content: Any) -> None:
    """Write what a reply carries: every array, and every metric/config value."""
    if settings.audit_dir is None:
        return
    import json
    import os

    folder = Path(settings.audit_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"client{pid}-{kind}-{os.getpid()}-{len(list(folder.iterdir()))}"
    from flwr.app import ArrayRecord

    tensors = [name for name in ("arrays", "codec") if name in content and isinstance(content[name], ArrayRecord)]
    arrays = {f"{record}/{k}": v.numpy() for record in tensors for k, v in content[record].items()}
    np.savez(f"{stem}.npz", **{k.replace("/", "__"): v for k, v in arrays.items()})
    records = {name: {k: v for k, v in content[name].items()} for name in ("metrics", "codec")
               if name in content and name not in tensors}
    Path(f"{stem}.json").write_text(json.dumps(records, default=float))


def deployed_client_app() -> Any:
    """The ClientApp a SuperNode runs: ``--node-config 'partition-id=0 data-dir="..." artifact-dir="..."'``."""
    return make_client_app(ClientSettings())


def make_secagg_client_app(settings: ClientSettings) -> Any:
    """A ClientApp for secure aggregation (SecAgg+).

    In Flower 1.41, SecAgg+ works only through the legacy fit path: a ``NumPyClient`` with
    ``secaggplus_mod``. The server then receives only the masked sum of all updates, never an
    individual one. Weights travel as a list in the manifest's tensor order.
    """
    from flwr.client import ClientApp as LegacyClientApp
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod

    class DeviceClient(NumPyClient):
        def __init__(self, context: Any) -> None:
            self.context = context
            self.trainer = _trainer(_artifact_dir(settings, context))
            self.names = list(self.trainer.tensors)

        def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
            pid, x, y = _local_data(settings, self.context)
            local_round = round_settings(config, _limits(settings, self.context))
            if len(parameters) != len(self.names) or any(
                    tuple(np.shape(p)) != tuple(self.trainer.tensors[n]) for p, n in zip(parameters, self.names)):
                raise ValueError("the server sent tensors that are not this model's; refusing the round")
            self.trainer.set_weights(dict(zip(self.names, parameters)))
            local = self.trainer.fit_safely(x, y, **local_round.fit_options(), seed=local_round.seed * 100_003 + pid)
            new = self.trainer.get_weights()
            return [new[n] for n in self.names], len(x), {"train-loss": float(local.losses[-1])}

    def client_fn(context: Any) -> Any:
        return DeviceClient(context).to_client()

    return LegacyClientApp(client_fn=client_fn, mods=[secaggplus_mod])
