"""What every federated run shares: preparing the run folder, and the tail that ends it.

:func:`prepare_run` loads and checks the model and data, writes each client's partition, the
held-out evaluation split and the trainable artifact. :func:`finish_run` writes ``history.json`` and
``accuracy.png`` and compresses the final global model into ``final/`` (a verified int8 TFLite with
its manifest, ready to install). Simulation, secure aggregation and real deployment all end with it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit._io import mark_output, write_atomic
from edgekit.errors import InputError
from edgekit.federated.config import FederationConfig, Partition, RoundSettings
from edgekit.loading.data import Dataset, Splits, fit_to_model, load_data, partition, split
from edgekit.loading.models import LoadedModel, float_pixels, load_model, load_warnings

WORSE_THAN_START = 0.5
"""Points below the starting model at which a run's final model is reported as worse, not as ready."""


@dataclass(frozen=True)
class RunSpec:
    """``run.json``: what a deployed run's ServerApp reads from its run folder. Written by ``fl up``
    (:func:`edgekit.federated.deploy.up`) and ``fl run`` (:func:`edgekit.federated.fleet_run.run_on_fleet`); read by
    :func:`edgekit.federated.server_apps.run_rounds_in` and the fleet's train job.

    >>> spec = RunSpec(clients=3, rounds=RoundSettings(rounds=2))
    >>> RunSpec.from_json(spec.to_json()) == spec
    True
    """

    FILE = "run.json"

    clients: int
    rounds: RoundSettings
    personalize_epochs: int = 0
    partition: Partition | None = None  # fl up: how the clients' partitions were cut
    insecure: bool = False              # fl up: no TLS
    fleet: str | None = None            # fl run: the served fleet folder

    def to_json(self) -> str:
        values = asdict(self)
        values["partition"] = asdict(self.partition) if self.partition is not None else None
        return json.dumps(values, default=lambda v: getattr(v, "value", str(v)))

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        values = json.loads(text)
        partition = values.get("partition")
        return cls(clients=int(values["clients"]), rounds=RoundSettings(**values["rounds"]),
                   personalize_epochs=int(values.get("personalize_epochs", 0)),
                   partition=Partition(**partition) if partition else None,
                   insecure=bool(values.get("insecure", False)), fleet=values.get("fleet"))

    def write(self, folder: Path) -> None:
        write_atomic(folder / self.FILE, self.to_json().encode())

    @classmethod
    def read(cls, folder: Path) -> RunSpec:
        return cls.from_json((folder / cls.FILE).read_text())


@dataclass
class FederatedResult:
    """A finished federated run: its folder, the per-round history, the final accuracy and weights."""

    out: Path
    history: list[dict[str, Any]]
    final_accuracy: float
    weights: dict[str, np.ndarray]


@dataclass
class PreparedRun:
    """The checked model and data of a run, and the splits its partitions were cut from."""

    loaded: LoadedModel
    dataset: Dataset
    parts: Splits
    warnings: tuple[str, ...] = ()


def prepare_run(model: Any, data: Any, out: Path, config: FederationConfig, *, progress: bool,
                reuse_trainable: bool = False) -> PreparedRun:
    """Load and check the model and data; write each client's partition, the held-out evaluation split
    and the trainable artifact into ``out``."""
    from edgekit.trainable.export import TrainableConfig, export_trainable

    raw = load_data(data, require_labels=True)
    loaded = load_model(model, sample=raw.x[:64])
    # refused before anything is written; a model taking integer pixels trains as its float twin (the final model
    # keeps the model's own input)
    keras_model = float_pixels(loaded).trainable_model("federated training")
    federated = _federated_model(keras_model, config)  # a layer with no on-device gradient too
    warnings = check_privacy_noise(config, sum(int(np.prod(w.shape)) for w in federated.trainable_weights))
    dataset = fit_to_model(raw, loaded.input_shape, loaded.input_dtype, loaded.num_classes)
    if dataset.y is None:
        raise InputError("federated training needs labels: give an .npz with x and y")
    seed = config.rounds.seed
    held_out = None if raw.held_out is None else fit_to_model(  # the data file's own test split (labelled when
        raw.held_out, loaded.input_shape, loaded.input_dtype, loaded.num_classes)  # its train split is)
    parts = split(dataset, seed=seed, eval_data=held_out)
    pool = Dataset(np.concatenate([parts.finetune.x, parts.calibration.x]),
                   np.concatenate([parts.finetune.y, parts.calibration.y]), "clients")
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "federated")  # this run folder is edgekit's: a later run may replace it
    if config.LOCAL_PARTITIONS:
        (out / "partitions").mkdir(exist_ok=True)
        shares = partition(pool, config.clients, scheme=config.partition.scheme.value,
                           alpha=config.partition.alpha, seed=seed)
        for i, part in enumerate(shares):
            np.savez(out / "partitions" / f"{i}.npz", x=part.x, y=part.y)
    np.savez(out / "evaluation.npz", x=parts.evaluation.x, y=parts.evaluation.y)
    if not (reuse_trainable and (out / "trainable" / "manifest.json").exists()):
        exported = export_trainable(keras_model, out / "trainable", data=dataset, progress=progress,
                                    config=TrainableConfig(head_only=config.head_only, batch_size=config.batch_size,
                                                           learning_rate=config.rounds.learning_rate))
        # the data outside the model's input range, a free input dimension fixed to the data's
        warnings = (*warnings, *(f"warning: {line}" for line in exported.warnings))
    # how the model is served (mixed precision in float32, one output as two columns): the export above got it served
    warnings = (*(f"warning: {line}" for line in load_warnings(loaded)), *warnings)
    return PreparedRun(loaded, dataset, parts, warnings)


def _federated_model(keras_model: Any, config: FederationConfig) -> Any:
    """What the devices train and the rounds federate: the model, or its head; refused (as the trainable export
    refuses it) when a layer of it has no on-device gradient or the model has no head, before a file is written."""
    from edgekit.trainable.graph import build_nodes, split_head

    model = split_head(keras_model)[1] if config.head_only else keras_model
    build_nodes(model)
    return model


def check_privacy_noise(config: FederationConfig, parameters: int) -> tuple[str, ...]:
    """Refuse (or, with the guard set to warn, warn about) a DP run whose noise would drown every update.

    Returns the lines to log: the noise plan, and the warning when the guard only warns.
    """
    from edgekit.federated.config import NoiseGuard
    from edgekit.federated.privacy import NOISE_TO_SIGNAL_LIMIT, plan_noise

    settings = config.rounds
    if settings.dp_noise_multiplier is None:
        return ()
    plan = plan_noise(noise_multiplier=settings.dp_noise_multiplier, clipping_norm=settings.dp_clipping_norm,
                      clients_per_round=max(1, math.ceil(config.clients * settings.fraction)),
                      parameters=parameters, rounds=settings.rounds, population=config.clients,
                      delta=settings.dp_delta)
    verdict = plan.verdict()
    if verdict == "allowed":
        return (f"differential privacy: {plan.describe()}",)
    if verdict == "refused" and settings.dp_noise_guard is NoiseGuard.REFUSE:
        raise InputError(f"differential-privacy noise would drown every update: {plan.describe()}, over the "
                         f"limit of {NOISE_TO_SIGNAL_LIMIT:g}; {plan.advice()} (or set the noise guard to warn to "
                         "run anyway)")
    what = "will drown every update" if verdict == "refused" else "is larger than any clipped update"
    return (f"warning: differential-privacy noise {what}: {plan.describe()}; {plan.advice()}",)


def finish_run(run: PreparedRun, out: Path, config: FederationConfig, history: list[dict[str, Any]],
               weights: dict[str, np.ndarray], *, progress: bool, log: Callable[[str], Any],
               extra: dict[str, Any] | None = None) -> FederatedResult:
    """Write ``history.json`` (with ``extra`` keys, e.g. ``personalization``) and ``accuracy.png``; compress
    the final global model into ``out/final``."""
    start, end = history[0]["accuracy"], history[-1]["accuracy"]
    worse = not end >= start - WORSE_THAN_START
    write_atomic(out / "history.json", json.dumps({"config": asdict(config), "rounds": history,
                                                   "worse_than_start": worse, **(extra or {})}, indent=2).encode())
    plot_history(history, out / "accuracy.png")
    final = close_the_loop(run.loaded.model, weights, run.dataset, out / "final", progress=progress)
    if final["quantization"] != "int8":
        log(f"warning: the final global model loses too much as int8 ({final['int8_error']}); "
            f"{out / 'final'} holds it as {final['quantization']} instead")
    if worse:
        log(f"warning: the final global model ({end:.2f}% on held-out data) is worse than the model the run "
            f"started from ({start:.2f}%); {out / 'final'} is kept for inspection, not as an update to install")
    else:
        log(f"final global model: {final['quantization']} TFLite {final['bytes']:,} bytes, accuracy "
            f"{final['accuracy']:.2f}% "
            f"-> {out / 'final'} (release it: edgekit release {out / 'final'} --key signing.key --version N; then "
            f"edgekit fleet rollout, or on a device: edgekit-agent install --model {out / 'final'} --store DIR "
            "--trust signing.pub)")
    return FederatedResult(out, history, history[-1]["accuracy"], weights)


def close_the_loop(model: Any, weights: dict[str, np.ndarray], dataset: Dataset, out: Path, *,
                   progress: bool) -> dict[str, Any]:
    """Compress the final global model to a verified TFLite + manifest, ready to install: int8 when it stays
    within the int8 budget after every remedy, else float16, else float32 (the rounds' result is never lost
    to the final conversion: a collapsed model, e.g. one that answers one class, may not even convert to
    int8)."""
    from edgekit.compression import compress
    from edgekit.config import CompressConfig, Format, Quantization, Recipe
    from edgekit.errors import BudgetError, ConversionError
    from edgekit.trainable.contract import keras_with_weights

    trained = keras_with_weights(model, weights)
    error = ""
    for quantization in (Quantization.INT8, Quantization.FLOAT16, Quantization.NONE):
        try:
            result = compress(trained, dataset, out, progress=progress, config=CompressConfig(
                recipe=Recipe(quantize=quantization), formats=(Format.TFLITE,)))
            break
        except (BudgetError, ConversionError) as exc:
            if quantization is Quantization.NONE:
                raise
            error = error or str(exc).split("; see ")[0]
    art = result.selected.artifacts[0]
    return {"bytes": art.bytes, "accuracy": art.accuracy, "quantization": quantization.value, "int8_error": error}


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """``accuracy.png``: the global model's held-out accuracy per round."""
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
