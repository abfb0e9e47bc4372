"""The edgekit ServerApp: rounds of Flower training with validation, robust filtering, checkpoints.

Each round: the strategy (Flower's FedAvg, FedProx or FedTrimmedAvg) samples clients and builds the
train messages. Replies are untrusted: each is checked before anything is decoded (the protocol's
records and metric names and types, tensor names, dtypes and shapes, codec scales), then decoded
(int8 deltas onto the global weights that were sent) and checked for finite values. A reply that
fails is rejected and logged, never aggregated, and never stops the run. Of the valid replies, an
update far larger than the round's median (``max_update_norm_ratio``) and large against the model
itself (``update_norm_floor`` of its norm) is rejected (or, with ``oversized_updates`` BOUND, scaled down
to that norm) and the reported
sample counts are capped (``max_examples_ratio`` x the median), so one client cannot take the
average over. The strategy aggregates; the server evaluates the new global model on held-out data
(in LiteRT, with the same trainable artifact) and commits it only if it is finite and does not lose
more than ``max_round_accuracy_drop`` points against the last committed model (the last-good-model
guard). A round whose valid replies fall below ``min_fraction`` of the sampled clients keeps the
previous global model. Each committed round is checkpointed in one atomic step.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.federated import codec
from device_agents.files import MAX_ARRAY_BYTES, max_array_bytes, read_npz
from device_agents.protocol import TRAIN_METRICS, Clipping, Codec, Metric, TrainConfig
from device_agents.training.trainer import Trainer
from edgekit._io import crash_point, write_atomic
from edgekit.errors import FederationError
from edgekit.federated.config import RoundSettings, Strategy
from edgekit.federated.downlink import Downlink, payload_bytes
from edgekit.federated.strategies import OPTIMIZER_PREFIX, optimizer_state, restore_optimizer_state

"""The metrics a train reply carries: exactly these names, of these types (``learning-rate``: the rate the
device trained at, lower than the round's when its local loss diverged at it)."""
NORM_BIT = "norm_bit"
"""The metric Flower's ``adaptiveclipping_mod`` adds (1: the update was clipped), in adaptive-clipping runs."""


@dataclass
class ServerState:
    """What the server keeps between rounds (and in each checkpoint)."""

    round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    personalization: dict[str, Any] | None = None
    optimizer: dict[str, str] = field(default_factory=dict)  # the server optimizer state's layout


def save_checkpoint(folder: Path, weights: dict[str, np.ndarray], state: ServerState,
                    optimizer: dict[str, np.ndarray] | None = None) -> None:
    """Commit a round in one atomic step: the weights (and the server optimizer's state, ``optimizer``: see
    :func:`~edgekit.federated.strategies.optimizer_state`) go to a new ``global-rN.npz`` first; ``state.json``,
    written atomically after it, names that file and its SHA-256. A crash in between leaves the previous
    state, whose weights file is kept until the new state is committed."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **weights, **(optimizer or {}))
    name = f"global-r{state.round}.npz"
    write_atomic(folder / name, buffer.getvalue())
    crash_point(f"checkpoint-weights-r{state.round}")
    record = {**asdict(state), "weights": name, "weights_sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
              "tensors": sorted(weights)}
    write_atomic(folder / "state.json", json.dumps(record, indent=2).encode())
    for old in folder.glob("global-r*.npz"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(folder: Path) -> tuple[dict[str, np.ndarray], ServerState, dict[str, np.ndarray]] | None:
    """The last committed round (weights, state, the server optimizer's arrays), or ``None``; a weights file
    that does not match its state is refused."""
    if not (folder / "state.json").is_file():
        return None
    record = json.loads((folder / "state.json").read_text())
    path = folder / record.get("weights", "global.npz")
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != record.get("weights_sha256"):
        raise FederationError(f"the checkpoint in {folder} is damaged ({path.name} does not match state.json); "
                              "start a new run")
    arrays = read_npz(path, names=_npz_names(path), max_bytes=max_array_bytes(MAX_ARRAY_BYTES))
    optimizer = {k: v for k, v in arrays.items() if k.startswith(OPTIMIZER_PREFIX)}
    weights = {k: v for k, v in arrays.items() if not k.startswith(OPTIMIZER_PREFIX)}
    layout = record.get("optimizer") or {}
    return weights, ServerState(round=record["round"], history=record["history"], optimizer=dict(layout)), optimizer


def _npz_names(path: Path) -> tuple[str, ...]:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return tuple(name.removesuffix(".npy") for name in archive.namelist())


def _check_metrics(metrics: Any, clipping: Clipping) -> str:
    expected = {**TRAIN_METRICS, **({NORM_BIT: int} if clipping is Clipping.ADAPTIVE else {})}
    if set(metrics.keys()) != set(expected):
        return f"metrics {sorted(metrics.keys())} are not the protocol's {sorted(expected)}"
    if clipping is Clipping.ADAPTIVE and metrics[NORM_BIT] not in (0, 1):
        return f"metric {NORM_BIT} is {metrics[NORM_BIT]!r}, not 0 or 1"
    for name, kind in TRAIN_METRICS.items():
        value = metrics[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (kind is int and not float(value).is_integer()):
            return f"metric {name} is {value!r}, not a finite {kind.__name__}"
    if metrics[Metric.NUM_EXAMPLES] < 1:
        return "num-examples is not positive"
    if metrics[Metric.LEARNING_RATE] <= 0:
        return "learning-rate is not positive"
    return ""


def validate_reply(content: Any, reference: dict[str, np.ndarray], asked: Codec = Codec.INT8,
                   clipping: Clipping = Clipping.NONE) -> tuple[dict[str, np.ndarray] | None, str]:
    """Decoded weights of a train reply, or (None, why it was rejected). Nothing is decoded before the
    records, metrics, tensor names, dtypes and shapes are checked.

    ``asked``: the codec the round asked for; a client may always answer in float32 (a device with
    local differential privacy does), never in another codec. ``clipping``: adaptive clipping adds
    the norm bit to the metrics.
    """
    records = set(content.keys())
    used = asked if "codec" in records and asked is not Codec.FLOAT32 else Codec.FLOAT32
    if records != {"arrays", "metrics"} | ({"codec"} if used is not Codec.FLOAT32 else set()):
        return None, f"records {sorted(records)} are not the protocol's"
    why = _check_metrics(content["metrics"], clipping)
    if why:
        return None, why
    if used is Codec.INT4:
        decoded, why = _decode_int4(content, reference)
    else:
        decoded, why = _decode_per_tensor(content, reference, used)
    if decoded is None:
        return None, why
    for name, value in decoded.items():
        if value.dtype != np.float32 or not np.isfinite(value).all():
            return None, f"tensor {name} holds NaN/inf or is not float32"
    return decoded, ""


def _decode_per_tensor(content: Any, reference: dict[str, np.ndarray],
                       used: Codec) -> tuple[dict[str, np.ndarray] | None, str]:
    """float32 weights or int8 deltas: one tensor per weight, of its shape."""
    arrays = content["arrays"]
    if set(arrays.keys()) != set(reference):
        return None, f"tensor names differ ({len(arrays)} tensors, expected {len(reference)})"
    dtype = "int8" if used is Codec.INT8 else "float32"
    for name, array in arrays.items():
        if tuple(array.shape) != reference[name].shape:
            return None, f"tensor {name} has shape {tuple(array.shape)}, expected {reference[name].shape}"
        if array.dtype != dtype:
            return None, f"tensor {name} is {array.dtype}, expected {dtype}"
    decoded = {name: array.numpy() for name, array in arrays.items()}
    if used is Codec.INT8:
        scales = dict(content["codec"].items())
        if not codec.valid_scales(scales, reference):
            return None, "invalid codec scales"
        decoded = codec.decode(decoded, scales, reference)
    return decoded, ""


def _decode_int4(content: Any, reference: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray] | None, str]:
    """Packed int4 deltas: one ``int4`` uint8 tensor and one ``scales`` float32 tensor of known sizes."""
    from flwr.app import ArrayRecord

    size, blocks = codec.int4_sizes({k: v.shape for k, v in reference.items()})
    for record, name, dtype, length in (("arrays", codec.PACKED, "uint8", size),
                                        ("codec", codec.SCALES, "float32", blocks)):
        held = content[record]
        if not isinstance(held, ArrayRecord) or list(held.keys()) != [name]:
            return None, f"an int4 update's {record} record must hold exactly one tensor {name!r}"
        if held[name].dtype != dtype or tuple(held[name].shape) != (length,):
            return None, (f"tensor {name} is {held[name].dtype} {tuple(held[name].shape)}, "
                          f"expected {dtype} ({length},)")
    scales = content["codec"][codec.SCALES].numpy()
    if not (np.isfinite(scales).all() and (scales > 0).all() and (scales <= codec.MAX_SCALE).all()):
        return None, "invalid codec scales"
    return codec.decode_int4(content["arrays"][codec.PACKED].numpy(), scales, reference), ""


def robust_filter(updates: list[tuple[Any, dict[str, np.ndarray], int]], weights: dict[str, np.ndarray],
                  settings: RoundSettings) -> tuple[list[tuple[Any, dict[str, np.ndarray], int]], list[dict]]:
    """Reject (or bound the norm of) updates far larger than the round's median update; cap reported sample
    counts.

    ``updates``: (reply, decoded weights, reported examples). Returns the kept ones (examples capped; bounded
    ones scaled) and the rejections (each bounded update is listed too, with ``"bounded": True``).
    """
    from edgekit.federated.config import OversizedUpdate

    if len(updates) < 3:
        return updates, []

    def norm(values: dict[str, np.ndarray], base: dict[str, np.ndarray] | None = None) -> float:
        return math.sqrt(sum(float(np.sum((v.astype(np.float64) - (0 if base is None else base[k])) ** 2))
                             for k, v in values.items()))

    norms = [norm(w, weights) for _, w, _ in updates]
    bound = settings.max_update_norm_ratio * float(np.median(norms))
    # honest clients of a converged model on skewed data move little, some far more than the median: an update
    # is rejected only when it is also large against the model itself
    floor = settings.update_norm_floor * norm(weights)
    kept, rejected = [], []
    for update, size in zip(updates, norms):
        if not (size > bound and size > floor):
            kept.append(update)
            continue
        reason = (f"update norm {size:.3g} is over {settings.max_update_norm_ratio:g}x the round's median "
                  f"({bound / settings.max_update_norm_ratio:.3g}) and over {settings.update_norm_floor:g}x the "
                  f"model's norm ({floor:.3g})")
        node = int(update[0].metadata.src_node_id)
        median = bound / settings.max_update_norm_ratio
        hard = settings.bound_reject_ratio
        if settings.oversized_updates is OversizedUpdate.BOUND and (hard is None or size <= hard * median):
            scale = max(bound, floor) / size
            reply, values, examples = update
            kept.append((reply, {k: (weights[k] + (v.astype(np.float64) - weights[k]) * scale).astype(v.dtype)
                                 for k, v in values.items()}, examples))
            rejected.append({"node": node, "bounded": True, "reason": f"{reason}; scaled by {scale:.3g}"})
        else:
            rejected.append({"node": node, "reason": reason})
    cap = max(1, int(settings.max_examples_ratio * float(np.median([n for _, _, n in kept]))))
    return [(reply, w, min(n, cap)) for reply, w, n in kept], rejected


def wait_for_nodes(grid: Any, expected: int, timeout: float) -> int:
    """Wait until ``expected`` nodes are connected (or ``timeout`` passes); return how many are."""
    deadline = time.monotonic() + timeout
    while True:
        count = len(list(grid.get_node_ids()))
        if count >= expected or time.monotonic() >= deadline:
            return count
        time.sleep(0.5)


@dataclass
class _Round:
    """One round's bookkeeping: what was sent, what came back, what was kept."""

    number: int
    sampled: int
    entry: dict[str, Any] = field(default_factory=dict)


def run_rounds(grid: Any, *, settings: RoundSettings, initial: dict[str, np.ndarray], evaluator: Trainer,
               eval_x: np.ndarray, eval_y: np.ndarray, checkpoint_dir: Path, resume: bool, expected_nodes: int,
               log: Any = print, personalize_epochs: int = 0) -> tuple[dict[str, np.ndarray], ServerState]:
    """The round loop (called from the ServerApp's main with Flower's Grid); then, when
    ``personalize_epochs`` is set, every device fine-tunes its own head (:func:`personalize`)."""
    weights, state, saved_optimizer = dict(initial), ServerState(), {}
    if resume:
        restored = load_checkpoint(checkpoint_dir)
        if restored is not None:
            weights, state, saved_optimizer = restored
            log(f"resuming after round {state.round} from {checkpoint_dir}")
    strategy, min_nodes, population = _strategy(grid, settings, expected_nodes, state)
    if saved_optimizer and restore_optimizer_state(strategy, saved_optimizer, state.optimizer):
        log(f"the server optimizer continues from its state after round {state.round}")
    if state.round == 0 and not state.history:
        loss, acc = _evaluate(evaluator, weights, eval_x, eval_y)
        state.history.append({"round": 0, "accuracy": acc, "loss": loss})
        log(f"round 0/{settings.rounds}: accuracy {acc:.2f}% loss {loss:.4f} (initial model)")
    good = next(h["accuracy"] for h in reversed(state.history) if h.get("aggregated", True))
    link = Downlink() if settings.compress_updates is not Codec.FLOAT32 else None
    for rnd in range(state.round + 1, settings.rounds + 1):
        start = time.perf_counter()
        weights, entry = _one_round(grid, strategy, rnd, weights, settings, evaluator, eval_x, eval_y, good, link,
                                    log)
        if entry.get("aggregated"):
            good = entry["accuracy"]
        if settings.dp_noise_multiplier is not None:
            spent = strategy.privacy_spent()
            entry["privacy"] = {"epsilon": float(spent.epsilon), "delta": float(spent.delta),
                                "noise_multiplier": settings.dp_noise_multiplier,
                                "clipping": settings.dp_clipping.value,
                                "clipping_norm": float(strategy.clipping_norm)}  # adaptive: the next round's
        entry["seconds"] = time.perf_counter() - start
        state.history.append(entry)
        state.round = rnd
        optimizer, state.optimizer = optimizer_state(strategy)
        save_checkpoint(checkpoint_dir, weights, state, optimizer)
        privacy = (f"  (epsilon {entry['privacy']['epsilon']:.2f}, delta {settings.dp_delta:g})"
                   if "privacy" in entry else "")
        log(f"round {rnd}/{settings.rounds}: accuracy {entry['accuracy']:.2f}% loss {entry['loss']:.4f}  "
            f"clients {entry['valid']}/{entry['sampled']}  up {entry['bytes_up_per_client'] / 1024:.1f} "
            f"down {entry['bytes_down_per_client'] / 1024:.1f} KiB/client  "
            f"{entry['seconds']:.1f} s{privacy}")
    if personalize_epochs:
        state.personalization = personalize(grid, weights, settings, personalize_epochs, log)
    return weights, state


def personalize(grid: Any, weights: dict[str, np.ndarray], settings: RoundSettings, epochs: int,
                log: Any) -> dict[str, Any]:
    """Ask every device to fine-tune the final model's head on its own data and keep it; aggregate the
    coarse before/after accuracies the devices report (weighted by their counts)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    from device_agents.protocol import Query

    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()}),
                          "config": ConfigRecord({TrainConfig.PERSONALIZE_EPOCHS: epochs,
                                                  TrainConfig.LEARNING_RATE: settings.learning_rate,
                                                  TrainConfig.SEED: settings.seed})})
    messages = [Message(content=content, message_type=f"query.{Query.PERSONALIZE}", dst_node_id=node)
                for node in grid.get_node_ids()]
    rows, refused = [], 0
    for reply in grid.send_and_receive(messages=messages, timeout=settings.round_timeout):
        row = personal_row(None if reply.has_error() else reply.content.get("metrics"))
        if row is None:
            refused += 1
            continue
        rows.append(row)
    summary: dict[str, Any] = {"epochs": epochs, "devices": len(rows), "failed_or_rejected": refused}
    if rows:
        table = np.array(rows)
        kept = np.where(table[:, 3] > 0, table[:, 2], table[:, 1])  # what each device serves now
        summary.update({"accuracy_before": float(np.average(table[:, 1], weights=table[:, 0])),
                        "accuracy_fine_tuned": float(np.average(table[:, 2], weights=table[:, 0])),
                        "accuracy_after": float(np.average(kept, weights=table[:, 0])),
                        "devices_kept_their_head": int(np.sum(table[:, 3] > 0)),
                        "devices_improved": int(np.sum(kept > table[:, 1]))})
        log(f"personalisation: {len(rows)} devices fine-tuned their head for {epochs} epochs; "
            f"{summary['devices_kept_their_head']} kept it (as accurate or better on their own held-out data): "
            f"accuracy there {summary['accuracy_before']:.1f}% -> {summary['accuracy_after']:.1f}%")
    return summary


def personal_row(metrics: Any) -> list[float] | None:
    """A personalisation reply's metrics as numbers, or ``None`` when they are not exactly the protocol's
    (names; finite non-boolean numbers; counts up to 1e9, accuracies 0-100, ``kept`` 0 or 1)."""
    from device_agents.protocol import PERSONALIZE_METRICS

    ceiling = {Metric.NUM_EXAMPLES: 10**9, Metric.KEPT: 1}
    if metrics is None or set(metrics.keys()) != set(PERSONALIZE_METRICS) or not all(
            isinstance(metrics[k], (int, float)) and not isinstance(metrics[k], bool)
            and math.isfinite(metrics[k]) and 0 <= metrics[k] <= ceiling.get(k, 100)
            for k in PERSONALIZE_METRICS):
        return None
    return [float(metrics[k]) for k in PERSONALIZE_METRICS]


def _strategy(grid: Any, settings: RoundSettings, expected_nodes: int, state: ServerState) -> tuple[Any, int, int]:
    from edgekit.federated.privacy import round_event
    from edgekit.federated.strategies import make_strategy, with_differential_privacy

    num_nodes = wait_for_nodes(grid, expected_nodes, settings.round_timeout)
    if num_nodes < 1:
        raise FederationError(f"no client connected within {settings.round_timeout:.0f} s")
    min_nodes = max(1, int(np.ceil(num_nodes * settings.fraction)))
    if settings.strategy is Strategy.TRIMMED and int(settings.trim_beta * min_nodes) < 1:
        raise FederationError(f"a trimmed mean with beta {settings.trim_beta:g} over {min_nodes} clients per round "
                              "trims nothing; it needs beta x clients >= 1")
    private = settings.dp_noise_multiplier is not None
    strategy = make_strategy(settings, min_nodes=min_nodes, uniform=private)
    if private:
        strategy = with_differential_privacy(strategy, noise_multiplier=settings.dp_noise_multiplier,
                                             clipping_norm=settings.dp_clipping_norm, num_sampled=min_nodes,
                                             population=num_nodes, delta=settings.dp_delta,
                                             clipping=settings.dp_clipping)
        for _ in range(state.round):  # a resumed run has already spent the completed rounds
            strategy.accountant.compose(round_event(noise_multiplier=settings.dp_noise_multiplier,
                                                    sampled=min_nodes, population=num_nodes))
        moved = _adaptive_clipping_norm(state.history) if settings.dp_clipping is Clipping.ADAPTIVE else None
        if moved is not None:  # a resumed adaptive run clips where the last committed round left the norm
            strategy.clipping_norm = moved
    return strategy, min_nodes, num_nodes


def _adaptive_clipping_norm(history: list[dict[str, Any]]) -> float | None:
    """The clipping norm the last checkpointed round of an adaptive-clipping run left for the next round (``None``
    in a new run, or when the checkpoint holds no finite positive norm)."""
    norm = next((h["privacy"].get("clipping_norm") for h in reversed(history) if isinstance(h.get("privacy"), dict)),
                None)
    return float(norm) if isinstance(norm, (int, float)) and math.isfinite(norm) and norm > 0 else None


def _evaluate(evaluator: Trainer, weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(loss, accuracy) of ``weights`` on held-out data; NaN for weights that cannot even be set."""
    from device_agents.errors import AgentError

    try:
        evaluator.set_weights(weights)
        return evaluator.evaluate(x, y)
    except AgentError:
        return float("nan"), float("nan")


def _one_round(grid: Any, strategy: Any, rnd: int, weights: dict[str, np.ndarray], settings: RoundSettings,
               evaluator: Trainer, eval_x: np.ndarray, eval_y: np.ndarray, good: float, link: Downlink | None,
               log: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from flwr.app import Array, ArrayRecord, ConfigRecord

    sent = link.advance(weights) if link is not None else weights  # what every device trains from
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in sent.items()})
    config = ConfigRecord(settings.train_config(rnd))
    messages = list(strategy.configure_train(rnd, arrays, config, grid))
    if link is not None:
        link.compress(messages)
    down = [payload_bytes(m.content) for m in messages]
    replies = list(grid.send_and_receive(messages=messages, timeout=settings.round_timeout))
    if link is not None:
        link.settle({int(r.metadata.src_node_id) for r in replies if not r.has_error() and "codec" in r.content})
    valid, rejected, failed, up = _collect(replies, sent, settings, rnd, log)
    # replies arrive in any order, and float sums in another order round differently: aggregate in an order set by
    # the updates' contents alone, so a seeded run repeats exactly
    valid.sort(key=lambda item: codec.digest(item[1]))
    _report_backoffs(valid, settings, rnd, log)
    valid, outliers = robust_filter(valid, sent, settings)
    rejected += [item for item in outliers if not item.get("bounded")]
    bounded = [item for item in outliers if item.get("bounded")]
    for item in outliers:
        log(f"round {rnd}: {'bounded' if item.get('bounded') else 'rejected'} the update of node {item['node']}: "
            f"{item['reason']}")

    def evaluate(candidate: dict[str, np.ndarray]) -> tuple[float, float]:
        return _evaluate(evaluator, candidate, eval_x, eval_y)

    valid, defence = _defend(valid, sent, settings, lambda candidate: evaluate(candidate)[0], rnd, log)
    entry: dict[str, Any] = {"round": rnd, "learning_rate": settings.learning_rate_at(rnd),
                             "momentum": settings.client_momentum,
                             "sampled": len(messages), "replied": len(replies) - failed,
                             "valid": len(valid), "failed": failed, "rejected": rejected,
                             "bytes_down_per_client": float(np.mean(down)) if down else 0.0,
                             "bytes_up_per_client": float(np.mean(up)) if up else 0.0, "aggregated": False,
                             "bounded": bounded, **defence}
    if len(valid) < max(1, int(np.ceil(settings.min_fraction * len(messages)))):
        log(f"round {rnd}: only {len(valid)} of {len(messages)} clients gave a valid update "
            f"(minimum {settings.min_fraction:.0%}); the global model is unchanged")
    else:
        weights = _commit(strategy, rnd, valid, settings, weights, good, evaluate, entry, log)
    if "accuracy" not in entry:
        entry["loss"], entry["accuracy"] = _evaluate(evaluator, weights, eval_x, eval_y)
    return weights, entry


def _defend(valid: list[tuple[Any, dict[str, np.ndarray], int]], sent: dict[str, np.ndarray],
            settings: RoundSettings, loss: Any, rnd: int, log: Any) -> tuple[list, dict[str, Any]]:
    """Bound every update's norm and screen each one on the evaluation data (:mod:`edgekit.federated.robust`);
    differentially private rounds skip both."""
    from edgekit.federated import robust

    defence: dict[str, Any] = {"norm_bounded": [], "dropped": []}
    if settings.dp_noise_multiplier is not None:
        return valid, defence
    if settings.update_norm_bound is not None:
        valid, defence["norm_bounded"] = robust.bound_norms(valid, sent, settings.update_norm_bound)
    if settings.screen_loss_ratio is not None:
        valid, defence["dropped"] = robust.screen(valid, loss, settings.screen_loss_ratio)
        for item in defence["dropped"]:
            log(f"round {rnd}: dropped the update of node {item['node']}: {item['reason']}")
    return valid, defence


def _commit(strategy: Any, rnd: int, valid: list[tuple[Any, dict[str, np.ndarray], int]], settings: RoundSettings,
            weights: dict[str, np.ndarray], good: float, evaluate: Any, entry: dict[str, Any],
            log: Any) -> dict[str, np.ndarray]:
    """Aggregate, and commit the result when it passes the last-good-model guard. When it does not, drop the
    updates whose absence helps the most (leave-one-out, :func:`edgekit.federated.robust.recover`) and
    commit the rest if that passes. Returns the global model after the round."""
    from edgekit.federated import robust
    from edgekit.federated.strategies import OptimizerSnapshot

    snapshot = OptimizerSnapshot(strategy)

    def aggregate(updates: list) -> tuple[tuple[dict[str, np.ndarray] | None, float], float]:
        """((candidate, its loss), its accuracy), every trial from the optimizer state before the round."""
        snapshot.restore()
        candidate, metrics = _aggregate(strategy, rnd, updates, settings)
        entry["train_metrics"] = metrics
        loss, accuracy = evaluate(candidate) if candidate is not None else (math.nan, math.nan)
        return (candidate, loss), accuracy

    def passes(accuracy: float) -> bool:
        return math.isfinite(accuracy) and accuracy >= good - settings.max_round_accuracy_drop

    (candidate, loss), acc = aggregate(valid)
    if not passes(acc) and settings.dp_noise_multiplier is None and len(valid) >= 3:
        kept, dropped, result = robust.recover(valid, aggregate, good, settings.max_round_accuracy_drop)
        for item in dropped:
            log(f"round {rnd}: dropped the update of node {item['node']} (the round's aggregate scored {acc:.2f}%, "
                f"refused by the last-good-model guard): {item['reason']}")
        entry["dropped"] = entry.get("dropped", []) + dropped
        if result is not None:
            (candidate, loss), acc = aggregate(kept)  # the strategy's state follows the committed aggregate
            entry["valid"] = len(kept)
    if candidate is not None and passes(acc):
        entry.update({"aggregated": True, "loss": loss, "accuracy": acc})
        return candidate
    snapshot.restore()  # the server optimizer forgets the refused round
    entry["guard"] = (f"the aggregate's held-out accuracy {acc:.2f}% is over "
                      f"{settings.max_round_accuracy_drop:g} points below the last good model's {good:.2f}%"
                      if math.isfinite(acc) else "the aggregate has non-finite weights")
    log(f"round {rnd}: not committed: {entry['guard']}; the global model is unchanged")
    return weights


def _report_backoffs(valid: list[tuple[Any, dict[str, np.ndarray], int]], settings: RoundSettings, rnd: int,
                     log: Any) -> None:
    """Say when devices trained at a lower rate than the round's (their local loss diverged at it)."""
    rates = [float(reply.content["metrics"][Metric.LEARNING_RATE]) for reply, _, _ in valid]
    asked = settings.learning_rate_at(rnd)
    lower = [rate for rate in rates if rate < asked * 0.999]
    if lower:
        log(f"round {rnd}: {len(lower)} of {len(rates)} device(s) diverged at learning rate "
            f"{asked:g} on their own data and trained at {min(lower):g}-{max(lower):g}; "
            "a lower learning rate suits this model")


def _collect(replies: list, weights: dict[str, np.ndarray], settings: RoundSettings, rnd: int,
             log: Any) -> tuple[list[tuple[Any, dict[str, np.ndarray], int]], list[dict], int, list[int]]:
    """(valid (reply, weights, examples), rejections, failures, bytes up) of a round's replies."""
    valid, rejected, failed, up = [], [], 0, []
    for reply in replies:
        if reply.has_error():
            failed += 1
            log(f"round {rnd}: node {reply.metadata.src_node_id} sent no update: "
                f"{' '.join(str(reply.error.reason).split())[:300]}")
            continue
        try:
            up.append(payload_bytes(reply.content))
            clipping = settings.dp_clipping if settings.dp_noise_multiplier is not None else Clipping.NONE
            decoded, why = validate_reply(reply.content, weights, settings.compress_updates, clipping)
        except Exception as exc:  # a malformed reply of any kind is rejected, never fatal
            decoded, why = None, f"malformed reply ({type(exc).__name__}: {str(exc)[:120]})"
        if decoded is None:
            rejected.append({"node": int(reply.metadata.src_node_id), "reason": why})
            log(f"round {rnd}: rejected the update of node {reply.metadata.src_node_id}: {why}")
            continue
        valid.append((reply, decoded, int(reply.content["metrics"][Metric.NUM_EXAMPLES])))
    return valid, rejected, failed, up


def _aggregate(strategy: Any, rnd: int, valid: list[tuple[Any, dict[str, np.ndarray], int]],
               settings: RoundSettings) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    from edgekit.federated.strategies import UNIFORM_WEIGHT

    for reply, decoded, examples in valid:
        metrics = {**dict(reply.content["metrics"]), Metric.NUM_EXAMPLES: examples}
        if settings.dp_noise_multiplier is not None:
            metrics[UNIFORM_WEIGHT] = 1
        reply.content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in decoded.items()}),
                                    "metrics": MetricRecord(metrics)})
    aggregated, metrics = strategy.aggregate_train(rnd, [reply for reply, _, _ in valid])
    # Flower's FedAdam/FedYogi scale by a numpy float64, which makes float64 weights: the model is float32
    weights = None if aggregated is None else {k: v.numpy().astype(np.float32) for k, v in aggregated.items()}
    if weights is not None and not all(np.isfinite(v).all() for v in weights.values()):
        weights = None
    return weights, dict(metrics) if metrics is not None else {}
