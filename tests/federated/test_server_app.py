"""The round loop's defences: poisoned, malformed, collapsing and oversized updates; hostile personalisation replies."""

import numpy as np
import pytest
from conftest import quiet, train_reply

from edgekit.errors import InputError
from edgekit.federated.config import (
    RoundSettings,
    SimulationConfig,
    Strategy,
)
from edgekit.federated.simulate import simulate

pytestmark = pytest.mark.xdist_group("federated-3")






def test_poisoned_and_malformed_updates_are_rejected_and_never_stop_the_run(fl_model, tmp_path):
    """Six hostile clients of ten, one of each kind; four honest ones still improve the model."""
    faults = {0: "scale", 1: "liar", 2: "float64", 3: "nan-examples", 4: "list-examples", 5: "extra-metric",
              6: "codec-scale"}
    result = simulate(fl_model, "digits", tmp_path / "poison", progress=False, log=quiet, config=SimulationConfig(
        clients=10, faults=faults, rounds=RoundSettings(rounds=2, compress_updates=True, min_fraction=0.3)))
    for h in result.history[1:]:
        reasons = {r["node"]: r["reason"] for r in h["rejected"]}
        text = " | ".join(reasons.values())
        assert len(reasons) == 7 and h["valid"] == 3 and h["aggregated"], text
        for fragment in ("is float64, expected float32", "metric num-examples is nan", "metric num-examples is [5]",
                         "metrics ['label-0-count',", "invalid codec scales", "over 5x the round's median"):
            assert fragment in text, (fragment, text)
        assert text.count("over 5x the round's median") == 2  # the x1e30 update and the "always 0" liar
        assert text.count("the model's norm") == 2
    assert all(np.isfinite(v).all() for v in result.weights.values())
    assert result.history[-1]["loss"] < result.history[0]["loss"]  # the honest clients still improve the model


def test_an_aggregate_that_collapses_accuracy_is_not_committed(fl_model, tmp_path):
    """Two liars of three pass the median filter together; the last-good-model guard keeps the model."""
    result = simulate(fl_model, "digits", tmp_path / "guard", progress=False, log=quiet, config=SimulationConfig(
        clients=3, faults={0: "liar", 1: "liar"}, rounds=RoundSettings(rounds=1)))
    entry = result.history[1]
    assert entry["aggregated"] is False and "points below the last good model" in entry["guard"]
    assert entry["accuracy"] == pytest.approx(result.history[0]["accuracy"])
    with pytest.raises(InputError, match="trims nothing; it needs beta x clients >= 1"):
        SimulationConfig(clients=3, rounds=RoundSettings(strategy=Strategy.TRIMMED))


def test_hostile_personalisation_replies_are_not_counted():
    from edgekit.federated.server_app import personal_row

    good = {"num-examples": 20, "accuracy-before": 60.0, "accuracy-after": 75.0, "kept": 1}
    assert personal_row(good) == [20.0, 60.0, 75.0, 1.0]
    for bad in ({**good, "accuracy-after": float("nan")}, {**good, "accuracy-after": 1e9}, {**good, "kept": 7},
                {**good, "num-examples": True}, {**good, "label-0-count": 3}, {"num-examples": 20}, None):
        assert personal_row(bad) is None, bad


def test_an_oversized_update_is_rejected_or_its_norm_bounded_to_the_limit():
    from edgekit.federated.config import RoundSettings
    from edgekit.federated.server_app import robust_filter

    base = {"w": np.zeros(3, np.float32)}
    updates = [(train_reply(v, 10, node), {"w": np.array([v, v, -v], np.float32)}, 10)
               for node, v in enumerate([1.0, 1.1, 0.9, 100.0])]
    norms = [np.linalg.norm(w["w"]) for _, w, _ in updates]
    kept, rejected = robust_filter(updates, base, RoundSettings())
    assert len(kept) == 3 and [r["node"] for r in rejected] == [3] and "over 5x the round's median" in \
        rejected[0]["reason"]
    kept, outliers = robust_filter(updates, base, RoundSettings(oversized_updates="bound"))
    assert len(kept) == 4 and [(r["node"], r["bounded"]) for r in outliers] == [(3, True)]
    bounded = kept[3][1]["w"]
    assert np.linalg.norm(bounded) == pytest.approx(5 * np.median(norms), rel=1e-5)  # scaled to the limit
    assert np.allclose(bounded / np.linalg.norm(bounded), np.array([1, 1, -1]) / np.sqrt(3))  # same direction
    assert all(np.array_equal(k[1]["w"], u[1]["w"]) for k, u in zip(kept[:3], updates[:3]))  # others untouched
    # bounding, but an update over 10x the median (this one is ~95x) is still rejected
    kept, outliers = robust_filter(updates, base, RoundSettings(oversized_updates="bound", bound_reject_ratio=10))
    assert len(kept) == 3 and [(r["node"], r.get("bounded", False)) for r in outliers] == [(3, False)]
    with pytest.raises(InputError, match="bound-reject ratio 2 must be at least the norm ratio 5"):
        RoundSettings(oversized_updates="bound", bound_reject_ratio=2)
