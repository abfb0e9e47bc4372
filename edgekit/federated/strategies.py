"""Strategy registry: name -> a Flower strategy (the real ``flwr.serverapp.strategy`` classes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgekit.errors import InputError
from edgekit.federated.config import Strategy


def _fedavg(**kw: Any) -> Any:
    from flwr.serverapp.strategy import FedAvg

    return FedAvg(**kw)


def _fedprox(*, proximal_mu: float, **kw: Any) -> Any:
    from flwr.serverapp.strategy import FedProx

    return FedProx(proximal_mu=proximal_mu, **kw)


def _trimmed(*, beta: float, **kw: Any) -> Any:
    from flwr.serverapp.strategy import FedTrimmedAvg

    return FedTrimmedAvg(beta=beta, **kw)


STRATEGIES: dict[Strategy, Callable[..., Any]] = {
    Strategy.FEDAVG: _fedavg,
    Strategy.FEDPROX: _fedprox,
    Strategy.TRIMMED: _trimmed,
}
"""Strategy -> factory of the Flower strategy. Every entry has an aggregation test and a simulation test."""


UNIFORM_WEIGHT = "uniform-weight"
"""The metric DP runs aggregate by: every valid client counts once (DP-FedAvg weighting)."""


def make_strategy(strategy: Strategy | str, *, fraction: float, min_nodes: int, proximal_mu: float,
                  trim_beta: float, uniform: bool = False) -> Any:
    """Build the Flower strategy registered for ``strategy``; unknown names are refused with the valid list.

    ``uniform``: every valid client weighs the same (DP-FedAvg), instead of by its number of examples.
    """
    try:
        factory = STRATEGIES[Strategy(strategy)]
    except ValueError:
        raise InputError(f"unknown strategy {strategy!r}; valid: {', '.join(s.value for s in STRATEGIES)}") from None
    common = {"fraction_train": fraction, "fraction_evaluate": 0.0, "min_train_nodes": min_nodes,
              "min_evaluate_nodes": 0, "min_available_nodes": min_nodes}
    if uniform:
        common["weighted_by_key"] = UNIFORM_WEIGHT
    extra = {Strategy.FEDPROX: {"proximal_mu": proximal_mu}, Strategy.TRIMMED: {"beta": trim_beta}}
    return factory(**extra.get(Strategy(strategy), {}), **common)


def with_differential_privacy(strategy: Any, *, noise_multiplier: float, clipping_norm: float,
                              num_sampled: int, population: int, delta: float) -> Any:
    """Wrap ``strategy`` in Flower's client-side fixed clipping + Gaussian noise, with RDP accounting."""
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    accountant = RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population,
                                             neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                             sampling_method=SamplingMethod.NO_AMPLIFICATION))
    return DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier, clipping_norm, num_sampled,
                                                      accountant=accountant)
