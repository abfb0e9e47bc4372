"""Strategy registry: name -> a Flower strategy (the real ``flwr.serverapp.strategy`` classes).

Each entry is a :class:`StrategySpec`: the factory of the Flower class and the server learning rate
used when the round settings leave it unset. FedAvg, FedProx and the trimmed mean average the
clients' weights; FedAvgM adds server momentum; FedAdam, FedYogi and FedAdagrad treat the averaged
update as a pseudo-gradient for an adaptive server optimizer (Reddi et al., "Adaptive Federated
Optimization", 2021).

>>> sorted(s.value for s in STRATEGIES)[:3]
['fedadagrad', 'fedadam', 'fedavg']
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from device_agents.protocol import Clipping
from edgekit.federated.config import RoundSettings, Strategy


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy: its factory and the server learning rate it uses by default."""

    factory: Callable[..., Any]
    server_learning_rate: float | None = None  # None: the strategy has no server learning rate
    summary: str = ""


def _fedavg(settings: RoundSettings, lr: float | None, **kw: Any) -> Any:
    from flwr.serverapp.strategy import FedAvg

    return FedAvg(**kw)


def _fedprox(settings: RoundSettings, lr: float | None, **kw: Any) -> Any:
    from flwr.serverapp.strategy import FedProx

    return FedProx(proximal_mu=settings.proximal_mu, **kw)


def _trimmed(settings: RoundSettings, lr: float | None, **kw: Any) -> Any:
    from flwr.serverapp.strategy import FedTrimmedAvg

    return FedTrimmedAvg(beta=settings.trim_beta, **kw)


def _median(settings: RoundSettings, lr: float | None, **kw: Any) -> Any:
    from flwr.serverapp.strategy import FedMedian

    return FedMedian(**kw)


def _multikrum(settings: RoundSettings, lr: float | None, **kw: Any) -> Any:
    from flwr.serverapp.strategy import MultiKrum

    select = max(1, kw["min_train_nodes"] - settings.byzantine)
    return MultiKrum(num_malicious_nodes=settings.byzantine, num_nodes_to_select=select, **kw)


def _fedavgm(settings: RoundSettings, lr: float | None, **kw: Any) -> Any:
    from flwr.serverapp.strategy import FedAvgM

    return FedAvgM(server_learning_rate=lr, server_momentum=settings.server_momentum, **kw)


def _adaptive(name: str) -> Callable[..., Any]:
    def factory(settings: RoundSettings, lr: float | None, **kw: Any) -> Any:
        import flwr.serverapp.strategy as flower

        extra = {} if name == "FedAdagrad" else {"beta_1": settings.server_momentum}
        # eta_l is only logged by Flower: the devices use the round's own learning rate
        return getattr(flower, name)(eta=lr, eta_l=settings.learning_rate, tau=settings.adaptivity, **extra, **kw)

    return factory


STRATEGIES: dict[Strategy, StrategySpec] = {
    Strategy.FEDADAGRAD: StrategySpec(_adaptive("FedAdagrad"), 0.01, "adaptive server optimizer (Adagrad)"),
    Strategy.FEDADAM: StrategySpec(_adaptive("FedAdam"), 0.01, "adaptive server optimizer (Adam)"),
    Strategy.FEDAVG: StrategySpec(_fedavg, None, "weighted average of the clients' weights"),
    Strategy.FEDAVGM: StrategySpec(_fedavgm, 1.0, "FedAvg with server momentum"),
    Strategy.FEDPROX: StrategySpec(_fedprox, None, "FedAvg; clients add a proximal term"),
    Strategy.FEDYOGI: StrategySpec(_adaptive("FedYogi"), 0.01, "adaptive server optimizer (Yogi)"),
    Strategy.MEDIAN: StrategySpec(_median, None, "coordinate-wise median (robust to outliers)"),
    Strategy.MULTIKRUM: StrategySpec(_multikrum, None, "Multi-Krum: the average of the updates closest to the "
                                                       "others (robust to a known number of attackers)"),
    Strategy.TRIMMED: StrategySpec(_trimmed, None, "coordinate-wise trimmed mean (robust to outliers)"),
}
"""Strategy -> its spec. Every entry has an aggregation test and a simulation test."""


UNIFORM_WEIGHT = "uniform-weight"
"""The metric DP runs aggregate by: every valid client counts once (DP-FedAvg weighting)."""

OPTIMIZER_STATE = ("current_arrays", "m_t", "v_t", "momentum_vector")
"""Attributes in which Flower's server optimizers keep state between rounds."""


def server_learning_rate(settings: RoundSettings) -> float | None:
    """The server learning rate of a run: the settings' own, else the registered default."""
    spec = STRATEGIES[settings.aggregation]
    if spec.server_learning_rate is None:
        return None
    return settings.server_learning_rate if settings.server_learning_rate is not None else spec.server_learning_rate


def make_strategy(settings: RoundSettings, *, min_nodes: int, uniform: bool = False) -> Any:
    """Build the Flower strategy registered for ``settings.aggregation`` (the strategy given, or the default).

    ``uniform``: every valid client weighs the same (DP-FedAvg), instead of by its number of examples.

    >>> make_strategy(RoundSettings(strategy=Strategy.FEDADAM), min_nodes=2).eta
    0.01
    """
    common = {"fraction_train": settings.fraction, "fraction_evaluate": 0.0, "min_train_nodes": min_nodes,
              "min_evaluate_nodes": 0, "min_available_nodes": min_nodes}
    if uniform:
        common["weighted_by_key"] = UNIFORM_WEIGHT
    return STRATEGIES[settings.aggregation].factory(settings, server_learning_rate(settings), **common)


def _optimizer(strategy: Any) -> Any:
    """The strategy that holds the optimizer state (the differential-privacy wrappers hold the real one)."""
    while hasattr(strategy, "strategy"):
        strategy = strategy.strategy
    return strategy


OPTIMIZER_PREFIX = "server-optimizer:"
"""Names of the optimizer state's arrays in a checkpoint's weights file (``server-optimizer:m_t:dense_kernel``)."""


def optimizer_state(strategy: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The server optimizer's state as arrays to checkpoint beside the weights, and its layout (attribute ->
    ``dict``, ``list`` or ``arrays``: how to put it back; ``strategy``: the Flower class that holds it). No
    arrays for strategies without state (FedAvg)."""
    import numpy as np
    from flwr.app import ArrayRecord

    inner, arrays = _optimizer(strategy), {}
    layout = {"strategy": type(inner).__name__}
    for attr in OPTIMIZER_STATE:
        value = getattr(inner, attr, None)
        if isinstance(value, ArrayRecord):
            kind, items = "arrays", {k: v.numpy() for k, v in value.items()}
        elif isinstance(value, dict):
            kind, items = "dict", value
        elif isinstance(value, list):
            kind, items = "list", {str(i): v for i, v in enumerate(value)}
        else:  # None (before the first aggregation) or a kind edgekit does not know: not kept
            continue
        layout[attr] = kind
        arrays.update({f"{OPTIMIZER_PREFIX}{attr}:{k}": np.asarray(v) for k, v in items.items()})
    return arrays, layout


def restore_optimizer_state(strategy: Any, arrays: dict[str, Any], layout: dict[str, str]) -> list[str]:
    """Put a checkpointed optimizer state (:func:`optimizer_state`) back into a new ``strategy`` of the same
    kind; returns the attributes restored (none when the strategy has no such state, or is another kind than
    the one that saved it: a run resumed with another strategy starts its optimizer afresh)."""
    from flwr.app import Array, ArrayRecord

    inner, restored = _optimizer(strategy), []
    if layout.get("strategy") != type(inner).__name__:
        return restored
    for attr, kind in layout.items():
        if attr not in OPTIMIZER_STATE or not hasattr(inner, attr):
            continue
        prefix = f"{OPTIMIZER_PREFIX}{attr}:"
        items = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        if kind == "arrays":
            value: Any = ArrayRecord({k: Array(v) for k, v in items.items()})
        elif kind == "dict":
            value = dict(items)
        elif kind == "list" and set(items) == {str(i) for i in range(len(items))}:
            value = [items[str(i)] for i in range(len(items))]
        else:
            continue
        setattr(inner, attr, value)
        restored.append(attr)
    return restored


class OptimizerSnapshot:
    """The server optimizer's state before an aggregation, to put back when the aggregate is not committed.

    FedAvgM and FedAdam/FedYogi/FedAdagrad move their momentum and their copy of the global model inside
    ``aggregate_train``; a round the last-good-model guard refuses must not leave that state behind.
    """

    def __init__(self, strategy: Any) -> None:
        self._inner = _optimizer(strategy)
        self._saved = {k: _copied(getattr(self._inner, k)) for k in OPTIMIZER_STATE if hasattr(self._inner, k)}

    def restore(self) -> None:
        for name, value in self._saved.items():
            setattr(self._inner, name, value)


def _copied(value: Any) -> Any:
    """A copy of optimizer state: arrays, dicts or lists of them, or an ArrayRecord (whose arrays may hold a
    memoryview of a received message, which ``copy.deepcopy`` cannot copy)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    if isinstance(value, ArrayRecord):
        return ArrayRecord({k: Array(np.array(v.numpy())) for k, v in value.items()})
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copied(v) for v in value]
    return np.array(value) if isinstance(value, np.ndarray) else copy.deepcopy(value)


def with_differential_privacy(strategy: Any, *, noise_multiplier: float, clipping_norm: float, num_sampled: int,
                              population: int, delta: float, clipping: Clipping = Clipping.FIXED) -> Any:
    """Wrap ``strategy`` in Flower's client-side clipping + Gaussian noise, with RDP accounting.

    ``clipping``: ``FIXED`` clips every update to ``clipping_norm``; ``ADAPTIVE`` starts there and moves
    the norm each round towards the median update norm (Andrew et al., "Differentially Private Learning
    with Adaptive Clipping", 2021), from the devices' noised clipped/not-clipped bits. Flower splits the
    noise between the update and those bits so that together they are a Gaussian mechanism of multiplier
    ``noise_multiplier``, which is what the accountant composes each round.
    """
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideAdaptiveClipping,
        DifferentialPrivacyClientSideFixedClipping,
    )

    from edgekit.federated.privacy import accountant, round_event

    spent = accountant(population=population, delta=delta)
    if clipping is Clipping.FIXED:
        return DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier, clipping_norm, num_sampled,
                                                          accountant=spent)
    event = round_event(noise_multiplier=noise_multiplier, sampled=num_sampled, population=population)

    class AccountedAdaptiveClipping(DifferentialPrivacyClientSideAdaptiveClipping):
        """Flower's adaptive clipping, with the RDP accountant its fixed sibling has."""

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            arrays, metrics = super().aggregate_train(server_round, replies)
            if arrays is not None:
                self.accountant.compose(event)
            return arrays, metrics

        def privacy_spent(self) -> Any:
            return self.accountant.get_privacy_spent()

    wrapped = AccountedAdaptiveClipping(strategy, noise_multiplier, num_sampled, initial_clipping_norm=clipping_norm)
    wrapped.accountant = spent
    return wrapped
