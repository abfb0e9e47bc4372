"""Settings of a federated run, as validated frozen dataclasses with enums.

:class:`RoundSettings` is what the server does each round; :class:`SimulationConfig` and
:class:`DeployConfig` add where the clients run (Flower's simulation engine, or real SuperLink and
SuperNode processes). Partitions are :class:`Partition` values, not strings; the command line
parses its own ``dirichlet:0.5`` syntax. Messages name the setting, never a command-line flag.

>>> SimulationConfig(clients=10, partition=Partition(PartitionScheme.DIRICHLET, 0.5)).partition.alpha
0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

from device_agents.protocol import ClientLimits, Clipping, Codec, Fault, TrainConfig
from edgekit.config import coerce_enum
from edgekit.errors import InputError


class Strategy(str, Enum):
    """The server's aggregation strategy (Flower's classes; see :mod:`edgekit.federated.strategies`)."""

    FEDADAGRAD = "fedadagrad"
    FEDADAM = "fedadam"
    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"
    FEDPROX = "fedprox"
    FEDYOGI = "fedyogi"
    MEDIAN = "median"
    MULTIKRUM = "multikrum"
    TRIMMED = "trimmed"


class LrSchedule(str, Enum):
    """How the on-device learning rate moves over the rounds (:meth:`RoundSettings.learning_rate_at`)."""

    CONSTANT = "constant"  # the learning rate every round
    COSINE = "cosine"      # cosine decay from the learning rate at round 1 to LR_FLOOR of it at the last round


LR_FLOOR = 0.1
"""The fraction of the learning rate a cosine schedule ends at (its last round)."""


class NoiseGuard(str, Enum):
    """What a differential-privacy run does when its noise would drown every update (see
    :mod:`edgekit.federated.privacy`)."""

    REFUSE = "refuse"  # do not start; say how many clients per round the noise needs
    WARN = "warn"      # start anyway, with the numbers in a warning (rehearsals, small simulations)


class PartitionScheme(str, Enum):
    """How the clients' data is split from the user's dataset."""

    IID = "iid"              # shuffled, equal shares
    DIRICHLET = "dirichlet"  # label skew: each class is shared out by Dirichlet(alpha) proportions


@dataclass(frozen=True)
class Partition:
    """A partition scheme and its Dirichlet concentration ``alpha`` (smaller: more skewed)."""

    scheme: PartitionScheme = PartitionScheme.IID
    alpha: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", coerce_enum(PartitionScheme, self.scheme, "partition scheme"))
        if self.scheme is PartitionScheme.DIRICHLET and not float(self.alpha) > 0:
            raise InputError(f"the Dirichlet alpha of a partition must be > 0 (e.g. 0.5), got {self.alpha}")

    def __str__(self) -> str:
        return self.scheme.value if self.scheme is PartitionScheme.IID else f"dirichlet({self.alpha:g})"


class OversizedUpdate(str, Enum):
    """What the server does with an update far larger than the round's median (and than the model's floor)."""

    REJECT = "reject"  # drop it from the round
    BOUND = "bound"    # keep its direction, scale its norm down to the limit (norm bounding, Sun et al. 2019)


@dataclass(frozen=True)
class RoundSettings:
    """What the server does each round, and how clients train (sent in each round's config)."""

    # defaults chosen by the measured sweep in BENCHMARKS.md ("Federated settings sweep")
    rounds: int = 10
    local_epochs: int = 10
    learning_rate: float = 0.1
    lr_schedule: LrSchedule = LrSchedule.CONSTANT
    client_momentum: float = 0.0  # on-device heavy-ball momentum (0: plain SGD); zeroed at each round's start
    strategy: Strategy | None = None  # None: FedAvgM, or FedAvg in DP runs (see the aggregation property)
    proximal_mu: float = 0.01
    trim_beta: float = 0.2
    server_learning_rate: float | None = None  # FedAvgM / FedAdam / FedYogi / FedAdagrad; None: the registry's
    server_momentum: float = 0.9   # FedAvgM's momentum; FedAdam's and FedYogi's beta_1
    adaptivity: float = 1e-3       # tau of FedAdam / FedYogi / FedAdagrad (larger: closer to server SGD)
    fraction: float = 1.0
    min_fraction: float = 0.5
    compress_updates: Codec = Codec.FLOAT32  # how clients send updates (True: int8, for older callers)
    round_timeout: float = 600.0
    seed: int = 0
    dp_noise_multiplier: float | None = None  # differential privacy: Gaussian noise (x clipping norm)
    dp_clipping_norm: float = 1.0              # each client's update is clipped to this L2 norm (adaptive: at first)
    dp_clipping: Clipping = Clipping.FIXED     # or ADAPTIVE: the norm follows the median update (Andrew et al.)
    dp_delta: float = 1e-5
    dp_noise_guard: NoiseGuard = NoiseGuard.REFUSE  # when the noise would exceed any clipped mean update
    max_update_norm_ratio: float = 5.0    # reject an update over this many times the round's median update ...
    update_norm_floor: float = 0.1        # ... that is also over this fraction of the global model's norm
    oversized_updates: OversizedUpdate = OversizedUpdate.REJECT  # ... or bound its norm to that limit
    bound_reject_ratio: float | None = None  # when bounding: still reject updates over this many times the median
    max_examples_ratio: float = 2.0       # cap a client's reported sample count at this many times the median
    max_round_accuracy_drop: float = 20.0  # last-good-model guard: commit no aggregate that loses more (points)
    # Byzantine robustness (edgekit.federated.robust); neither applies in differentially private rounds
    update_norm_bound: float | None = 1.0  # scale every update down to this many times the round's median norm
    screen_loss_ratio: float | None = 2.5  # drop an update whose own held-out loss is over this x the round's median
    byzantine: int = 1                     # attackers Multi-Krum assumes per round

    @property
    def aggregation(self) -> Strategy:
        """The strategy the run uses: the one given; else FedAvg in a differential-privacy run (Flower's
        accounting needs plain averaging) and FedAvgM, the measured default, otherwise."""
        if self.strategy is not None:
            return self.strategy
        return Strategy.FEDAVG if self.dp_noise_multiplier is not None else Strategy.FEDAVGM

    def learning_rate_at(self, rnd: int) -> float:
        """The on-device learning rate of round ``rnd`` (1-based; rounds past the last keep the last one's).

        >>> RoundSettings(rounds=3, learning_rate=0.1, lr_schedule=LrSchedule.COSINE).learning_rate_at(3)
        0.01
        """
        if self.lr_schedule is LrSchedule.CONSTANT or self.rounds <= 1:
            return self.learning_rate
        progress = min(max(rnd - 1, 0), self.rounds - 1) / (self.rounds - 1)
        return round(self.learning_rate * (LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))), 12)

    def train_config(self, rnd: int) -> dict[str, int | float | str]:
        """The ``config`` record of round ``rnd``'s train messages (keys: :class:`device_agents.protocol.TrainConfig`).
        Devices clip for central DP only when the round adds noise.

        >>> RoundSettings(rounds=2, seed=1).train_config(2)[TrainConfig.SEED]
        1002
        """
        private = self.dp_noise_multiplier is not None
        return {TrainConfig.LOCAL_EPOCHS: self.local_epochs, TrainConfig.LEARNING_RATE: self.learning_rate_at(rnd),
                TrainConfig.MOMENTUM: self.client_momentum, TrainConfig.COMPRESS_UPDATES: self.compress_updates.value,
                TrainConfig.SEED: self.seed * 1000 + rnd,
                TrainConfig.DP_CLIPPING: (self.dp_clipping if private else Clipping.NONE).value}

    def __post_init__(self) -> None:
        self._coerce()
        self._check_defences()
        self._check_training()
        self._check_privacy()

    def _coerce(self) -> None:
        """Enums from their values (and the older boolean codec)."""
        object.__setattr__(self, "lr_schedule", coerce_enum(LrSchedule, self.lr_schedule, "learning-rate schedule"))
        if self.strategy is not None:
            object.__setattr__(self, "strategy", coerce_enum(Strategy, self.strategy, "strategy"))
        object.__setattr__(self, "dp_noise_guard", coerce_enum(NoiseGuard, self.dp_noise_guard, "noise guard"))
        object.__setattr__(self, "dp_clipping", coerce_enum(Clipping, self.dp_clipping, "clipping"))
        object.__setattr__(self, "oversized_updates", coerce_enum(OversizedUpdate, self.oversized_updates,
                                                                  "oversized-update policy"))
        if self.dp_clipping is Clipping.NONE:
            raise InputError("differential-privacy clipping must be fixed or adaptive")
        codec = {True: Codec.INT8, False: Codec.FLOAT32, None: Codec.FLOAT32}.get(self.compress_updates,
                                                                                 self.compress_updates)
        object.__setattr__(self, "compress_updates", coerce_enum(Codec, codec, "update codec"))

    def _check_defences(self) -> None:
        """The update limits, the Byzantine defences and the last-good-model guard."""
        for name in ("max_update_norm_ratio", "max_examples_ratio"):
            if not getattr(self, name) >= 1:
                raise InputError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.bound_reject_ratio is not None and not self.bound_reject_ratio >= self.max_update_norm_ratio:
            raise InputError(f"the bound-reject ratio {self.bound_reject_ratio} must be at least the norm ratio "
                             f"{self.max_update_norm_ratio}")
        if not self.update_norm_floor >= 0:
            raise InputError(f"update norm floor must be >= 0, got {self.update_norm_floor}")
        if self.update_norm_bound is not None and not self.update_norm_bound >= 1:
            raise InputError(f"the update norm bound must be at least 1 (times the round's median), got "
                             f"{self.update_norm_bound}")
        if self.screen_loss_ratio is not None and not self.screen_loss_ratio > 1:
            raise InputError(f"the screening loss ratio must be over 1 (times the round's median), got "
                             f"{self.screen_loss_ratio}")
        if isinstance(self.byzantine, bool) or not isinstance(self.byzantine, int) or self.byzantine < 0:
            raise InputError(f"the number of assumed attackers must be a whole number >= 0, got {self.byzantine!r}")
        if not 0 < self.max_round_accuracy_drop <= 100:
            raise InputError(f"the per-round accuracy guard must be in (0, 100] points, "
                             f"got {self.max_round_accuracy_drop}")

    def _check_training(self) -> None:
        """Rounds, learning rates, momenta, strategy parameters and sampling."""
        for name in ("rounds", "local_epochs"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        for name in ("learning_rate", "round_timeout"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name.replace('_', ' ')} must be > 0, got {getattr(self, name)}")
        if self.server_learning_rate is not None and not self.server_learning_rate > 0:
            raise InputError(f"the server learning rate must be > 0, got {self.server_learning_rate}")
        if not 0 <= self.server_momentum < 1:
            raise InputError(f"the server momentum must be in [0, 1), got {self.server_momentum}")
        cap = ClientLimits().max_momentum
        if not 0 <= self.client_momentum <= cap:
            raise InputError(f"the on-device momentum must be in [0, {cap:g}] (what devices accept by default), "
                             f"got {self.client_momentum}")
        if not self.adaptivity > 0:
            raise InputError(f"the adaptivity (tau) of the adaptive strategies must be > 0, got {self.adaptivity}")
        if not self.proximal_mu >= 0:
            raise InputError(f"the FedProx proximal mu must be >= 0, got {self.proximal_mu}")
        if not 0 <= self.trim_beta < 0.5:
            raise InputError(f"the trimmed-mean beta must be in [0, 0.5), got {self.trim_beta}")
        if not 0 < self.fraction <= 1 or not 0 < self.min_fraction <= 1:
            raise InputError(f"the sampled fraction ({self.fraction}) and the minimum valid fraction "
                             f"({self.min_fraction}) must be in (0, 1]")

    def _check_privacy(self) -> None:
        """Differential privacy's parameters and what it cannot be combined with."""
        if self.dp_noise_multiplier is None:
            return
        if not self.dp_noise_multiplier > 0 or not self.dp_clipping_norm > 0:
            raise InputError("the differential-privacy noise multiplier and clipping norm must be > 0")
        if not 0 < self.dp_delta < 1:
            raise InputError(f"the differential-privacy delta must be in (0, 1), got {self.dp_delta}")
        if self.compress_updates is not Codec.FLOAT32:
            raise InputError("differential privacy clips float weight updates; "
                             "it cannot be combined with update compression")
        if self.strategy not in (None, Strategy.FEDAVG, Strategy.FEDPROX):
            raise InputError(f"differential privacy's accounting (Flower's) needs plain averaging of the clipped "
                             f"updates: fedavg or fedprox, not {self.strategy.value}")


@dataclass(frozen=True)
class FederationConfig:
    """What every federated run has: the clients, how the data is split among them, the rounds,
    ``personalize_epochs``: after the rounds, every device fine-tunes the final model's head on its own data
    and keeps it (0: off), and ``head_only``: the devices train the head alone on the features of a frozen int8
    backbone (:class:`~edgekit.trainable.export.TrainableConfig`), for models whose other layers have no on-device
    gradient (recurrent layers, say) or to federate fewer weights."""

    LOCAL_PARTITIONS: ClassVar[bool] = True  # the run's clients train on partitions of the data given here
    clients: int = 10
    partition: Partition = field(default_factory=Partition)
    rounds: RoundSettings = field(default_factory=RoundSettings)
    batch_size: int = 8  # the on-device batch of the trainable artifact (8: more steps on a device's few samples)
    personalize_epochs: int = 0  # after the rounds, each device fine-tunes its own head this many epochs (0: off)
    head_only: bool = False  # the devices train (and the rounds federate) the model's head alone

    def __post_init__(self) -> None:
        if not isinstance(self.partition, Partition):
            object.__setattr__(self, "partition", Partition(self.partition))
        if not 0 <= self.personalize_epochs <= 10:
            raise InputError(f"personalisation epochs must be between 0 and 10, got {self.personalize_epochs}")
        if self.clients < 2:
            raise InputError(f"a federation needs at least 2 clients, got {self.clients}")
        if not 1 <= self.batch_size <= 4096:
            raise InputError(f"the on-device batch size must be between 1 and 4096, got {self.batch_size}")
        sampled = max(1, math.ceil(self.clients * self.rounds.fraction))
        sigma = self.rounds.dp_noise_multiplier
        if sigma is not None and self.rounds.dp_clipping is Clipping.ADAPTIVE and not sigma < sampled / 10:
            raise InputError(f"adaptive clipping also noises the count of clipped updates (deviation clients/20 per "
                             f"round, Flower's default); at noise multiplier {sigma:g} it needs more than "
                             f"{10 * sigma:g} clients per round, this run has {sampled} (use fixed clipping or more "
                             "clients)")
        if self.rounds.strategy is Strategy.TRIMMED and int(self.rounds.trim_beta * sampled) < 1:
            raise InputError(f"a trimmed mean with beta {self.rounds.trim_beta:g} over {sampled} clients per round "
                             "trims nothing; it needs beta x clients >= 1 (more clients or a larger beta)")


@dataclass(frozen=True)
class SimulationConfig(FederationConfig):
    """Options of :func:`edgekit.federated.simulate.simulate` (Flower's simulation engine on Ray).

    ``faults`` rehearses faulty clients (partition id -> :class:`~device_agents.protocol.Fault`);
    ``audit_dir`` keeps a copy of every reply a client sends; ``secure_aggregation`` runs SecAgg+;
    ``local_dp_epsilon`` makes every device add its own noise (local DP: the server is not trusted).
    """

    resume: bool = False
    faults: dict[int, Fault] = field(default_factory=dict)
    audit_dir: str | None = None
    secure_aggregation: bool = False  # SecAgg+ (Flower's legacy fit workflow); see edgekit.federated.secagg
    local_dp_epsilon: float | None = None  # each device adds its own noise (Flower's LocalDpMod), clip dp_clipping_norm

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.local_dp_epsilon is not None and not self.local_dp_epsilon > 0:
            raise InputError(f"the local differential-privacy epsilon must be > 0, got {self.local_dp_epsilon}")
        object.__setattr__(self, "faults", {int(k): coerce_enum(Fault, v, "fault") for k, v in self.faults.items()})
        if self.secure_aggregation:
            clash = [name for name, on in (("update compression", self.rounds.compress_updates is not Codec.FLOAT32),
                                            ("differential privacy", self.rounds.dp_noise_multiplier is not None),
                                            ("local differential privacy", self.local_dp_epsilon is not None),
                                            ("resuming", self.resume),
                                            ("personalisation", self.personalize_epochs > 0),
                                            (f"the {self.rounds.aggregation.value} strategy",
                                             self.rounds.strategy not in (None, Strategy.FEDAVG))) if on]
            if clash:
                raise InputError(f"secure aggregation runs FedAvg on masked updates; "
                                 f"it cannot be combined with {clash[0]}")
            if self.clients < 3:
                raise InputError("secure aggregation needs at least 3 clients (secret sharing)")


@dataclass(frozen=True)
class DeployConfig(FederationConfig):
    """Options of :func:`edgekit.federated.deploy.up`: real SuperLink/SuperNode processes on 127.0.0.1.

    ``insecure`` drops TLS (and node authentication); ``node_auth`` registers one key pair per
    SuperNode with the SuperLink; ``timeout`` bounds the whole run in seconds.
    """

    clients: int = 2
    insecure: bool = False
    node_auth: bool = True
    timeout: float = 900.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.timeout > 0:
            raise InputError(f"the run timeout must be > 0 seconds, got {self.timeout}")
