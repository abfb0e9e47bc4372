"""The edgekit ServerApp: rounds of Flower training with validation, checkpoints and accounting.

Each round: the strategy (Flower's FedAvg, FedProx or FedTrimmedAvg) samples clients and builds the
train messages; replies are validated (finite values, the right tensor names and shapes; a faulty
reply is rejected and logged, never aggregated), int8 deltas are decoded onto the global weights
that were sent, the strategy aggregates, the server evaluates the new global model on held-out
data (in LiteRT, with the same trainable artifact) and writes a checkpoint. A round whose valid
replies fall below ``min_fraction`` of the sampled clients keeps the previous global model.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agents import codec
from device_agents.training import Trainer
from edgekit._io import write_atomic
from edgekit.errors import FederationError
from edgekit.federated.config import RoundSettings


@dataclass
class ServerState:
    """What the server keeps between rounds (and in each checkpoint)."""

    round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(folder: Path, weights: dict[str, np.ndarray], state: ServerState) -> None:
    """Write ``global.npz`` and ``state.json`` of a completed round, each atomically and durably."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **weights)
    write_atomic(folder / "global.npz", buffer.getvalue())
    write_atomic(folder / "state.json", json.dumps(asdict(state), indent=2).encode())


def load_checkpoint(folder: Path) -> tuple[dict[str, np.ndarray], ServerState] | None:
    if not (folder / "state.json").is_file() or not (folder / "global.npz").is_file():
        return None
    state = json.loads((folder / "state.json").read_text())
    with np.load(folder / "global.npz") as npz:
        weights = {k: npz[k] for k in npz.files}
    return weights, ServerState(round=state["round"], history=state["history"])


def validate_reply(content: Any, reference: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray] | None, str]:
    """Decoded weights of a train reply, or (None, why it was rejected)."""
    if "arrays" not in content or "metrics" not in content:
        return None, "no arrays or metrics"
    arrays = {k: v.numpy() for k, v in content["arrays"].items()}
    if set(arrays) != set(reference):
        return None, f"tensor names differ ({len(arrays)} tensors, expected {len(reference)})"
    for name, value in arrays.items():
        if value.shape != reference[name].shape:
            return None, f"tensor {name} has shape {value.shape}, expected {reference[name].shape}"
    if "codec" in content:
        scales = {k: float(v) for k, v in content["codec"].items()}
        if set(scales) != set(reference) or not all(np.isfinite(s) and s > 0 for s in scales.values()):
            return None, "invalid codec scales"
        arrays = codec.decode(arrays, scales, reference)
    for name, value in arrays.items():
        if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
            return None, f"tensor {name} holds NaN/inf or is not float"
    examples = content["metrics"].get("num-examples", 0)
    if not examples or examples <= 0:
        return None, "num-examples missing or not positive"
    return arrays, ""


def wait_for_nodes(grid: Any, expected: int, timeout: float) -> int:
    """Wait until ``expected`` nodes are connected (or ``timeout`` passes); return how many are."""
    deadline = time.monotonic() + timeout
    while True:
        count = len(list(grid.get_node_ids()))
        if count >= expected or time.monotonic() >= deadline:
            return count
        time.sleep(0.5)


def run_rounds(grid: Any, *, settings: RoundSettings, initial: dict[str, np.ndarray], evaluator: Trainer,
               eval_x: np.ndarray, eval_y: np.ndarray, checkpoint_dir: Path, resume: bool, expected_nodes: int,
               log: Any = print) -> tuple[dict[str, np.ndarray], ServerState]:
    """The round loop (called from the ServerApp's main with Flower's Grid)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from edgekit.federated.strategies import UNIFORM_WEIGHT, make_strategy, with_differential_privacy

    weights, state = dict(initial), ServerState()
    if resume:
        restored = load_checkpoint(checkpoint_dir)
        if restored is not None:
            weights, state = restored
            log(f"resuming after round {state.round} from {checkpoint_dir}")
    num_nodes = wait_for_nodes(grid, expected_nodes, settings.round_timeout)
    if num_nodes < 1:
        raise FederationError(f"no client connected within {settings.round_timeout:.0f} s")
    min_nodes = max(1, int(np.ceil(num_nodes * settings.fraction)))
    private = settings.dp_noise_multiplier is not None
    strategy = make_strategy(settings.strategy, fraction=settings.fraction, min_nodes=min_nodes,
                             proximal_mu=settings.proximal_mu, trim_beta=settings.trim_beta, uniform=private)
    if private:
        strategy = with_differential_privacy(strategy, noise_multiplier=settings.dp_noise_multiplier,
                                             clipping_norm=settings.dp_clipping_norm, num_sampled=min_nodes,
                                             population=num_nodes, delta=settings.dp_delta)
        for _ in range(state.round):  # a resumed run has already spent the completed rounds
            strategy.accountant.compose(_privacy_event(settings, min_nodes, num_nodes))
    if state.round == 0 and not state.history:
        evaluator.set_weights(weights)
        loss, acc = evaluator.evaluate(eval_x, eval_y)
        state.history.append({"round": 0, "accuracy": acc, "loss": loss})
        log(f"round 0/{settings.rounds}: accuracy {acc:.2f}% loss {loss:.4f} (initial model)")
    for rnd in range(state.round + 1, settings.rounds + 1):
        start = time.perf_counter()
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})
        config = ConfigRecord({"local-epochs": settings.local_epochs, "learning-rate": settings.learning_rate,
                               "compress-updates": settings.compress_updates, "seed": settings.seed * 1000 + rnd})
        messages = list(strategy.configure_train(rnd, arrays, config, grid))
        down = sum(v.nbytes for v in weights.values())
        replies = list(grid.send_and_receive(messages=messages, timeout=settings.round_timeout))
        valid, rejected, failed, up = [], [], 0, []
        for reply in replies:
            if reply.has_error():
                failed += 1
                continue
            up.append(sum(v.numpy().nbytes for v in reply.content["arrays"].values())
                      if "arrays" in reply.content else 0)
            decoded, why = validate_reply(reply.content, weights)
            if decoded is None:
                rejected.append({"node": int(reply.metadata.src_node_id), "reason": why})
                log(f"round {rnd}: rejected the update of node {reply.metadata.src_node_id}: {why}")
                continue
            metrics = reply.content["metrics"]
            if private:
                metrics = MetricRecord({**dict(metrics), UNIFORM_WEIGHT: 1})
            reply.content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in decoded.items()}),
                                        "metrics": metrics})
            valid.append(reply)
        sampled = len(messages)
        entry: dict[str, Any] = {"round": rnd, "sampled": sampled, "replied": len(replies) - failed,
                                 "valid": len(valid), "failed": failed, "rejected": rejected,
                                 "bytes_down_per_client": down,
                                 "bytes_up_per_client": float(np.mean(up)) if up else 0.0}
        if len(valid) >= max(1, int(np.ceil(settings.min_fraction * sampled))):
            aggregated, metrics = strategy.aggregate_train(rnd, valid)
            if aggregated is not None:
                weights = {k: v.numpy() for k, v in aggregated.items()}
            entry["train_metrics"] = dict(metrics) if metrics is not None else {}
            entry["aggregated"] = True
        else:
            entry["aggregated"] = False
            log(f"round {rnd}: only {len(valid)} of {sampled} clients gave a valid update "
                f"(minimum {settings.min_fraction:.0%}); the global model is unchanged")
        if private:
            spent = strategy.privacy_spent()
            entry["privacy"] = {"epsilon": float(spent.epsilon), "delta": float(spent.delta),
                                "noise_multiplier": settings.dp_noise_multiplier,
                                "clipping_norm": settings.dp_clipping_norm}
        evaluator.set_weights(weights)
        loss, acc = evaluator.evaluate(eval_x, eval_y)
        entry.update({"accuracy": acc, "loss": loss, "seconds": time.perf_counter() - start})
        state.history.append(entry)
        state.round = rnd
        save_checkpoint(checkpoint_dir, weights, state)
        privacy = f"  (epsilon {entry['privacy']['epsilon']:.2f}, delta {settings.dp_delta:g})" if private else ""
        log(f"round {rnd}/{settings.rounds}: accuracy {acc:.2f}% loss {loss:.4f}  clients {len(valid)}/{sampled}"
            f"  up {entry['bytes_up_per_client'] / 1024:.1f} KiB/client  {entry['seconds']:.1f} s{privacy}")
    return weights, state


def _privacy_event(settings: RoundSettings, sampled: int, population: int) -> Any:
    from flwr.serverapp import GaussianPrivacyEvent

    return GaussianPrivacyEvent(noise_multiplier=settings.dp_noise_multiplier, sample_size=sampled,
                                population_size=population)
