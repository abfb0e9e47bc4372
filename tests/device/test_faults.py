"""Rehearsed faults (tests and drills): each sends what its documentation says; the audit copy holds exactly what
left the device."""

import json

import numpy as np
import pytest

from device_agents.federated.faults import audit, rehearse
from device_agents.protocol import Fault, Metric

BASE = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
NEW = {"w": np.full((2, 3), 0.5, np.float32), "b": np.array([0.1, 0.2, 0.3], np.float32)}
METRICS = {Metric.NUM_EXAMPLES: 40, Metric.TRAIN_LOSS: 0.5}


def _same(new, metrics):
    return all(np.array_equal(new[k], NEW[k]) for k in NEW) and metrics == METRICS


EXPECTED = {  # fault -> a check of (weights, metrics) as sent
    Fault.NAN: lambda new, m: all(np.isnan(v).all() for v in new.values()),
    Fault.SHAPE: lambda new, m: new["w"].shape == (2, 1) and new["b"].shape == (1,),
    Fault.SCALE: lambda new, m: np.isfinite(new["w"]).all() and np.allclose(new["w"], 0.5e30),
    Fault.LIAR: lambda new, m: new["b"][0] == 100 and (new["b"][1:] == 0).all() and m[Metric.NUM_EXAMPLES] == 10**12,
    Fault.FLOAT64: lambda new, m: all(v.dtype == np.float64 and (v == 1e300).all() for v in new.values()),
    Fault.NAN_EXAMPLES: lambda new, m: np.isnan(m[Metric.NUM_EXAMPLES]),
    Fault.LIST_EXAMPLES: lambda new, m: m[Metric.NUM_EXAMPLES] == [5],
    Fault.EXTRA_METRIC: lambda new, m: set(m) == {*METRICS, "label-0-count"},
    Fault.SIGN_FLIP: lambda new, m: np.allclose(new["w"], -2.25) and m[Metric.NUM_EXAMPLES] == 4000,
    Fault.CODEC_SCALE: _same,  # its scale is made hostile when the update is encoded
    Fault.LABEL_FLIP: _same,   # it trains honestly on flipped labels: the update itself is untouched here
}


def test_every_fault_has_a_documented_effect():
    assert set(EXPECTED) | {Fault.CRASH} == set(Fault)


@pytest.mark.parametrize("fault", sorted(EXPECTED, key=lambda f: f.value), ids=lambda f: f.value)
def test_each_fault_sends_what_it_says(fault):
    new, metrics = rehearse(fault, 3, dict(NEW), dict(METRICS), output_bias="b", base=BASE)
    assert EXPECTED[fault](new, metrics), (fault, new, metrics)


def test_a_crash_raises_in_the_round():
    with pytest.raises(RuntimeError, match="client 3: simulated crash"):
        rehearse(Fault.CRASH, 3, dict(NEW), dict(METRICS), output_bias="b", base=BASE)


def test_the_audit_copy_holds_every_array_and_record_of_a_reply_and_nothing_else(tmp_path):
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in NEW.items()}),
                          "codec": ConfigRecord({"w": 0.01, "b": 0.02}),
                          "metrics": MetricRecord(METRICS)})
    audit(str(tmp_path / "audit"), 3, "train-r2", content)
    arrays, = (tmp_path / "audit").glob("client3-train-r2-*.npz")
    records, = (tmp_path / "audit").glob("client3-train-r2-*.json")
    with np.load(arrays) as saved:
        assert sorted(saved.files) == ["arrays__b", "arrays__w"] and np.array_equal(saved["arrays__w"], NEW["w"])
    assert json.loads(records.read_text()) == {"metrics": METRICS, "codec": {"w": 0.01, "b": 0.02}}
    audit(None, 3, "train-r3", content)  # no audit folder: nothing written anywhere
    assert len(list((tmp_path / "audit").iterdir())) == 2
