"""The Flower ClientApp of a device: trains edgekit's trainable artifact on local data with LiteRT.

Only weights (or int8 weight deltas) and aggregate metrics leave the device: the number of examples,
the mean loss and the accuracy. No sample, label or per-sample value is ever put in a reply.

Message protocol (Flower Message API; every key is spelled in :mod:`device_agents.protocol`):

- train: content ``arrays`` (global weights by tensor name) and ``config`` (``local-epochs``,
  ``learning-rate``, ``momentum`` (on-device heavy-ball momentum, 0 if absent), ``proximal-mu``,
  ``compress-updates`` (``float32``, ``int8`` or ``int4``; see
  :mod:`device_agents.federated.codec`), ``seed``, ``dp-clipping``: ``fixed`` or ``adaptive`` when the round is
  differentially private, and Flower's DP wrapper adds the clipping norm; the device clips its update with
  Flower's mod). Reply: ``arrays`` (weights; int8 deltas; or packed int4
  deltas in one ``int4`` tensor), ``codec`` (int8: a ConfigRecord of per-tensor scales; int4: one ``scales``
  tensor of block scales)
  and ``metrics`` (``num-examples``, ``train-loss``, ``train-accuracy``, ``learning-rate``: the rate the
  device trained at, below the server's when its local loss diverged and it halved it,
  :meth:`~device_agents.training.trainer.Trainer.fit_safely`). An int4 device keeps what
  rounding lost in its Flower context state (``codec-residual``) and adds it to its next update.
  With compression on, the server may send the global model as an int8 delta (``arrays`` int8, ``codec``
  per-tensor scales, config ``base-sha256``) against the model the device kept from the last round
  (context state ``codec-base``); a device that does not hold that exact model refuses the round.
- evaluate: content ``arrays``; reply ``metrics`` (``num-examples``, ``eval-loss``, ``eval-accuracy``).
- queries: ``trainable``, ``personalize`` and the fleet's ``install``, ``rollback``, ``status``
  (:mod:`device_agents.fleet.agent`).

The server is not trusted to behave (:class:`~device_agents.protocol.ClientLimits`,
:mod:`device_agents.federated.wire`); evaluation answers only for the global weights the device last
trained from, once per train round, with coarse metrics (accuracy on a 5-point grid, counts to tens),
so crafted weights cannot probe the device's label counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.federated import codec
from device_agents.federated.faults import audit, rehearse
from device_agents.federated.personalize import PERSONAL_HEAD, personalized_head
from device_agents.federated.wire import (
    as_array,
    checked_weights,
    clipping_of,
    codec_of,
    encode_update,
    received_weights,
    round_settings,
    tensors_digest,
)
from device_agents.fleet import agent as fleet
from device_agents.protocol import ClientLimits, Clipping, Codec, Fault, Metric, Query, TelemetryWire, TrainConfig
from device_agents.training.samples import read_labelled
from device_agents.training.trainer import Trainer

_TRAINERS: dict[str, Trainer] = {}
_LAST_TRAINED: dict[tuple[str, int], str] = {}  # (artifact dir, partition) -> digest of the weights last trained from


@dataclass(frozen=True)
class ClientSettings:
    """Where a client finds its artifact and its private data.

    ``data_dir`` holds ``<partition-id>.npz`` files (x, y); a real device points at its own file.
    ``faults`` maps a partition id to a :class:`~device_agents.protocol.Fault` to rehearse faulty clients.
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
        from device_agents.store.model_store import ModelStore

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
    x, y = read_labelled(path)
    return pid, x.astype(np.float32), y


def _limits(settings: ClientSettings, context: Any) -> ClientLimits:
    return settings.limits or ClientLimits.from_node_config(context.node_config)


class _Mods:
    """The mods every handler runs through, outermost first: the audit copy, local DP, central DP clipping."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings

    def audit(self, message: Any, context: Any, call_next: Any) -> Any:
        """Outermost: records each reply exactly as it leaves the device (after clipping)."""
        reply = call_next(message, context)
        if self.settings.audit_dir is not None and not reply.has_error():
            pid = int(context.node_config.get("partition-id", 0))
            kind = message.metadata.message_type.split(".")[0]
            content = message.content
            rnd = int(content["config"].get(TrainConfig.SERVER_ROUND, 0)) if "config" in content else 0
            audit(self.settings.audit_dir, pid, f"{kind}-r{rnd}", reply.content)
        return reply

    def local_dp(self, message: Any, context: Any, call_next: Any) -> Any:
        """Flower's LocalDpMod, when this device's limits ask for local DP (read per message: node config)."""
        limits = _limits(self.settings, context)
        if limits.local_dp_epsilon is None:
            return call_next(message, context)
        from flwr.clientapp.mod import LocalDpMod

        mod = LocalDpMod(limits.local_dp_clip, limits.local_dp_clip, limits.local_dp_epsilon, limits.local_dp_delta)
        return mod(message, context, call_next)

    def central_dp(self, message: Any, context: Any, call_next: Any) -> Any:
        """Flower's fixed or adaptive clipping mod, as the round's ``dp-clipping`` asks (central DP with
        client-side clipping: the server adds the noise, each device clips its own update)."""
        clipping = clipping_of(message.content["config"] if "config" in message.content.keys() else {})
        if clipping is Clipping.NONE:
            return call_next(message, context)
        from flwr.clientapp import mod

        chosen = mod.fixedclipping_mod if clipping is Clipping.FIXED else mod.adaptiveclipping_mod
        return chosen(message, context, call_next)


class _Handlers:
    """One method per message type the device answers, each bound to the client's settings."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings

    def train(self, message: Any, context: Any) -> Any:
        from flwr.app import Message, MetricRecord, RecordDict

        artifact_dir = _artifact_dir(self.settings, context)
        trainer = _trainer(artifact_dir)
        config = message.content["config"]
        limits = _limits(self.settings, context)
        local_round = round_settings(config, limits)
        global_weights = received_weights(message.content, trainer.tensors, context)
        pid, x, y = _local_data(self.settings, context)
        fault = self.settings.faults.get(pid)
        if fault is Fault.LABEL_FLIP:
            y = (trainer.tensors[list(trainer.tensors)[-1]][-1] - 1 - y).astype(y.dtype)
        trainer.set_weights(global_weights)
        _LAST_TRAINED[(artifact_dir, pid)] = codec.digest(global_weights)
        local = trainer.fit_safely(x, y, **local_round.fit_options(), seed=local_round.seed * 100_003 + pid)
        metrics = {Metric.NUM_EXAMPLES: len(x), Metric.TRAIN_LOSS: float(local.losses[-1]),
                   Metric.TRAIN_ACCURACY: float(local.accuracy), Metric.LEARNING_RATE: float(local.learning_rate)}
        new = trainer.get_weights()
        if fault is not None:
            new, metrics = rehearse(fault, pid, new, metrics, output_bias=list(trainer.tensors)[-1],
                                    base=global_weights)
        content = RecordDict({"metrics": MetricRecord(metrics)})
        used = codec_of(config) if limits.local_dp_epsilon is None else Codec.FLOAT32
        if fault not in (None, Fault.CODEC_SCALE, Fault.LABEL_FLIP):
            used = Codec.FLOAT32
        encode_update(content, used, new, global_weights, context,
                      rng=np.random.default_rng([local_round.seed, pid]), hostile_scale=fault is Fault.CODEC_SCALE)
        return Message(content, reply_to=message)

    def evaluate(self, message: Any, context: Any) -> Any:
        from flwr.app import Message, MetricRecord, RecordDict

        artifact_dir = _artifact_dir(self.settings, context)
        trainer = _trainer(artifact_dir)
        if _limits(self.settings, context).evaluate == "off":
            raise ValueError("this device does not answer evaluation requests (node config evaluate=off)")
        weights = checked_weights(message.content["arrays"], trainer.tensors)
        pid, x, y = _local_data(self.settings, context)
        # only the global model this device last trained from, once: crafted weights cannot probe labels
        if _LAST_TRAINED.pop((artifact_dir, pid), None) != codec.digest(weights):
            raise ValueError("evaluation is answered once per train round, for the weights last trained from")
        trainer.set_weights(weights)
        loss, accuracy = trainer.evaluate(x, y)
        metrics = MetricRecord({Metric.NUM_EXAMPLES: max(10, len(x) // 10 * 10), Metric.EVAL_LOSS: round(loss, 2),
                                Metric.EVAL_ACCURACY: float(round(accuracy / 5) * 5)})
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    def personalize(self, message: Any, context: Any) -> Any:
        from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

        trainer = _trainer(_artifact_dir(self.settings, context))
        config = message.content["config"]
        local_round = round_settings({**dict(config.items()), TrainConfig.LOCAL_EPOCHS: config.get(
            TrainConfig.PERSONALIZE_EPOCHS, 1)}, _limits(self.settings, context))
        weights = checked_weights(message.content["arrays"], trainer.tensors)
        pid, x, y = _local_data(self.settings, context)
        metrics, head = personalized_head(trainer, weights, x, y, epochs=local_round.epochs,
                                          learning_rate=local_round.learning_rate,
                                          seed=local_round.seed * 100_003 + pid)
        context.state[PERSONAL_HEAD] = ArrayRecord({k: as_array(v) for k, v in head.items()})
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)

    def trainable(self, message: Any, context: Any) -> Any:
        from flwr.app import ConfigRecord, Message, RecordDict

        try:
            digest, reason = tensors_digest(_trainer(_artifact_dir(self.settings, context)).tensors), ""
        except Exception as exc:  # noqa: BLE001 (no trainable artifact, or one that does not load: say so)
            digest, reason = "", " ".join(str(exc).split())[:200]
        return Message(RecordDict({"text": ConfigRecord({"tensors-sha256": digest, "reason": reason})}),
                       reply_to=message)

    def install(self, message: Any, context: Any) -> Any:
        return _fleet_reply(message, fleet.install(message.content["release"], context.node_config))

    def rollback(self, message: Any, context: Any) -> Any:
        from_id = str(message.content["config"].get("from-id", ""))
        return _fleet_reply(message, fleet.rollback(from_id, context.node_config))

    def status(self, message: Any, context: Any) -> Any:
        return _fleet_reply(message, fleet.status(context.node_config))

    def telemetry(self, message: Any, context: Any) -> Any:
        from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

        config = message.content["config"]
        through = config.get(TelemetryWire.THROUGH, 0)
        if isinstance(through, bool) or not isinstance(through, int) or through < 0:
            raise ValueError("a telemetry collection names the newest sequence stored as a whole number")
        spool_id = config.get(TelemetryWire.SPOOL)
        if spool_id is not None and not isinstance(spool_id, str):
            raise ValueError("a telemetry collection names its spool as text")
        windows, metrics, own = fleet.telemetry(through, spool_id, context.node_config)
        return Message(RecordDict({TelemetryWire.WINDOWS: ConfigRecord(windows), "metrics": MetricRecord(metrics),
                                   TelemetryWire.SPOOL: ConfigRecord({TelemetryWire.SPOOL_ID: own})}),
                       reply_to=message)


def _fleet_reply(message: Any, result: tuple[dict[str, float], dict[str, str]]) -> Any:
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    metrics, text = result
    return Message(RecordDict({"metrics": MetricRecord(fleet.finite(metrics)), "text": ConfigRecord(text)}),
                   reply_to=message)


def make_client_app(settings: ClientSettings) -> Any:
    """A ``flwr.clientapp.ClientApp`` bound to ``settings``."""
    from flwr.clientapp import ClientApp

    app, mods, handlers = ClientApp(), _Mods(settings), _Handlers(settings)
    app.train(mods=[mods.audit, mods.local_dp, mods.central_dp])(handlers.train)
    app.evaluate(mods=[mods.audit])(handlers.evaluate)
    for name in (Query.TRAINABLE, Query.PERSONALIZE, Query.INSTALL, Query.ROLLBACK, Query.STATUS, Query.TELEMETRY):
        app.query(name, mods=[mods.audit])(getattr(handlers, name))
    return app


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
            return [new[n] for n in self.names], len(x), {Metric.TRAIN_LOSS: float(local.losses[-1])}

    def client_fn(context: Any) -> Any:
        return DeviceClient(context).to_client()

    return LegacyClientApp(client_fn=client_fn, mods=[secaggplus_mod])
