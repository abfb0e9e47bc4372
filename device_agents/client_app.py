"""The Flower ClientApp of a device: trains edgekit's trainable artifact on local data with LiteRT.

Only weights (or int8 weight deltas) and aggregate metrics leave the device: the number of examples,
the mean loss and the accuracy. No sample, label or per-sample value is ever put in a reply.

Message protocol (Flower Message API):

- train: content ``arrays`` (global weights by tensor name) and ``config`` (``local-epochs``,
  ``learning-rate``, ``proximal-mu``, ``compress-updates``, ``seed``). Reply: ``arrays`` (weights, or
  int8 deltas when ``compress-updates``), ``codec`` (per-tensor scales, when compressed) and
  ``metrics`` (``num-examples``, ``train-loss``, ``train-accuracy``).
- evaluate: content ``arrays``; reply ``metrics`` (``num-examples``, ``eval-loss``, ``eval-accuracy``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from device_agents import codec
from device_agents.files import read_npz
from device_agents.training import Trainer

_TRAINERS: dict[str, Trainer] = {}


class Fault(str, Enum):
    """A rehearsed client fault (tests and drills): what a faulty device does in a train round."""

    CRASH = "crash"   # raises: the round sees an error reply (a dropout)
    NAN = "nan"       # replies with NaN weights
    SHAPE = "shape"   # replies with wrongly shaped tensors


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
    clip_updates: bool = False    # differential privacy: Flower's fixedclipping_mod clips each update

    def __post_init__(self) -> None:
        object.__setattr__(self, "faults", {int(k): Fault(v) for k, v in self.faults.items()})


def _trainer(artifact_dir: str) -> Trainer:
    if artifact_dir not in _TRAINERS:  # one interpreter per process, reused across rounds
        # the runtime is picked as the agent picks it: LiteRT, else tflite-runtime
        _TRAINERS[artifact_dir] = Trainer.load(artifact_dir, num_threads=1)
    return _TRAINERS[artifact_dir]


def _artifact_dir(settings: ClientSettings, context: Any) -> str:
    return settings.artifact_dir or str(context.node_config["artifact-dir"])


def _local_data(settings: ClientSettings, context: Any) -> tuple[int, np.ndarray, np.ndarray]:
    node = context.node_config
    pid = int(node.get("partition-id", 0))
    data_dir = settings.data_dir or str(node["data-dir"])
    arrays = read_npz(Path(data_dir) / f"{pid}.npz", names=("x", "y"))  # sizes checked before reading
    return pid, arrays["x"].astype(np.float32), arrays["y"].astype(np.int64)


def make_client_app(settings: ClientSettings) -> Any:
    """A ``flwr.clientapp.ClientApp`` bound to ``settings``."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def weights_of(message: Any) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in message.content["arrays"].items()}

    def audit_mod(message: Any, context: Any, call_next: Any) -> Any:
        """Outermost mod: records each reply exactly as it leaves the device (after clipping)."""
        reply = call_next(message, context)
        if settings.audit_dir is not None and not reply.has_error():
            pid = int(context.node_config.get("partition-id", 0))
            kind = message.metadata.message_type.split(".")[0]
            rnd = int(message.content["config"].get("server-round", 0)) if "config" in message.content else 0
            _audit(settings, pid, f"{kind}-r{rnd}", reply.content)
        return reply

    mods = [audit_mod]
    if settings.clip_updates:
        from flwr.clientapp.mod import fixedclipping_mod

        mods.append(fixedclipping_mod)

    @app.train(mods=mods)
    def train(message: Any, context: Any) -> Any:
        trainer = _trainer(_artifact_dir(settings, context))
        pid, x, y = _local_data(settings, context)
        config = message.content["config"]
        global_weights = weights_of(message)
        trainer.set_weights(global_weights)
        losses = trainer.fit(x, y, epochs=int(config.get("local-epochs", 1)),
                             learning_rate=float(config.get("learning-rate", 0.05)),
                             mu=float(config.get("proximal-mu", 0.0)),
                             seed=int(config.get("seed", 0)) * 100_003 + pid)
        _, accuracy = trainer.evaluate(x, y)
        new = trainer.get_weights()
        fault = settings.faults.get(pid)
        if fault is Fault.CRASH:
            raise RuntimeError(f"client {pid}: simulated crash")
        if fault is Fault.NAN:
            new = {k: np.full_like(v, np.nan) for k, v in new.items()}
        if fault is Fault.SHAPE:
            new = {k: v[..., :1] if v.ndim else v for k, v in new.items()}
        content = RecordDict({"metrics": MetricRecord({"num-examples": len(x), "train-loss": float(losses[-1]),
                                                      "train-accuracy": float(accuracy)})})
        if bool(config.get("compress-updates", False)) and fault is None:
            deltas, scales = codec.encode(new, global_weights)
            content["arrays"] = ArrayRecord({k: _array(v) for k, v in deltas.items()})
            content["codec"] = ConfigRecord({k: float(s) for k, s in scales.items()})
        else:
            content["arrays"] = ArrayRecord({k: _array(v) for k, v in new.items()})
        return Message(content, reply_to=message)

    @app.evaluate(mods=[audit_mod])
    def evaluate(message: Any, context: Any) -> Any:
        trainer = _trainer(_artifact_dir(settings, context))
        _, x, y = _local_data(settings, context)
        trainer.set_weights(weights_of(message))
        loss, accuracy = trainer.evaluate(x, y)
        metrics = MetricRecord({"num-examples": len(x), "eval-loss": loss, "eval-accuracy": accuracy})
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    return app


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
    arrays = {f"{record}/{k}": v.numpy() for record in ("arrays",) if record in content
              for k, v in content[record].items()}
    np.savez(f"{stem}.npz", **{k.replace("/", "__"): v for k, v in arrays.items()})
    records = {name: {k: v for k, v in content[name].items()} for name in ("metrics", "codec") if name in content}
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
            self.trainer.set_weights(dict(zip(self.names, parameters)))
            losses = self.trainer.fit(x, y, epochs=int(config.get("local-epochs", 1)),
                                      learning_rate=float(config.get("learning-rate", 0.05)),
                                      seed=int(config.get("seed", 0)) * 100_003 + pid)
            new = self.trainer.get_weights()
            return [new[n] for n in self.names], len(x), {"train-loss": float(losses[-1])}

    def client_fn(context: Any) -> Any:
        return DeviceClient(context).to_client()

    return LegacyClientApp(client_fn=client_fn, mods=[secaggplus_mod])
