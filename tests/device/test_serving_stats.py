"""Serving telemetry on the device (issue 27, part 1): what an application serves through the agent is counted,
timed and summarised per version, aggregates only, into a bounded crash-safe spool in the store."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from device_agents import ModelStore, StatsError
from device_agents.serving.spool import Spool
from device_agents.serving.stats import LATENCY_BUCKETS, MAX_FEATURES, ServingStats, features_of
from device_agents.store.serving import ServedModel


def _window(version="v1", calls=1, classes=3, features=2, edges=None):
    stats = ServingStats(version, num_classes=classes, features=features, edges=edges, start=10.0, end=20.0)
    for _ in range(calls):
        stats.record(np.array([[0.5, 1.0], [2.0, -1.0]]), np.eye(classes)[[0, 2]], seconds=0.003)
    return stats


def test_a_window_counts_calls_samples_latency_buckets_classes_and_feature_summaries():
    stats = _window(calls=3, edges=[[0.0, 1.0], [0.0]])
    stats.record_error(seconds=20.0)
    assert (stats.calls, stats.samples, stats.errors) == (4, 6, 1)
    assert stats.latency_counts[LATENCY_BUCKETS.index(0.005)] == 3 and stats.latency_counts[-1] == 1
    assert stats.latency_sum == pytest.approx(20.009)
    assert stats.class_counts == [3, 0, 3] and stats.feature_count == 6
    assert stats.feature_sum == [7.5, 0.0] and stats.feature_sumsq == [12.75, 6.0]
    assert stats.bin_counts == [[0, 3, 3], [3, 3]]  # 0.5 in (0, 1], 2.0 above 1; -1 below 0, 1 above
    assert ServingStats.from_dict(json.loads(json.dumps(stats.to_dict()))).to_dict() == stats.to_dict()


def test_a_window_holds_aggregates_only_its_size_does_not_grow_with_what_was_served():
    few, many = ServingStats("v", 10, 3), ServingStats("v", 10, 3)
    rng = np.random.default_rng(0)
    few.record(rng.random((2, 8, 8, 3)), rng.random((2, 10)), seconds=0.001)
    many.record(rng.random((5000, 8, 8, 3)), rng.random((5000, 10)), seconds=0.001)
    sizes = [len(json.dumps(s.to_dict())) for s in (few, many)]
    assert sizes[1] - sizes[0] < 200, sizes  # the digits of bigger counts and sums, not samples


def test_features_are_columns_channels_or_bounded_groups():
    assert features_of(np.arange(6.0).reshape(2, 3)).tolist() == [[0, 1, 2], [3, 4, 5]]
    image = np.zeros((2, 4, 4, 3))
    image[..., 1] = 1.0
    assert features_of(image).tolist() == [[0, 1, 0], [0, 1, 0]]
    assert features_of(np.ones((2, 5000))).shape == (2, MAX_FEATURES)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(calls=d["calls"] + 1000), "calls"),                      # more calls than latencies
    (lambda d: d.update(samples=10**6), "samples"),                              # more samples than classes
    (lambda d: d.update(samples=-1), "samples"),
    (lambda d: d.update(latency_sum=float("nan")), "latency_sum"),
    (lambda d: d["class_counts"].append(1), "class_counts"),
    (lambda d: d.update(extra=1), "keys"),
    (lambda d: d.pop("errors"), "keys"),
    (lambda d: d.update(version=""), "version"),
    (lambda d: d.update(latency_buckets=[1.0]), "latency buckets"),
    (lambda d: d.update(errors=True), "errors"),
    (lambda d: d.update(end=0.0), "ends before it starts"),
    (lambda d: d.update(features=10**6), "features"),
])
def test_a_window_that_lies_is_refused(change, message):
    data = _window(calls=2).to_dict()
    change(data)
    with pytest.raises(StatsError, match=message):
        ServingStats.from_dict(data)


def test_the_spool_stays_within_its_size_under_a_flood_and_keeps_the_newest(tmp_path):
    spool = Spool(tmp_path / "telemetry", max_bytes=8_000)
    size = len(json.dumps(_window().to_dict(), separators=(",", ":"))) + 1
    for i in range(500):
        spool.append(_window(version=f"v{i}"))
        assert spool.bytes() <= 8_000
    windows = spool.windows()
    assert len(windows) == 8_000 // size and windows[-1].version == "v499"
    assert [w.version for w in windows] == [f"v{i}" for i in range(500 - len(windows), 500)]
    assert spool.append(ServingStats("v", 3, 2)) is None  # nothing served: nothing written
    with pytest.raises(ValueError, match="does not fit a spool of 100 bytes"):
        Spool(tmp_path / "small", max_bytes=100).append(_window())


def test_the_spool_skips_what_is_not_a_window_and_clears_a_crashed_write(tmp_path):
    spool = Spool(tmp_path / "t")
    spool.append(_window(version="good"))
    (tmp_path / "t" / "000000000002.json").write_text('{"version": "forged", "calls": 10}')
    (tmp_path / "t" / "000000000003.json").write_bytes(b"\xff\x00 not json")
    (tmp_path / "t" / ".000000000004.json.abc.partial").write_text("half a window")
    (tmp_path / "t" / "notes.json").write_text("{}")  # not the spool's
    problems = []
    assert [w.version for w in spool.windows(problems=problems)] == ["good"]
    assert [p.split(":")[0] for p in problems] == ["000000000002.json", "000000000003.json"]
    spool.append(_window(version="next"))
    assert not list((tmp_path / "t").glob(".*.partial")) and spool.last_sequence() == 4
    spool.drain(through=3)
    assert [w.version for w in spool.windows()] == ["next"]


def test_a_writer_killed_mid_flood_leaves_whole_windows(tmp_path):
    """SIGKILL while appending: every file that remains is a whole window (atomic writes)."""
    code = ("import sys, numpy as np\n"
            "from device_agents.serving.spool import Spool\n"
            "from device_agents.serving.stats import ServingStats\n"
            "spool = Spool(sys.argv[1], max_bytes=200_000)\n"
            "print('ready', flush=True)\n"
            "while True:\n"
            "    s = ServingStats('v', 3, 2, start=1.0, end=2.0)\n"
            "    s.record(np.ones((2, 2)), np.eye(3)[[0, 1]], seconds=0.001)\n"
            "    spool.append(s)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "t")], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    import time

    deadline = time.time() + 30
    while len(Spool(tmp_path / "t").files()) < 50 and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    problems = []
    windows = Spool(tmp_path / "t", max_bytes=200_000).windows(problems=problems)
    assert len(windows) >= 50 and problems == []


def test_an_app_serving_through_the_store_records_per_version_into_the_spool(int8_out, digits, tmp_path):
    store = ModelStore(tmp_path / "store")
    store.install(int8_out)
    with ServedModel.open(store, flush_calls=5) as served:
        for i in range(12):
            served.predict(digits.x[i * 4:(i + 1) * 4])
        served.predict(digits.x[100])  # one sample without the batch axis
        with pytest.raises(Exception, match="shape"):
            served.predict(np.zeros((2, 3, 3, 1), np.float32))
    windows = Spool(tmp_path / "store" / "telemetry").windows()
    assert [w.calls for w in windows] == [5, 5, 4] and sum(w.errors for w in windows) == 1
    assert sum(w.samples for w in windows) == 49 and {w.version for w in windows} == {store.current.name}
    assert all(w.num_classes == 10 and w.features == 1 and w.feature_count == w.samples for w in windows)
    mean = sum(sum(w.feature_sum) for w in windows) / sum(w.feature_count for w in windows)
    assert mean == pytest.approx(float(np.concatenate([digits.x[:48], digits.x[100:101]]).mean()), rel=1e-6)
    predicted = sum(np.array(w.class_counts) for w in windows)
    assert predicted.sum() == 49 and (predicted > 0).sum() >= 5  # the model predicts several digits


def test_served_inputs_are_binned_against_the_releases_reference_and_drift_shows_in_the_stability_index(
        int8_out, digits, tmp_path):
    """compress stores the calibration data's reference statistics in the manifest; a device counts what it serves
    in the same bins. The calibration distribution scores a small index, inverted images a large one."""
    from device_agents.serving.integrity import read_manifest
    from device_agents.serving.stats import stability_index

    reference = read_manifest(int8_out)["reference"]
    assert reference["samples"] > 100 and len(reference["feature_edges"]) == 1  # one channel
    assert sum(reference["class_frequencies"]) == pytest.approx(1.0, abs=1e-4)
    indexes = {}
    for name, x in (("same", digits.x[:600]), ("inverted", 1.0 - digits.x[:600])):
        store = ModelStore(tmp_path / name)
        store.install(int8_out)
        with ServedModel.open(store) as served:
            for i in range(0, 600, 50):
                served.predict(x[i:i + 50])
        (window,) = Spool(tmp_path / name / "telemetry").windows()
        assert window.edges == reference["feature_edges"] and sum(window.bin_counts[0]) == 600
        indexes[name] = stability_index(reference["feature_bin_frequencies"][0], window.bin_counts[0])
    assert indexes["same"] < 0.1 < 0.25 < indexes["inverted"], indexes


def test_a_served_model_follows_the_stores_current_version_and_counts_non_finite_scores_as_errors(int8_out, digits,
                                                                                                 tmp_path):
    """An app keeps its ServedModel open across a rollout: once the store serves the new version, calls are served
    by it and recorded under its id; the new version answers NaN on inputs with a negative pixel, and each such
    call is an error (the scores are still returned)."""
    import time

    from conftest import nan_on_negative_release

    from device_agents.store import serving

    store = ModelStore(tmp_path / "store")
    first = store.install(int8_out).name
    traffic = digits.x[:4].copy()
    traffic[:, 0, 0, 0] = -1.0  # a negative corner pixel: the int8 CNN answers, the new version answers NaN
    with ServedModel.open(store, flush_calls=1000) as served:
        assert np.isfinite(served.predict(traffic)).all() and served.version == first
        second = store.install(nan_on_negative_release(tmp_path / "nan")).name
        time.sleep(serving.FOLLOW_SECONDS + 0.1)
        scores = served.predict(traffic)
        assert served.version == second and np.isnan(scores).all()
        served.predict(digits.x[:4])  # digits: finite, not an error
        store.rollback()
        time.sleep(serving.FOLLOW_SECONDS + 0.1)
        served.predict(traffic)
        assert served.version == first
    windows = [(w.version, w.calls, w.errors) for w in Spool(tmp_path / "store" / "telemetry").windows()]
    assert windows == [(first, 1, 0), (second, 2, 1), (first, 1, 0)], (windows, first, second)
