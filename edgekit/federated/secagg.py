"""Secure aggregation (SecAgg+) runs: Flower's legacy fit workflow with ``SecAggPlusWorkflow``.

The server's strategy only ever receives the aggregate of the masked updates: each client's update
is secret-shared and masked, and the mask cancels only in the sum. Per-client validation, update
compression and differential privacy are not available in this mode (the server cannot see an
individual update to check or decode it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def make_secagg_server_app(*, settings: Any, names: list[str], initial: dict[str, np.ndarray], evaluator: Any,
                           eval_x: np.ndarray, eval_y: np.ndarray, clients: int, log: Any,
                           outcome: dict[str, Any], grid_of: Callable[[Any], Any] = lambda grid: grid) -> Any:
    """A ServerApp running FedAvg over SecAgg+ for ``settings.rounds`` rounds (on ``grid_of`` Flower's grid: a
    simulation's stoppable one)."""
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.serverapp import ServerApp

    history: list[dict[str, Any]] = []
    seen: list[int] = []  # distinct parameter sets the strategy received per round (1: only the aggregate)
    clock = {"t": time.perf_counter()}

    def evaluate(server_round: int, parameters: list[np.ndarray], config: dict) -> tuple[float, dict]:
        weights = dict(zip(names, parameters))
        evaluator.set_weights(weights)
        loss, acc = evaluator.evaluate(eval_x, eval_y)
        now = time.perf_counter()
        entry = {"round": server_round, "accuracy": acc, "loss": loss, "secure_aggregation": True}
        if server_round:
            entry["seconds"] = now - clock["t"]
            entry["distinct_updates_seen_by_server"] = seen[-1] if seen else None
        clock["t"] = now
        history.append(entry)
        outcome["weights"] = weights
        log(f"round {server_round}/{settings.rounds}: accuracy {acc:.2f}% loss {loss:.4f}"
            + ("  (SecAgg+: the server saw only the aggregate)" if server_round else " (initial model)"))
        return loss, {"accuracy": acc}

    strategy = secagg_strategy(settings, clients=clients, initial=[initial[n] for n in names], evaluate=evaluate,
                               seen=seen)
    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        try:
            legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=settings.rounds), strategy=strategy)
            workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
                num_shares=max(2, clients - 1), reconstruction_threshold=max(2, (clients + 1) // 2)))
            workflow(grid_of(grid), legacy)
            outcome["history"] = history
            outcome["seen"] = list(seen)
        except BaseException as exc:  # the simulation engine would only log it
            outcome["error"] = exc

    return app


def secagg_strategy(settings: Any, *, clients: int, initial: list[np.ndarray], evaluate: Any, seen: list[int]) -> Any:
    """Flower's FedAvg (legacy API, which SecAgg+ needs) that records how many distinct parameter sets it was
    handed per round in ``seen`` (1: only the aggregate). Its fit config is the round loop's
    (:meth:`~edgekit.federated.config.RoundSettings.train_config`)."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server.strategy import FedAvg

    class AggregateOnlyFedAvg(FedAvg):
        def aggregate_fit(self, server_round: int, results: list, failures: list) -> Any:
            # SecAgg+ hands the strategy one result per client, each carrying the same unmasked sum
            seen.append(len({b"".join(fit.parameters.tensors) for _, fit in results}))
            return super().aggregate_fit(server_round, results, failures)

    return AggregateOnlyFedAvg(
        fraction_fit=settings.fraction, fraction_evaluate=0.0, min_fit_clients=max(2, int(clients * settings.fraction)),
        min_available_clients=clients, evaluate_fn=evaluate, on_fit_config_fn=settings.train_config,
        initial_parameters=ndarrays_to_parameters(initial))
