"""The fleet's telemetry store (issue 27, part 2, server side): windows kept in SQLite once per (node, sequence),
implausible ones refused, versions summed, latency quantiles and drift read from what was stored."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from device_agents.serving.spool import Spool
from device_agents.serving.stats import LATENCY_BUCKETS, ServingStats, reference_of
from edgekit.fleet.telemetry import (
    DRIFT_MIN_SAMPLES,
    DRIFT_THRESHOLD,
    MAX_BATCH,
    MAX_CONCURRENCY,
    SCHEMA_VERSION,
    TelemetryStore,
    drift,
    plausible,
    quantile,
)

NOW = 1_000_000.0


def _window(version="v1", calls=4, seconds=0.004, start=NOW - 60, end=NOW - 1, x=None, edges=None):
    stats = ServingStats(version, num_classes=3, features=1, edges=edges, start=start, end=end)
    for _ in range(calls):
        stats.record(np.zeros((2, 1)) if x is None else x, np.eye(3)[[0, 2]], seconds=seconds)
    return stats


def test_windows_are_stored_once_and_summed_per_version(tmp_path):
    store = TelemetryStore(tmp_path / "fleet" / "telemetry.sqlite")
    assert store.add(1, 1, _window(), now=NOW) == "" and store.add(1, 1, _window(), now=NOW) == "already stored"
    assert store.add(1, 2, _window(calls=2), now=NOW) == "" and store.add(2, 1, _window(), now=NOW) == ""
    assert store.add(2, 2, _window("v2", seconds=0.2), now=NOW) == ""
    big = 2**64 - 5  # Flower's node ids are unsigned 64-bit: past SQLite's INTEGER (the fleet test met one)
    assert store.add(big, 1, _window("v2"), now=NOW) == "" and store.last_stored(big) == ("", 1)
    store.close()
    store = TelemetryStore(tmp_path / "fleet" / "telemetry.sqlite")  # what was stored survives a restart
    v1 = store.totals("v1")
    assert (v1.windows, v1.nodes, v1.calls, v1.samples, v1.errors) == (3, 2, 10, 20, 0)
    assert v1.class_counts == [10, 0, 10] and v1.error_rate == 0.0
    assert v1.latency_counts[LATENCY_BUCKETS.index(0.005)] == 10 and sum(v1.latency_counts) == 10
    assert store.versions() == ["v1", "v2"] and store.last_stored(1) == ("", 2) and store.last_stored(9) == ("", 0)
    assert store.totals("v2").nodes == 2
    assert store.totals("v1", since=NOW).windows == 0 and store.totals("unknown").calls == 0
    with sqlite3.connect(tmp_path / "fleet" / "telemetry.sqlite") as db:
        assert db.execute("SELECT value FROM meta").fetchone() == (str(SCHEMA_VERSION),)
        db.execute("UPDATE meta SET value = '99'")
    with pytest.raises(ValueError, match="holds fleet database schema 99"):
        TelemetryStore(tmp_path / "fleet" / "telemetry.sqlite")


@pytest.mark.parametrize(("window", "reason"), [
    (_window(end=NOW + 3600), "in the future"),
    (_window(start=NOW - 400 * 86_400, end=NOW - 1), "days ago"),
    # a device that claims a day of serving time in a one-minute window
    (_window(calls=10, seconds=86_400 / 10), f"at most {MAX_CONCURRENCY} calls at once"),
])
def test_a_window_the_device_could_not_have_served_is_refused(window, reason):
    assert reason in plausible(window, now=NOW)
    store = TelemetryStore(":memory:")
    assert reason in store.add(3, 1, window, now=NOW) and store.totals("v1").windows == 0


def test_more_samples_than_calls_could_carry_is_refused():
    window = _window(calls=1)
    window.samples, window.class_counts = MAX_BATCH + 1, [MAX_BATCH + 1, 0, 0]
    assert "a call" in plausible(window, now=NOW)


def test_latency_quantiles_interpolate_within_buckets_as_prometheus_does():
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    counts[LATENCY_BUCKETS.index(0.01)] = 90  # (0.005, 0.01]
    counts[LATENCY_BUCKETS.index(0.1)] = 10   # (0.05, 0.1]
    assert quantile(counts, 0.5) == pytest.approx(0.005 + 0.005 * 50 / 90)
    assert quantile(counts, 0.99) == pytest.approx(0.05 + 0.05 * 9 / 10)
    assert quantile([0] * len(counts), 0.5) is None and quantile([*[0] * len(LATENCY_BUCKETS), 3], 0.5) == 10.0


def test_drift_is_reported_against_the_releases_reference_and_not_for_its_own_distribution():
    rng = np.random.default_rng(0)
    calibration = rng.normal(0.0, 1.0, (500, 1))
    reference = reference_of(calibration, np.eye(3)[rng.integers(0, 3, 500)])
    edges = reference["feature_edges"]
    store = TelemetryStore(":memory:")
    for node, (version, mean) in enumerate((("same", 0.0), ("shifted", 2.0))):  # 100 served samples each
        for sequence in range(50):
            sample = rng.normal(mean, 1.0, (2, 1))
            assert store.add(node, sequence + 1, _window(version, calls=1, x=sample, edges=edges), now=NOW) == ""
    same, shifted = drift(store.totals("same"), reference), drift(store.totals("shifted"), reference)
    assert same < 0.1 and shifted > DRIFT_THRESHOLD, (same, shifted)
    assert drift(store.totals("same"), None) is None
    assert drift(store.totals("same"), {**reference, "feature_edges": [[0.0]]}) is None  # other bins
    assert drift(store.totals("same", until=NOW - 1 - 1e-9), reference) is None  # no window
    few = TelemetryStore(":memory:")
    few.add(1, 1, _window("same", calls=DRIFT_MIN_SAMPLES // 2 - 1, x=rng.normal(0, 1, (2, 1)), edges=edges), now=NOW)
    assert drift(few.totals("same"), reference) is None  # 98 samples: too few to tell noise from drift


def test_a_device_sends_the_windows_after_what_the_server_stored_and_drains_the_rest(tmp_path):
    import json

    from device_agents.fleet import agent as fleet
    from device_agents.protocol import MAX_WINDOWS, TelemetryWire
    from device_agents.serving.spool import Spool

    node = {"store": str(tmp_path / "store")}
    spool = Spool(tmp_path / "store" / "telemetry")
    for i in range(5):
        spool.append(_window(f"v{i}", start=10.0, end=20.0))
    own = spool.identity()
    (tmp_path / "store" / "telemetry" / "000000000006.json").write_text('{"forged": true}')
    windows, metrics, spool_id = fleet.telemetry(0, "", node)
    assert list(windows) == [f"{i:012d}" for i in range(1, 6)] and metrics == {TelemetryWire.LAST_SEQUENCE: 6.0}
    assert spool_id == own and len(own) == 16
    assert json.loads(windows["000000000003"])["version"] == "v2"  # the window as the spool holds it
    assert list(fleet.telemetry(3, "0123456789abcdef", node)[0])[0] == "000000000001"  # another spool's: kept
    windows, _, _ = fleet.telemetry(3, own, node)  # the server stored up to 3 of this spool: drained
    assert list(windows) == ["000000000004", "000000000005"] and [s for s, _ in spool.files()][0] == 4
    assert list(fleet.telemetry(10**6, own, node)[0]) == ["000000000004", "000000000005"]  # more than it held
    for _ in range(MAX_WINDOWS + 10):
        spool.append(_window(start=10.0, end=20.0))
    assert len(fleet.telemetry(5, own, node)[0]) == MAX_WINDOWS


def test_windows_served_after_a_full_drain_or_a_wiped_store_are_stored_not_dropped(tmp_path):
    """The bug this reproduces: once the server had collected and the device drained every window, the next
    window restarted at sequence 1, which the server already held of that node: dropped as 'already stored'. A
    wiped store did the same. Sequences now never restart, and a new spool has a new id."""
    import shutil

    from device_agents.fleet import agent as fleet
    from edgekit.fleet.jobs import collected

    node, store = {"store": str(tmp_path / "store")}, TelemetryStore(":memory:")
    store.record_release("v1", 1, "/fleet/releases/v1", None, now=NOW)
    spool = Spool(tmp_path / "store" / "telemetry")

    def collect():
        through_spool, through = store.last_stored(7)
        windows, _, spool_id = fleet.telemetry(through, through_spool, node)
        return collected(store, 7, _reply(windows, spool_id), now=NOW)["stored"]

    for _ in range(3):
        spool.append(_window())
    assert collect() == 3 and collect() == 0 and spool.files() == []  # collected, then drained
    spool.append(_window(calls=2))
    assert spool.files()[0][0] == 4 and collect() == 1 and store.totals("v1").calls == 14
    shutil.rmtree(tmp_path / "store")  # a wiped store: a new spool, sequences from 1 again
    spool.append(_window(calls=3))
    assert spool.files()[0][0] == 1 and collect() == 1 and store.totals("v1").calls == 17
    assert collect() == 0 and spool.files() == []
    (tmp_path / "store" / "telemetry" / "spool.json").write_text("{not json")  # a damaged identity: a new spool
    first = spool.identity()
    assert first == spool.identity() and len(first) == 16


def _reply(windows, spool_id=None):
    import time

    from flwr.app import ConfigRecord, Message, Metadata, MetricRecord, RecordDict

    metadata = Metadata(run_id=1, message_id="m7", src_node_id=7, dst_node_id=0, reply_to_message_id="q7",
                        group_id="1", created_at=time.time(), ttl=60.0, message_type="query.telemetry")
    content = {"windows": ConfigRecord(windows), "metrics": MetricRecord({"last-sequence": 0.0})}
    if spool_id is not None:
        content["spool"] = ConfigRecord({"id": spool_id})
    return Message(RecordDict(content), metadata=metadata)


def test_the_server_stores_honest_windows_once_and_refuses_lying_ones_by_name():
    import json

    from edgekit.fleet.jobs import collected

    def encoded(stats):
        return json.dumps(stats.to_dict()).encode()

    lying = _window(calls=10, seconds=86_400 / 10)  # a day of serving in a minute
    forged = _window().to_dict()
    forged["samples"] += 100  # more samples than predicted classes
    store = TelemetryStore(":memory:")
    store.record_release("v1", 1, "/fleet/releases/v1", None, now=NOW)
    windows = {"000000000001": encoded(_window()), "000000000002": encoded(lying),
               "000000000003": json.dumps(forged).encode(), "000000000004": b"\xff not json",
               "../../etc/passwd": encoded(_window()), "000000000005": encoded(_window("invented-by-the-device"))}
    row = collected(store, 7, _reply(windows), now=NOW)
    assert row["stored"] == 1 and store.totals("v1").windows == 1 and row["reason"] == ""
    reasons = dict(r.split(": ", 1) for r in row["refused"])
    assert f"at most {MAX_CONCURRENCY} calls at once" in reasons["000000000002"]
    assert "predicted classes" in reasons["000000000003"] and "000000000004" in reasons
    assert reasons["../../etc/passwd"] == "not a spool window"
    # a version the fleet never rolled out: refused, so a device cannot invent metric label values without end
    assert reasons["000000000005"] == "version 'invented-by-the-device' is no release rolled out to this fleet"
    assert store.versions() == ["v1"]
    again = collected(store, 7, _reply({"000000000001": encoded(_window())}), now=NOW)
    assert again["stored"] == 0 and again["refused"] == [] and store.totals("v1").windows == 1
    too_many = {f"{i:012d}": encoded(_window()) for i in range(1, 300)}
    assert "malformed reply" in collected(store, 7, _reply(too_many), now=NOW)["reason"]
    assert collected(store, 7, None, now=NOW)["reason"] == "no reply"
    for forged in ("../../etc", "ABCDEF0123456789", "0" * 17):
        assert "a spool id is 16 hex digits" in collected(store, 7, _reply({}, forged), now=NOW)["reason"]
