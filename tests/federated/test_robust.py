"""Byzantine-robust aggregation (edgekit.federated.robust): the norm bound, screening on the evaluation data and
leave-one-out after a refused round, alone and in real Flower simulations with a device that attacks."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from edgekit.federated import robust

SECOND = pytest.mark.xdist_group("federated-2")


def _update(node: int, value: float, examples: int = 10):
    reply = SimpleNamespace(metadata=SimpleNamespace(src_node_id=node))
    return reply, {"w": np.full(4, value, np.float32)}, examples


BASE = {"w": np.zeros(4, np.float32)}


def test_every_update_is_bounded_to_the_rounds_median_norm():
    updates = [_update(1, 1.0), _update(2, 2.0), _update(3, 3.0), _update(4, -45.0)]
    kept, bounded = robust.bound_norms(updates, BASE, 1.0)
    norms = [robust.distance(w, BASE) for _, w, _ in kept]
    median = float(np.median([2.0, 4.0, 6.0, 90.0]))  # the distances before: 2 |value|
    assert norms == pytest.approx([2.0, 4.0, median, median])
    assert [b["node"] for b in bounded] == [3, 4] and bounded[1]["scale"] == pytest.approx(median / 90.0)
    assert float(kept[3][1]["w"][0]) < 0  # direction kept
    assert robust.bound_norms(updates[:2], BASE, 1.0) == (updates[:2], [])  # fewer than 3: nothing to compare


def test_screening_drops_the_updates_far_above_the_median_loss_and_never_the_majority():
    updates = [_update(i, float(i)) for i in range(1, 6)]
    losses = {1.0: 0.30, 2.0: 0.32, 3.0: 0.29, 4.0: 0.9, 5.0: float("nan")}
    kept, dropped = robust.screen(updates, lambda w: losses[float(w["w"][0])], 1.5)
    assert [d["node"] for d in dropped] == [5, 4] and len(kept) == 3
    assert "over the round's limit 0.465 (median 0.31)" in dropped[1]["reason"]
    # near convergence: small losses, a harmful step still shows (1.5x the median)
    converged = {1.0: 0.026, 2.0: 0.027, 3.0: 0.025, 4.0: 0.028, 5.0: 0.09}
    assert [d["node"] for d in robust.screen(updates, lambda w: converged[float(w["w"][0])], 1.5)[1]] == [5]
    # a round whose honest losses spread widely (very skewed devices) widens the margin past the ratio
    wide = {1.0: 0.4, 2.0: 1.1, 3.0: 0.7, 4.0: 1.3, 5.0: 0.6}
    assert robust.screen(updates, lambda w: wide[float(w["w"][0])], 1.5)[1] == []
    # three of five unusable: at most (n - 1) // 2 = 2 are dropped
    nan = {1.0: 0.3, 2.0: 0.3, 3.0: float("nan"), 4.0: float("nan"), 5.0: float("nan")}
    kept, dropped = robust.screen(updates, lambda w: nan[float(w["w"][0])], 1.5)
    assert len(dropped) == 2 and {d["node"] for d in dropped} <= {3, 4, 5} and len(kept) == 3


def test_leave_one_out_finds_the_update_that_breaks_the_aggregate():
    updates = [_update(1, 1.0), _update(2, 1.2), _update(3, 0.9), _update(4, -50.0)]

    def aggregate(chosen):
        mean = float(np.mean([w["w"][0] for _, w, _ in chosen]))
        return mean, 95.0 if mean > 0 else 10.0

    kept, dropped, result = robust.recover(updates, aggregate, good=90.0, max_drop=20.0)
    assert [d["node"] for d in dropped] == [4] and result == pytest.approx(31 / 30)
    assert len(kept) == 3
    # nothing helps: at most (n - 1) // 2 dropped, and no result
    kept, dropped, result = robust.recover(updates, lambda chosen: (0.0, 10.0), good=90.0, max_drop=20.0)
    assert result is None and len(dropped) == 1


@pytest.mark.slow  # in make test: the defences above, and a sign-flipping device in a real fleet (test_fleet.py)
@SECOND
@pytest.mark.parametrize("attack", ["sign-flip", "label-flip"])
def test_one_attacking_device_of_four_neither_halts_nor_wrecks_training(fl_model, tmp_path, attack):
    """The issue's attacks on real Flower simulations (the device's own ClientApp attacks): 3 rounds from a weak
    start, 1 of 4 devices. With edgekit's defences (on by default; here on FedAvg, see BENCHMARKS.md "Robust
    aggregation" for FedAvgM) the run gains at least 80% of what the same run without the attack gains, every
    round is committed, and the attacker, and only it, is named in history.json and in the log."""
    from edgekit.federated.config import Partition, RoundSettings, SimulationConfig
    from edgekit.federated.simulate import simulate

    def run(name, faults, log):
        config = SimulationConfig(clients=4, partition=Partition("dirichlet"), faults=faults,
                                  rounds=RoundSettings(rounds=3, strategy="fedavg"))
        return simulate(fl_model, "digits", tmp_path / name, config=config, progress=False, log=log)

    clean = run("clean", {}, lambda _: None)
    lines = []
    attacked = run(attack, {0: attack}, lines.append)
    gain, kept = clean.history[-1]["accuracy"] - clean.history[0]["accuracy"], \
        attacked.history[-1]["accuracy"] - attacked.history[0]["accuracy"]
    assert gain > 10 and kept >= 0.8 * gain, (gain, kept)
    rounds = json.loads((tmp_path / attack / "history.json").read_text())["rounds"][1:]
    assert all(r["aggregated"] for r in rounds)
    named = {d["node"] for r in rounds for d in r["dropped"]}
    assert len(named) == 1, rounds
    assert any(f"dropped the update of node {next(iter(named))}" in line for line in lines)
