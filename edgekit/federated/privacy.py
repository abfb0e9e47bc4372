"""Will differential privacy leave a useful model? The noise of a DP run, worked out before it starts.

With client-side clipping to ``C`` and Gaussian noise of multiplier ``sigma`` (DP-FedAvg, Flower's
``DifferentialPrivacyClientSideFixedClipping``), the aggregate of ``m`` clients carries noise of
standard deviation ``sigma * C / m`` on each of the model's ``d`` weights, so a noise vector of L2
norm about ``sigma * C * sqrt(d) / m``, while the mean of the clipped updates has norm at most ``C``.
Their ratio ``sigma * sqrt(d) / m`` does not depend on ``C``. Past 1 the noise of a round is larger than
any update the clients can send; the rounds still average it out for a while (measured on the digits CNN,
100 clients, 30 rounds, BENCHMARKS.md: 96.4% at ratio 0.92, 95.8% at 2.15), but far past it the model is
destroyed (a 99% digits CNN fell to 9% in one round at ratio 61: sigma 1 with 5 clients per round). So a
run warns above :data:`NOISE_TO_SIGNAL_WARN` and is refused above :data:`NOISE_TO_SIGNAL_LIMIT`. Keeping
the ratio at 1 needs ``m >= sigma * sqrt(d)`` clients per round.

The epsilon is Flower's RDP accountant composed over every round with no amplification by sampling
(a conservative choice: the sampled clients are not assumed to be a random subset).

>>> plan = plan_noise(noise_multiplier=1.0, clipping_norm=1.0, clients_per_round=5, parameters=94_218,
...                   rounds=30, population=10, delta=1e-5)
>>> round(plan.ratio, 1), plan.clients_needed
(61.4, 307)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

NOISE_TO_SIGNAL_WARN = 1.0
"""Noise-to-update norm ratio above which a DP run starts with a warning."""
NOISE_TO_SIGNAL_LIMIT = 10.0
"""Largest noise-to-update norm ratio a DP run may start with unless told to go on anyway."""
REFERENCE_EPSILONS = (1.0, 3.0, 8.0)
"""Targets the advice prices in clients per round."""


@dataclass(frozen=True)
class NoisePlan:
    """The noise a DP run's aggregate will carry, and the privacy it buys."""

    parameters: int
    clients_per_round: int
    noise_norm: float    # sigma * C * sqrt(d) / m
    update_norm: float   # C: the largest mean of clipped updates
    ratio: float         # noise_norm / update_norm
    clients_needed: int  # clients per round for the ratio to come down to NOISE_TO_SIGNAL_WARN (1)
    epsilon: float       # after every round, at delta
    delta: float
    rounds: int
    targets: tuple[tuple[float, float, int], ...] = ()  # (epsilon, noise multiplier it needs, clients per round)

    def describe(self) -> str:
        return (f"the aggregate of {self.clients_per_round} clients per round carries noise of L2 norm "
                f"{self.noise_norm:.3g} on {self.parameters:,} weights against a mean update of at most "
                f"{self.update_norm:.3g} (ratio {self.ratio:.3g}); epsilon after {self.rounds} rounds "
                f"{self.epsilon:.3g} at delta {self.delta:g}")

    def verdict(self) -> str:
        """``"allowed"``, ``"warned"`` (noise above the largest update) or ``"refused"`` (over the limit)."""
        if self.ratio <= NOISE_TO_SIGNAL_WARN:
            return "allowed"
        return "warned" if self.ratio <= NOISE_TO_SIGNAL_LIMIT else "refused"

    def advice(self) -> str:
        targets = "; ".join(f"epsilon {eps:g}: noise multiplier {sigma:.2f}, {clients:,} clients per round"
                            for eps, sigma, clients in self.targets)
        priced = f" (over {self.rounds} rounds, {targets})" if targets else ""
        return (f"keeping the noise below the largest update needs at least {self.clients_needed:,} clients per round "
                f"at this noise, or a smaller "
                f"noise multiplier (a larger epsilon){priced}")


def accountant(*, population: int, delta: float) -> Any:
    """Flower's RDP accountant as edgekit uses it: add-or-remove-one neighbours, no amplification by sampling."""
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

    return RdpAccountant(PrivacyConfig(target_delta=delta, population_size=population,
                                       neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       sampling_method=SamplingMethod.NO_AMPLIFICATION))


def round_event(*, noise_multiplier: float, sampled: int, population: int) -> Any:
    """The privacy event of one round: a Gaussian mechanism over ``sampled`` of ``population`` clients."""
    from flwr.serverapp import GaussianPrivacyEvent

    return GaussianPrivacyEvent(noise_multiplier=noise_multiplier, sample_size=sampled, population_size=population)


def plan_noise(*, noise_multiplier: float, clipping_norm: float, clients_per_round: int, parameters: int,
               rounds: int, population: int, delta: float) -> NoisePlan:
    """The :class:`NoisePlan` of a DP-FedAvg run."""
    root = math.sqrt(parameters)

    def epsilon(sigma: float) -> float:
        spent = accountant(population=population, delta=delta)
        for _ in range(rounds):
            spent.compose(round_event(noise_multiplier=sigma, sampled=clients_per_round, population=population))
        return float(spent.get_privacy_spent().epsilon)

    targets = []
    for target in REFERENCE_EPSILONS:
        low, high = 0.01, 1000.0  # epsilon falls as sigma grows: bisect on a log scale
        for _ in range(40):
            middle = math.sqrt(low * high)
            low, high = (middle, high) if epsilon(middle) > target else (low, middle)
        targets.append((target, high, math.ceil(high * root / NOISE_TO_SIGNAL_WARN)))
    return NoisePlan(parameters=parameters, clients_per_round=clients_per_round,
                     noise_norm=noise_multiplier * clipping_norm * root / clients_per_round,
                     update_norm=clipping_norm, ratio=noise_multiplier * root / clients_per_round,
                     clients_needed=math.ceil(noise_multiplier * root / NOISE_TO_SIGNAL_WARN),
                     epsilon=epsilon(noise_multiplier), delta=delta, rounds=rounds, targets=tuple(targets))
