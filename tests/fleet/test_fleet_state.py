"""The fleet's desired state, device states, Prometheus metrics and serving time series (issue 27, parts 3 and 5,
server side), on the real fleet database, ``prometheus_client`` and its HTTP server."""

from __future__ import annotations

import sqlite3
import urllib.request

import numpy as np
import pytest

from device_agents.serving.stats import LATENCY_BUCKETS, ServingStats, reference_of
from edgekit.fleet.telemetry import DRIFT_THRESHOLD, DeviceState, TelemetryStore, series

NOW = 1_000_000.0


def _window(version, *, calls=4, errors=0, seconds=0.004, start=NOW - 60, end=NOW - 1, x=None, edges=None):
    stats = ServingStats(version, num_classes=3, features=1, edges=edges, start=start, end=end)
    for _ in range(calls):
        stats.record(np.zeros((2, 1)) if x is None else x, np.eye(3)[[0, 2]], seconds=seconds)
    for _ in range(errors):
        stats.record_error(seconds=seconds)
    return stats


def _row(node, version, *, ok=True, answered=True, accuracy=95.0, reason="", previous=""):
    return {"node": node, "ok": ok, "answered": answered, "reason": reason, "version_id": version,
            "previous_id": previous, "inferences": 100.0, "errors": 0.0, "p50_ms": 0.5, "p99_ms": 1.0,
            "accuracy": accuracy, "samples": 100.0, "previous_inferences": -1.0, "previous_errors": -1.0,
            "previous_p50_ms": -1.0, "previous_p99_ms": -1.0, "previous_accuracy": -1.0, "previous_samples": -1.0}


def test_a_version_1_database_is_upgraded_in_place_and_keeps_its_windows(tmp_path):
    path = tmp_path / "telemetry.sqlite"
    with sqlite3.connect(path) as db:  # what the first collecting edgekit wrote
        db.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                         "INSERT INTO meta VALUES ('schema_version', '1');")
    TelemetryStore(path).close()
    store = TelemetryStore(path)
    assert store.desired() is None and store.devices() == []
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)


def test_devices_converge_on_the_desired_release_and_one_that_failed_it_is_not_retried():
    from edgekit.fleet.jobs import record_installs, record_status

    store = TelemetryStore(":memory:")
    # before any rollout there is nothing to converge to
    assert record_status(store, [_row(1, "")]) == [] and store.device(1)["state"] == DeviceState.UNTRACKED
    with pytest.raises(ValueError, match="never recorded"):
        store.set_desired("r2")
    store.record_release("r1", 1, "/fleet/releases/r1", None, now=NOW)
    store.record_release("r2", 2, "/fleet/releases/r2", None, now=NOW)
    store.set_desired("r2")
    assert store.desired()["release"] == 2
    behind = record_status(store, [_row(1, "r2"), _row(2, "r1"), _row(3, "r1"),
                                   _row(4, "", ok=False, answered=False, reason="no reply")])
    assert [r["node"] for r in behind] == [2, 3]
    states = {d["node"]: (d["state"], d["reason"]) for d in store.devices()}
    assert states["1"] == ("converged", "") and states["2"][0] == "pending" and "release 2 (r2)" in states["2"][1]
    assert "4" not in states  # it never answered: nothing is known of it
    # the pass sends r2: node 2 installs it, node 3 refuses it (its own check), node 4 stays silent
    record_installs(store, [_row(2, "r2"), _row(3, "", ok=False, reason="smoke test failed", previous="r1"),
                            _row(4, "", ok=False, answered=False, reason="no reply", previous="r1")], "r2")
    states = {d["node"]: (d["state"], d["reason"], d["version"]) for d in store.devices()}
    assert states["2"] == ("converged", "", "r2") and states["3"] == ("failed", "smoke test failed", "r1")
    assert states["4"] == ("pending", "no reply", "r1")
    # the next pass: the failed device is not sent the same release again, the silent one is
    assert [r["node"] for r in record_status(store, [_row(3, "r1"), _row(4, "r1")])] == [4]
    assert store.device(3)["state"] == "failed"
    # a device that says it installed it but serves something else has failed it
    record_installs(store, [_row(5, "r1")], "r2")
    assert store.device(5)["state"] == "failed" and "after installing r2" in store.device(5)["reason"]
    # a new desired release: the failed device is tried again
    store.record_release("r3", 3, "/fleet/releases/r3", None, now=NOW)
    store.set_desired("r3")
    assert 3 in [r["node"] for r in record_status(store, [_row(3, "r1")])]


def test_accuracy_is_each_devices_latest_measurement_averaged_and_lies_are_not_recorded():
    from edgekit.fleet.jobs import record_status

    store = TelemetryStore(":memory:")
    record_status(store, [_row(1, "v", accuracy=80.0), _row(2, "v", accuracy=90.0)])
    record_status(store, [_row(1, "v", accuracy=84.0), _row(3, "v", accuracy=-1.0)])  # 3 has no labels
    assert store.accuracy("v") == pytest.approx(87.0) and store.accuracy("other") is None
    liar = {**_row(4, "v", accuracy=100.0), "samples": 1e11}
    record_status(store, [liar])
    assert store.accuracy("v") == pytest.approx(87.0)
    assert [a for _, a in store.accuracy_series("v")] == [80.0, 90.0, 84.0]


def _families(store):
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from edgekit.fleet.metrics import FleetCollector

    registry = CollectorRegistry()
    registry.register(FleetCollector(store))
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}, text


def _samples(family, name, **labels):
    return [s.value for s in family.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def test_the_metrics_carry_what_the_fleet_served_per_version_with_its_labels():
    from edgekit.fleet.jobs import record_status

    rng = np.random.default_rng(0)
    reference = reference_of(rng.normal(0, 1, (400, 1)), np.eye(3)[rng.integers(0, 3, 400)])
    store = TelemetryStore(":memory:")
    store.record_release("v1", 1, "/r/v1", reference, now=NOW)
    store.record_release("v2", 2, "/r/v2", reference, now=NOW)
    store.set_desired("v2")
    edges = reference["feature_edges"]
    for sequence in range(1, 61):  # v1 serves its calibration distribution, v2 a shifted one and fails sometimes
        assert store.add(1, sequence, _window("v1", calls=1, x=rng.normal(0, 1, (2, 1)), edges=edges), now=NOW) == ""
        assert store.add(2, sequence, _window("v2", calls=1, errors=1, seconds=0.2, x=rng.normal(3, 1, (2, 1)),
                                              edges=edges), now=NOW) == ""
    record_status(store, [_row(1, "v1", accuracy=91.0), _row(2, "v2", accuracy=60.0)])
    families, text = _families(store)
    devices = families["edgekit_fleet_devices"]
    assert _samples(devices, "edgekit_fleet_devices", version="v1", state="pending") == [1.0]
    assert _samples(devices, "edgekit_fleet_devices", version="v2", state="converged") == [1.0]
    assert _samples(families["edgekit_desired_release"], "edgekit_desired_release", release_id="v2") == [2.0]
    assert _samples(families["edgekit_inferences"], "edgekit_inferences_total", version="v1") == [60.0]
    assert _samples(families["edgekit_inferences"], "edgekit_inferences_total", version="v2") == [120.0]
    assert _samples(families["edgekit_inference_errors"], "edgekit_inference_errors_total", version="v2") == [60.0]
    assert _samples(families["edgekit_inference_samples"], "edgekit_inference_samples_total", version="v1") == [120.0]
    latency = families["edgekit_inference_latency_seconds"]
    buckets = {s.labels["le"]: s.value for s in latency.samples
               if s.name == "edgekit_inference_latency_seconds_bucket" and s.labels["version"] == "v2"}
    assert buckets["0.1"] == 0 and buckets["0.25"] == 120 and buckets["+Inf"] == 120  # cumulative, every call
    assert len(buckets) == len(LATENCY_BUCKETS) + 1
    assert _samples(latency, "edgekit_inference_latency_seconds_count", version="v2") == [120.0]
    assert _samples(latency, "edgekit_inference_latency_seconds_sum", version="v2") == [pytest.approx(24.0)]
    assert _samples(families["edgekit_release_accuracy"], "edgekit_release_accuracy", version="v1") == [91.0]
    (same,) = _samples(families["edgekit_drift_psi"], "edgekit_drift_psi", version="v1")
    (shifted,) = _samples(families["edgekit_drift_psi"], "edgekit_drift_psi", version="v2")
    assert same < 0.1 and shifted > DRIFT_THRESHOLD, (same, shifted)
    assert "# TYPE edgekit_inference_latency_seconds histogram" in text


def test_metrics_are_served_over_http_from_the_database_file_and_a_taken_port_is_refused(tmp_path):
    from device_agents.federated.join import free_port
    from edgekit.errors import InputError
    from edgekit.fleet.metrics import MetricsAddress, MetricsServer

    path = tmp_path / "telemetry.sqlite"
    server = MetricsServer(path, MetricsAddress(port=free_port()))
    try:
        empty = urllib.request.urlopen(server.url, timeout=10).read().decode()  # noqa: S310 (loopback)
        assert "edgekit_" not in empty  # no database yet: nothing, and no error
        store = TelemetryStore(path)
        store.add(5, 1, _window("v9"), now=NOW)
        store.close()
        text = urllib.request.urlopen(server.url, timeout=10).read().decode()  # noqa: S310
        assert 'edgekit_inferences_total{version="v9"} 4.0' in text
        with pytest.raises(InputError, match=f"cannot serve metrics on 127.0.0.1:{server.address.port}"):
            MetricsServer(path, server.address)
    finally:
        server.stop()
    with pytest.raises(InputError, match="not a TCP port"):
        MetricsAddress(port=70_000)


def test_metrics_on_an_ipv6_address_print_a_url_that_works(tmp_path):
    import socket

    from device_agents.federated.join import free_port
    from edgekit.fleet.metrics import MetricsAddress, MetricsServer

    try:
        socket.socket(socket.AF_INET6).close()
        socket.getaddrinfo("::1", 0, socket.AF_INET6)
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    server = MetricsServer(tmp_path / "telemetry.sqlite", MetricsAddress(host="::1", port=free_port()))
    try:
        assert server.url == f"http://[::1]:{server.address.port}/metrics"
        assert urllib.request.urlopen(server.url, timeout=10).status == 200  # noqa: S310 (loopback)
    finally:
        server.stop()


def _cut_within(sock, seconds: float) -> float | None:
    """Seconds until the server closed ``sock`` (end of stream or a reset), or None if it stayed open."""
    import select
    import time

    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if select.select([sock], [], [], 0.1)[0]:
            try:
                if not sock.recv(1024):
                    return time.monotonic() - start
            except OSError:
                return time.monotonic() - start
    return None


def test_connections_that_send_nothing_neither_pile_up_threads_nor_lock_scrapes_out(tmp_path, monkeypatch):
    """prometheus_client's own server keeps a thread per connection for as long as the client stays silent: three
    times the cap of silent connections, and one trickling its request a byte at a time, were all still open (and
    their threads alive) after the deadlines below before this bound."""
    import socket
    import threading
    import time

    from device_agents.federated.join import free_port
    from edgekit.fleet import metrics
    from edgekit.fleet.metrics import MetricsAddress, MetricsServer

    monkeypatch.setattr(metrics, "MAX_SCRAPES", 4)
    monkeypatch.setattr(metrics, "IDLE_SECONDS", 2.0)
    monkeypatch.setattr(metrics, "REQUEST_SECONDS", 3.0)
    server = MetricsServer(tmp_path / "telemetry.sqlite", MetricsAddress(port=free_port()))
    threads = threading.active_count()
    silent = []
    try:
        for _ in range(12):
            silent.append(socket.create_connection(("127.0.0.1", server.address.port), timeout=10))
            time.sleep(0.02)
        assert urllib.request.urlopen(server.url, timeout=5).status == 200  # noqa: S310 (loopback)
        shed = [_cut_within(sock, 0.3) for sock in silent[:8]]
        assert all(cut is not None for cut in shed), shed  # the oldest were closed for the newer ones
        assert threading.active_count() - threads <= 2 * 4 + 2  # a thread and a deadline timer per open one
        assert all(_cut_within(sock, 4.0) is not None for sock in silent[8:])  # the rest after 2 s of silence
        with socket.create_connection(("127.0.0.1", server.address.port), timeout=10) as trickle:
            start, cut = time.monotonic(), None
            trickle.sendall(b"GET /metrics HTTP/1.1\r\n")  # the request line at once, then its headers slowly
            for byte in b"Host: x\r\nX-Slow: " + b"a" * 100:  # 50 s, were it let through
                try:
                    trickle.sendall(bytes([byte]))
                except OSError:
                    break
                if _cut_within(trickle, 0.5) is not None:
                    break
            cut = time.monotonic() - start
        assert 2.5 < cut < 6.0, cut  # cut at REQUEST_SECONDS though never silent for IDLE_SECONDS
        assert urllib.request.urlopen(server.url, timeout=5).status == 200  # noqa: S310
    finally:
        for sock in silent:
            sock.close()
        server.stop()


def test_serving_series_and_their_picture_show_each_version_over_time(tmp_path):
    from edgekit.fleet.plots import plot_serving

    path = tmp_path / "telemetry.sqlite"
    store = TelemetryStore(path)
    for minute in range(10):  # v1 for ten minutes, v2 from minute 5 with errors
        start = NOW - 600 + 60 * minute
        store.add(1, minute + 1, _window("v1", calls=6, start=start, end=start + 59), now=NOW)
        if minute >= 5:
            store.add(2, minute + 1, _window("v2", calls=3, errors=3, start=start, end=start + 59), now=NOW)
    lines = series(store, points=10)
    assert [round(v, 3) for _, v in lines["v1"]["calls"]] == [0.102] * 10  # 6 calls in each 59 s window
    assert {round(v, 3) for _, v in series(store, points=37)["v1"]["calls"]} == {0.102}  # whatever the steps
    assert len(lines["v2"]["calls"]) == 5 and {v for _, v in lines["v2"]["error_rate"]} == {0.5}
    assert all(0.0025 < v <= 0.005 for _, v in lines["v1"]["p99_s"])
    store.close()
    plot_serving(path, tmp_path / "serving.png")
    import matplotlib.image

    pixels = matplotlib.image.imread(tmp_path / "serving.png")
    assert pixels.shape[0] > 400 and len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20


def test_the_watch_periods_are_checked():
    from edgekit.errors import InputError
    from edgekit.fleet.watch import WatchConfig

    assert WatchConfig(converge_every=None, collect_every=5).collect_every == 5
    for bad in ({"converge_every": 1.0}, {"collect_every": float("nan")}, {"collect_every": True},
                {"converge_every": 10 ** 6}):
        with pytest.raises(InputError, match="seconds"):
            WatchConfig(**bad)


def test_stages_reach_their_fractions_of_the_devices_in_one_random_order():
    from edgekit.fleet.jobs import stage_plan

    nodes = list(range(100, 120))
    plan = stage_plan(nodes, {"stages": [0.1, 0.5, 1.0], "seed": 3})
    assert [len(batch) for batch in plan] == [2, 8, 10] and sorted(sum(plan, [])) == nodes
    assert plan == stage_plan(nodes, {"stages": [0.1, 0.5, 1.0], "seed": 3})  # a seed repeats the choice
    assert plan != stage_plan(nodes, {"stages": [0.1, 0.5, 1.0], "seed": 4})
    # every stage adds a device, however small its fraction; one that would add none is left out
    assert [len(b) for b in stage_plan([1, 2, 3], {"stages": [0.01, 0.02, 0.5, 1.0], "seed": 0})] == [1, 1, 1]
    assert [len(b) for b in stage_plan([1], {"stages": [0.1, 1.0], "seed": 0})] == [1]
    # no stages: the canary fraction, then the rest
    assert [len(b) for b in stage_plan(nodes, {"canary": 0.25, "seed": 0})] == [5, 15]
    assert [len(b) for b in stage_plan(nodes, {"canary": 1.0, "seed": 0})] == [20]


def test_a_bake_judges_what_the_stage_served_error_rate_p99_and_drift_with_the_numbers():
    from edgekit.fleet.rollout import Gates, bake_verdict

    rng = np.random.default_rng(1)
    reference = reference_of(rng.normal(0, 1, (400, 1)), np.eye(3)[rng.integers(0, 3, 400)])
    edges = reference["feature_edges"]
    store = TelemetryStore(":memory:")
    for sequence in range(1, 61):
        store.add(1, sequence, _window("good", calls=1, x=rng.normal(0, 1, (2, 1)), edges=edges), now=NOW)
        store.add(2, sequence, _window("bad", calls=1, errors=1, seconds=0.2, x=rng.normal(3, 1, (2, 1)),
                                       edges=edges), now=NOW)
    good = bake_verdict({1: store.totals("good", node=1)}, Gates(max_p99_ms=10), reference)
    assert good["failures"] == [] and good["calls"] == 60 and good["devices"][0]["drift_psi"] < DRIFT_THRESHOLD
    bad = bake_verdict({2: store.totals("bad", node=2)}, Gates(max_p99_ms=100), reference)
    assert bad["failures"][0] == ("served error rate 0.500 > 0 (60 of 120 calls) on 1 of 1 device(s) during the "
                                  "bake")
    assert bad["failures"][1].startswith("served p99 latency 24") and "> 100 ms on 1 of 1" in bad["failures"][1]
    assert bad["failures"][2].startswith("served inputs drifted: PSI") and len(bad["failures"]) == 3
    assert bake_verdict({2: store.totals("bad", node=2)}, Gates(max_error_rate=0.5, max_drift_psi=None),
                        reference)["failures"] == []
    nothing = bake_verdict({3: store.totals("none", node=3)}, Gates(), reference)
    assert nothing["failures"] == [] and "no served call" in nothing["line"]


def test_a_device_claiming_a_flood_of_good_calls_cannot_dilute_another_devices_errors_in_a_bake():
    """The attack: an honest stage device serves the release with half its calls failing; a registered liar
    claims a billion error-free calls of zero latency in the same minute (plausible by the window checks: no
    serving time). Summed, the error rate was 1.2e-09, under a 1% gate; one vote per device, the honest device
    fails it. With a quorum of 0.5 the liar's vote is enough to pass, as in the canary."""
    from edgekit.fleet.rollout import Gates, bake_verdict

    store = TelemetryStore(":memory:")
    store.add(1, 1, _window("r", calls=1, errors=1), now=NOW)
    liar = _window("r", calls=0)
    liar.calls = liar.latency_counts[0] = 10 ** 9
    liar.samples = liar.class_counts[0] = 10 ** 9
    assert store.add(2, 1, liar, now=NOW) == ""
    served = {node: store.totals("r", node=node) for node in (1, 2)}
    verdict = bake_verdict(served, Gates(max_error_rate=0.01), None)
    assert verdict["failures"] == ["served error rate 0.500 > 0.01 (1 of 2 calls) on 1 of 2 device(s) during the "
                                   "bake"]
    assert verdict["error_rate"] < 1e-8  # what summing would have judged
    assert bake_verdict(served, Gates(max_error_rate=0.01, quorum=0.5), None)["failures"] == []


def test_stages_and_bake_are_checked():
    from edgekit.errors import InputError
    from edgekit.fleet.rollout import RolloutConfig

    assert RolloutConfig(stages=(0.1, 0.5, 1.0), bake=30).seconds > 3 * 30
    for bad in ({"stages": (0.5, 0.1, 1.0)}, {"stages": (0.1, 0.5)}, {"stages": (0.0, 1.0)},
                {"stages": (0.5, 0.5, 1.0)}, {"stages": (float("nan"), 1.0)}, {"stages": tuple([0.05] * 11)}):
        with pytest.raises(InputError, match="increasing fractions"):
            RolloutConfig(**bad)
    with pytest.raises(InputError, match="bake"):
        RolloutConfig(bake=-1)


def test_the_watch_and_stage_options_are_refused_in_one_line(tmp_path):
    from conftest import assert_one_line_error, run_cli

    serve = ("fleet", "serve", "--out", str(tmp_path / "fleet"), "--key", str(tmp_path / "none.key"))
    assert_one_line_error(run_cli(*serve, "--metrics", "70000"), 2, "argument --metrics", "port from 1 to 65535")
    assert_one_line_error(run_cli(*serve, "--metrics", "abc"), 2, "'abc' is not [HOST:]PORT")
    assert_one_line_error(run_cli(*serve, "--converge-every", "1"), 2, "converge_every = 1.0 must be 5 to 86400")
    rollout = ("fleet", "rollout", "--fleet", str(tmp_path / "fleet"), "--release", str(tmp_path))
    assert_one_line_error(run_cli(*rollout, "--stages", "0.5,0.2"), 2, "increasing fractions")
    assert_one_line_error(run_cli(*rollout, "--stages", "half,1"), 2, "comma-separated fractions")
    assert_one_line_error(run_cli(*rollout, "--bake", "-5"), 2, "bake -5.0 must be 0 to 86400 seconds")
    assert not (tmp_path / "fleet").exists()
