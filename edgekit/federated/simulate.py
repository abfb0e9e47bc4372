"""``edgekit fl simulate``: a federated run on Flower's simulation engine (Ray), on one machine."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit._output import check_output_dir, write_atomic
from edgekit.data import Dataset, fit_to_model, load_data, partition, split
from edgekit.errors import EdgeKitError, InputError
from edgekit.federated.server_app import RoundSettings, run_rounds
from edgekit.models import load_model

# Flower must not call out to the internet; Ray must bind to 127.0.0.1 only. Ray swaps 127.0.0.1 for
# the machine's address unless its multi-node mode is off, which this variable does; it is read when
# Ray is imported and inherited by its workers.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass(frozen=True)
class SimulationConfig:
    """Options of :func:`simulate` (``partition``: ``"iid"`` or ``"dirichlet:ALPHA"``)."""

    clients: int = 10
    partition: str = "iid"
    rounds: RoundSettings = field(default_factory=RoundSettings)
    batch_size: int = 16
    resume: bool = False
    faults: dict[int, str] = field(default_factory=dict)
    audit_dir: str | None = None
    secure_aggregation: bool = False  # SecAgg+ (Flower's legacy fit workflow); see edgekit.federated.secagg

    def __post_init__(self) -> None:
        if self.clients < 2:
            raise InputError(f"--clients must be at least 2, got {self.clients}")
        if self.rounds.rounds < 1:
            raise InputError(f"--rounds must be at least 1, got {self.rounds.rounds}")
        self.scheme()
        from edgekit.federated.strategies import STRATEGIES

        if self.rounds.strategy not in STRATEGIES:
            raise InputError(f"unknown strategy {self.rounds.strategy!r}; valid: {', '.join(STRATEGIES)}")
        if not 0 < self.rounds.fraction <= 1 or not 0 < self.rounds.min_fraction <= 1:
            raise InputError("--fraction and --min-fraction must be in (0, 1]")
        if self.secure_aggregation:
            clash = [name for name, on in (("--compress-updates", self.rounds.compress_updates),
                                            ("--dp", self.rounds.dp_noise_multiplier is not None),
                                            ("--resume", self.resume),
                                            ("--strategy " + self.rounds.strategy, self.rounds.strategy != "fedavg"))
                     if on]
            if clash:
                raise InputError(f"--secagg runs FedAvg on masked updates; it cannot be combined with {clash[0]}")
            if self.clients < 3:
                raise InputError("--secagg needs at least 3 clients (secret sharing)")
        if self.rounds.dp_noise_multiplier is not None:
            if not self.rounds.dp_noise_multiplier > 0 or not self.rounds.dp_clipping_norm > 0:
                raise InputError("--dp-noise and --dp-clip must be > 0")
            if self.rounds.compress_updates:
                raise InputError("--dp clips float weight updates; it cannot be combined with --compress-updates")
            if self.rounds.strategy == "trimmed":
                raise InputError("--dp needs FedAvg-style aggregation; use --strategy fedavg or fedprox")

    def scheme(self) -> tuple[str, float]:
        if self.partition == "iid":
            return "iid", 0.0
        if self.partition.startswith("dirichlet:"):
            try:
                alpha = float(self.partition.split(":", 1)[1])
            except ValueError:
                alpha = -1.0
            if alpha > 0:
                return "dirichlet", alpha
        raise InputError(f"--partition {self.partition!r} is not iid or dirichlet:ALPHA (ALPHA > 0, e.g. 0.5)")


@dataclass
class FederatedResult:
    out: Path
    history: list[dict[str, Any]]
    final_accuracy: float
    weights: dict[str, np.ndarray]


def simulate(model: Any, data: str | Path | Dataset, out: str | Path, *, config: SimulationConfig | None = None,
             progress: bool = True, log: Any = print) -> FederatedResult:
    """Run federated training in simulation; write history, plot, checkpoints and the final int8 model.

    >>> simulate("cnn.keras", "digits", "fl_out",                                # doctest: +SKIP
    ...          config=SimulationConfig(clients=10, partition="dirichlet:0.5"))
    """
    config = config or SimulationConfig()
    out = Path(out).absolute()
    if not (config.resume and (out / "checkpoints" / "state.json").exists()):
        check_output_dir(out)
    for key, value in FLOWER_ENV.items():
        os.environ[key] = value
    run = prepare_run(model, data, out, clients=config.clients, partition_spec=config.scheme(),
                      seed=config.rounds.seed, batch_size=config.batch_size,
                      learning_rate=config.rounds.learning_rate, progress=progress,
                      reuse_trainable=config.resume)
    loaded, dataset, parts = run.loaded, run.dataset, run.parts
    data_dir, trainable_dir = out / "partitions", out / "trainable"
    from device_agents.training import Trainer

    evaluator = Trainer.load(trainable_dir)
    initial = evaluator.get_weights()
    outcome: dict[str, Any] = {}

    from flwr.serverapp import ServerApp

    from device_agents.client_app import ClientSettings, make_client_app

    if config.secure_aggregation:
        return _simulate_secagg(config, out, evaluator, initial, parts, loaded, dataset, data_dir, trainable_dir,
                                progress, log)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        try:
            outcome["weights"], outcome["state"] = run_rounds(
                grid, settings=config.rounds, initial=initial, evaluator=evaluator, eval_x=parts.evaluation.x,
                eval_y=parts.evaluation.y, checkpoint_dir=out / "checkpoints", resume=config.resume,
                expected_nodes=config.clients, log=log)
        except BaseException as exc:  # the simulation engine would only log it
            outcome["error"] = exc

    client_app = make_client_app(ClientSettings(str(trainable_dir), str(data_dir), dict(config.faults),
                                                audit_dir=config.audit_dir,
                                                clip_updates=config.rounds.dp_noise_multiplier is not None))
    _run_simulation(server_app, client_app, config.clients)
    if "error" in outcome:
        exc = outcome["error"]
        raise exc if isinstance(exc, EdgeKitError) else EdgeKitError(f"the federated run failed: {exc}")
    if "state" not in outcome:
        raise EdgeKitError("the federated run ended without a result; see the Flower log above")
    weights, state = outcome["weights"], outcome["state"]
    write_atomic(out / "history.json", json.dumps({"config": _config_dict(config), "rounds": state.history},
                                                  indent=2).encode())
    plot_history(state.history, out / "accuracy.png")
    final = close_the_loop(loaded.model, weights, dataset, out / "final", progress=progress)
    log(f"final global model: int8 TFLite {final['bytes']:,} bytes, accuracy {final['accuracy']:.2f}% "
        f"-> {out / 'final'} (install with: edgekit-agent install --model {out / 'final'} --store DIR)")
    return FederatedResult(out, state.history, state.history[-1]["accuracy"], weights)


def keras_with_weights(model: Any, weights: dict[str, np.ndarray]) -> Any:
    """A copy of ``model`` holding federated ``weights`` (named as in the trainable manifest)."""
    from edgekit.compress._training import copy_model
    from edgekit.export.trainable import _safe

    copy = copy_model(model)
    for layer in copy.layers:
        values = []
        for w in layer.weights:
            key = _safe(f"{layer.name}/{w.name.split('/')[-1].split(':')[0]}")
            values.append(weights[key] if key in weights else w.numpy())
        if values:
            layer.set_weights(values)
    return copy


def close_the_loop(model: Any, weights: dict[str, np.ndarray], dataset: Dataset, out: Path, *,
                   progress: bool) -> dict[str, Any]:
    """Compress the final global model to a verified int8 TFLite + manifest, ready to install."""
    from edgekit import CompressConfig, Recipe, compress

    result = compress(keras_with_weights(model, weights), dataset, out, progress=progress,
                      config=CompressConfig(recipe=Recipe(quantize="int8"), formats="tflite"))
    art = result.selected.artifacts[0]
    return {"bytes": art.bytes, "accuracy": art.accuracy}


def _simulate_secagg(config: SimulationConfig, out: Path, evaluator: Any, initial: dict[str, np.ndarray], parts: Any,
                     loaded: Any, dataset: Dataset, data_dir: Path, trainable_dir: Path, progress: bool,
                     log: Any) -> FederatedResult:
    from device_agents.client_app import ClientSettings, make_secagg_client_app
    from edgekit.federated.secagg import make_secagg_server_app

    outcome: dict[str, Any] = {}
    names = list(evaluator.tensors)
    server_app = make_secagg_server_app(settings=config.rounds, names=names, initial=initial, evaluator=evaluator,
                                        eval_x=parts.evaluation.x, eval_y=parts.evaluation.y, clients=config.clients,
                                        log=log, outcome=outcome)
    client_app = make_secagg_client_app(ClientSettings(str(trainable_dir), str(data_dir)))
    _run_simulation(server_app, client_app, config.clients)
    if "error" in outcome:
        raise EdgeKitError(f"the secure-aggregation run failed: {outcome['error']}")
    if "history" not in outcome:
        raise EdgeKitError("the secure-aggregation run ended without a result; see the Flower log above")
    history = outcome["history"]
    write_atomic(out / "history.json", json.dumps({"config": _config_dict(config), "rounds": history},
                                                  indent=2).encode())
    plot_history(history, out / "accuracy.png")
    final = close_the_loop(loaded.model, outcome["weights"], dataset, out / "final", progress=progress)
    log(f"final global model: int8 TFLite {final['bytes']:,} bytes, accuracy {final['accuracy']:.2f}% "
        f"-> {out / 'final'}")
    return FederatedResult(out, history, history[-1]["accuracy"], outcome["weights"])


@dataclass
class PreparedRun:
    loaded: Any
    dataset: Dataset
    parts: Any


def prepare_run(model: Any, data: Any, out: Path, *, clients: int, partition_spec: tuple[str, float], seed: int,
                batch_size: int, learning_rate: float, progress: bool, reuse_trainable: bool = False) -> PreparedRun:
    """Load and check the model and data; write each client's partition, the held-out evaluation
    split and the trainable artifact into ``out`` (shared by simulation and real deployment)."""
    from edgekit._trainable_api import TrainableConfig, export_trainable

    loaded = load_model(model)
    dataset = fit_to_model(load_data(data, require_labels=True), loaded.input_shape, loaded.input_dtype,
                           loaded.num_classes)
    if dataset.y is None:
        raise InputError("federated training needs labels: give an .npz with x and y")
    parts = split(dataset, seed=seed)
    pool = Dataset(np.concatenate([parts.finetune.x, parts.calibration.x]),
                   np.concatenate([parts.finetune.y, parts.calibration.y]), "clients")
    scheme, alpha = partition_spec
    out.mkdir(parents=True, exist_ok=True)
    (out / "partitions").mkdir(exist_ok=True)
    for i, part in enumerate(partition(pool, clients, scheme=scheme, alpha=alpha, seed=seed)):
        np.savez(out / "partitions" / f"{i}.npz", x=part.x, y=part.y)
    np.savez(out / "evaluation.npz", x=parts.evaluation.x, y=parts.evaluation.y)
    if not (reuse_trainable and (out / "trainable" / "manifest.json").exists()):
        export_trainable(loaded.model, out / "trainable", data=dataset, progress=progress,
                         config=TrainableConfig(batch_size=batch_size, learning_rate=learning_rate))
    return PreparedRun(loaded, dataset, parts)


def _config_dict(config: SimulationConfig) -> dict[str, Any]:
    d = asdict(config)
    d["faults"] = {str(k): v for k, v in config.faults.items()}
    return d


def _run_simulation(server_app: Any, client_app: Any, clients: int) -> None:
    import logging

    from flwr.simulation import run_simulation

    flower = logging.getLogger("flwr")  # edgekit prints its own line per round; Flower's errors still show
    flower.setLevel(logging.ERROR)
    flower.propagate = False

    temp = tempfile.mkdtemp(prefix="edgekit-ray-")
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": min(2, os.cpu_count() or 1), "_temp_dir": temp,
                             "include_dashboard": False,
                             "logging_level": "ERROR", "log_to_driver": False}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients, backend_config=backend)


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([h["round"] for h in history], [h["accuracy"] for h in history], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("global model accuracy on held-out data (%)")
    ax.set_title("Federated training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
