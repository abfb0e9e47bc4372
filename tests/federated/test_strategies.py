"""Every registered strategy aggregates as documented; server optimizers survive refused rounds and resumes."""

import numpy as np
import pytest
from conftest import train_reply

from edgekit.errors import InputError
from edgekit.federated.config import (
    LR_FLOOR,
    LrSchedule,
    Partition,
    PartitionScheme,
    RoundSettings,
    SimulationConfig,
    Strategy,
)
from edgekit.federated.strategies import STRATEGIES, make_strategy


class _FiveNodes:
    """The one Grid method the strategies' configure_train calls (sampling); messages are never sent."""

    def get_node_ids(self):
        return [1, 2, 3, 4, 5]


@pytest.fixture
def run_identity(monkeypatch):
    """Flower's messages carry the run, node and task ids the ServerApp process sets; here run 1, node 0, task 1."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


_REPLIES = [(1, 10), (2, 10), (3, 20), (4, 10), (100, 10)]  # (value, examples); FedAvg's mean is 1130 / 60


def _two_rounds(built):
    """Two rounds from w = 0 with the same five replies; the weights after each."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    weights, after = np.zeros(3, np.float32), []
    for rnd in (1, 2):
        list(built.configure_train(rnd, ArrayRecord({"w": Array(weights)}), ConfigRecord({}), _FiveNodes()))
        replies = [train_reply(v, n, i + 1) for i, (v, n) in enumerate(_REPLIES)]
        arrays, _ = built.aggregate_train(rnd, replies)
        weights = arrays["w"].numpy()
        after.append(float(weights[0]))
    return after


def _adam_like(yogi):
    """Two rounds of Reddi et al.'s FedAdam / FedYogi (eta 0.01, beta1 0.9, beta2 0.99, tau 1e-3) by hand."""
    w, m, v, out = 0.0, 0.0, 0.0, []
    for rnd in (1, 2):
        delta = 1130 / 60 - w
        m = 0.9 * m + 0.1 * delta
        v = v - 0.01 * delta ** 2 * np.sign(v - delta ** 2) if yogi else 0.99 * v + 0.01 * delta ** 2
        eta = 0.01 if yogi else 0.01 * np.sqrt(1 - 0.99 ** (rnd + 1)) / (1 - 0.9 ** (rnd + 1))
        w = w + eta * m / (np.sqrt(v) + 1e-3)
        out.append(w)
    return out


def _adagrad():
    w, v, out = 0.0, 0.0, []
    for _ in (1, 2):
        delta = 1130 / 60 - w
        v += delta ** 2
        w += 0.01 * delta / (np.sqrt(v) + 1e-3)
        out.append(w)
    return out


MEAN = 1130 / 60


def _fedavgm(lr=STRATEGIES[Strategy.FEDAVGM].server_learning_rate, momentum=0.9):
    """Two rounds of FedAvgM (Hsu et al.: heavy-ball momentum on the pseudo-gradient) by hand."""
    w, velocity, out = 0.0, 0.0, []
    for rnd in (1, 2):
        step = w - MEAN
        velocity = step if rnd == 1 else momentum * velocity + step
        w -= lr * velocity
        out.append(w)
    return out


@pytest.mark.parametrize("strategy, expected", [
    (Strategy.FEDAVG, [MEAN, MEAN]),     # weighted by examples: the outlier pulls the mean up
    (Strategy.FEDPROX, [MEAN, MEAN]),    # same aggregation; the proximal term acts on the devices
    (Strategy.TRIMMED, [3.0, 3.0]),      # beta 0.2 trims one reply at each end: mean of 2, 3, 4
    (Strategy.MEDIAN, [3.0, 3.0]),       # the coordinate-wise median of 1, 2, 3, 4, 100
    (Strategy.MULTIKRUM, [2.0, 2.0]),    # one attacker assumed, min 2 nodes: selects 2 - 1 = 1 reply, the one whose
                                         # 2 nearest others are closest (2: 1 and 3; ties with 3, the first wins)
    (Strategy.FEDAVGM, _fedavgm()),  # momentum 0.9 carries round 1's step into round 2
    (Strategy.FEDADAM, _adam_like(yogi=False)),
    (Strategy.FEDYOGI, _adam_like(yogi=True)),
    (Strategy.FEDADAGRAD, _adagrad()),
])
def test_every_registered_strategy_aggregates_as_documented(strategy, expected, run_identity):
    assert set(STRATEGIES) == set(Strategy)
    built = make_strategy(RoundSettings(strategy=strategy, proximal_mu=0.1, trim_beta=0.2), min_nodes=2)
    assert _two_rounds(built) == pytest.approx(expected, rel=1e-5)
    if strategy is Strategy.FEDPROX:
        assert built.proximal_mu == 0.1


def test_a_refused_round_leaves_the_server_optimizer_as_it_was(run_identity):
    """The last-good-model guard refuses an aggregate: FedAdam's moments and model copy are put back."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from edgekit.federated.strategies import OptimizerSnapshot

    built = make_strategy(RoundSettings(strategy=Strategy.FEDAVGM), min_nodes=2)
    list(built.configure_train(1, ArrayRecord({"w": Array(np.zeros(3, np.float32))}), ConfigRecord({}), _FiveNodes()))
    snapshot = OptimizerSnapshot(built)
    built.aggregate_train(1, [train_reply(v, n, i + 1) for i, (v, n) in enumerate(_REPLIES)])
    assert built.momentum_vector is not None
    snapshot.restore()
    assert built.momentum_vector is None and np.all(built.current_arrays["w"].numpy() == 0)


@pytest.mark.parametrize("strategy", [Strategy.FEDAVGM, Strategy.FEDADAM, Strategy.FEDYOGI, Strategy.FEDADAGRAD])
def test_a_resumed_run_continues_the_server_optimizer_from_its_checkpoint(strategy, run_identity, tmp_path):
    """The momentum and moments of a server optimizer are checkpointed with the weights: round 2 after a resume
    gives the weights round 2 gives in one run (a fresh optimizer's first step is another one)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from edgekit.federated.server_app import ServerState, load_checkpoint, save_checkpoint
    from edgekit.federated.strategies import optimizer_state, restore_optimizer_state

    def one_round(built, rnd, weights):
        list(built.configure_train(rnd, ArrayRecord({"w": Array(weights)}), ConfigRecord({}), _FiveNodes()))
        arrays, _ = built.aggregate_train(rnd, [train_reply(v, n, i + 1) for i, (v, n) in enumerate(_REPLIES)])
        return arrays["w"].numpy()

    settings = RoundSettings(strategy=strategy)
    one_run = _two_rounds(make_strategy(settings, min_nodes=2))
    first = make_strategy(settings, min_nodes=2)
    weights = one_round(first, 1, np.zeros(3, np.float32))
    arrays, layout = optimizer_state(first)
    assert layout and all(name.startswith("server-optimizer:") for name in arrays)
    save_checkpoint(tmp_path, {"w": weights}, ServerState(round=1, optimizer=layout), arrays)
    restored_weights, state, saved = load_checkpoint(tmp_path)
    assert list(restored_weights) == ["w"] and state.optimizer == layout and saved.keys() == arrays.keys()
    resumed = make_strategy(settings, min_nodes=2)
    assert restore_optimizer_state(resumed, saved, state.optimizer) == [k for k in layout if k != "strategy"]
    other = Strategy.FEDADAGRAD if strategy is not Strategy.FEDADAGRAD else Strategy.FEDAVGM
    assert restore_optimizer_state(make_strategy(RoundSettings(strategy=other), min_nodes=2), saved,
                                   state.optimizer) == []  # resumed with another strategy: afresh
    assert one_round(resumed, 2, restored_weights["w"])[0] == pytest.approx(one_run[1], rel=1e-6)
    fresh = one_round(make_strategy(settings, min_nodes=2), 2, restored_weights["w"])[0]
    assert fresh != pytest.approx(one_run[1], rel=1e-3)  # what a resume did before: the optimizer started over


def test_the_cosine_schedule_decays_the_device_learning_rate_to_its_floor_at_the_last_round():
    cosine = RoundSettings(rounds=5, learning_rate=0.2, lr_schedule=LrSchedule.COSINE)
    rates = [cosine.learning_rate_at(r) for r in range(1, 7)]
    assert rates[0] == pytest.approx(0.2) and rates[4] == pytest.approx(0.2 * LR_FLOOR) and rates[5] == rates[4]
    assert rates[2] == pytest.approx(0.2 * (LR_FLOOR + (1 - LR_FLOOR) / 2))  # half way: half way down
    assert all(a > b for a, b in zip(rates[:4], rates[1:5]))
    assert [RoundSettings(rounds=5, learning_rate=0.2).learning_rate_at(r) for r in (1, 5)] == [0.2, 0.2]
    with pytest.raises(InputError, match="unknown learning-rate schedule 'step'; valid values: constant, cosine"):
        RoundSettings(lr_schedule="step")


def test_strategy_and_partition_validation():
    with pytest.raises(InputError, match="unknown strategy 'krum2'; valid values: fedadagrad, fedadam, fedavg, "
                                         "fedavgm, fedprox, fedyogi, median, multikrum, trimmed"):
        RoundSettings(strategy="krum2")
    with pytest.raises(InputError, match="server momentum must be in"):
        RoundSettings(server_momentum=1.0)
    with pytest.raises(InputError, match=r"on-device momentum must be in \[0, 0.9\] \(what devices accept"):
        RoundSettings(client_momentum=0.95)
    with pytest.raises(InputError, match="Dirichlet alpha of a partition must be > 0"):
        SimulationConfig(partition=Partition(PartitionScheme.DIRICHLET, -1))
    with pytest.raises(InputError, match="unknown partition scheme 'zipf'"):
        Partition("zipf")
