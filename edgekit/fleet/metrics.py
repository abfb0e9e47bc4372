"""The fleet's metrics in Prometheus text exposition (``prometheus-client``), read from the fleet database at each
scrape, so a restarted server serves the same counters.

=========================================  ====================================================================
metric                                      what
=========================================  ====================================================================
``edgekit_fleet_devices{version,state}``    devices last seen serving ``version``, by :class:`DeviceState`
``edgekit_desired_release{release_id}``     the release number every device should serve
``edgekit_inferences_total{version}``       calls served through the agent (``ServedModel.predict``)
``edgekit_inference_samples_total``         samples those calls served
``edgekit_inference_errors_total``          calls that failed
``edgekit_inference_latency_seconds``       histogram of the calls' latency (the device's fixed buckets)
``edgekit_release_accuracy{version}``       mean over devices of each one's latest accuracy on its own data (%)
``edgekit_drift_psi{version}``              largest population stability index of a feature against the release
=========================================  ====================================================================

>>> from edgekit.fleet.telemetry import TelemetryStore
>>> from device_agents.serving.stats import ServingStats
>>> import numpy as np
>>> store = TelemetryStore(":memory:")
>>> stats = ServingStats("v1", num_classes=2, features=1, start=100.0, end=160.0)
>>> stats.record(np.zeros((4, 1)), np.eye(2)[[0, 1, 1, 1]], seconds=0.004)
>>> store.add(7, 1, stats, now=200.0)
''
>>> from prometheus_client import CollectorRegistry, generate_latest
>>> registry = CollectorRegistry()
>>> registry.register(FleetCollector(store))
>>> print([line for line in generate_latest(registry).decode().splitlines() if "inferences_total" in line][-1])
edgekit_inferences_total{version="v1"} 1.0
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agents.serving.stats import LATENCY_BUCKETS
from edgekit.errors import InputError
from edgekit.fleet.telemetry import TelemetryStore


class FleetCollector:
    """A ``prometheus_client`` collector of the fleet database ``store`` (a :class:`TelemetryStore` or its path:
    a path is opened per scrape, as the scrape runs in the HTTP server's thread)."""

    def __init__(self, store: TelemetryStore | str | Path) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        if isinstance(self.store, TelemetryStore):
            yield from _families(self.store)
            return
        if not Path(self.store).is_file():
            return
        store = TelemetryStore(self.store)
        try:
            yield from list(_families(store))
        finally:
            store.close()


def _families(store: TelemetryStore) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    devices = GaugeMetricFamily("edgekit_fleet_devices", "Devices last seen serving a version, by state against "
                                "the desired release", labels=["version", "state"])
    counted: dict[tuple[str, str], int] = {}
    for device in store.devices():
        key = (device["version"] or "none", device["state"])
        counted[key] = counted.get(key, 0) + 1
    for (version, state), count in sorted(counted.items()):
        devices.add_metric([version, state], count)
    yield devices
    desired = GaugeMetricFamily("edgekit_desired_release", "The release number every device should serve",
                                labels=["release_id"])
    if (wanted := store.desired()) is not None:
        desired.add_metric([wanted["release_id"]], wanted["release"])
    yield desired
    calls = CounterMetricFamily("edgekit_inferences", "Calls served through the agent", labels=["version"])
    samples = CounterMetricFamily("edgekit_inference_samples", "Samples served through the agent",
                                  labels=["version"])
    errors = CounterMetricFamily("edgekit_inference_errors", "Calls that failed", labels=["version"])
    latency = HistogramMetricFamily("edgekit_inference_latency_seconds", "Latency of the calls served",
                                    labels=["version"])
    accuracy = GaugeMetricFamily("edgekit_release_accuracy", "Mean over devices of the latest accuracy (%) each "
                                 "measured on its own data", labels=["version"])
    drift = GaugeMetricFamily("edgekit_drift_psi", "Largest population stability index of a served input feature "
                              "against the release's calibration data", labels=["version"])
    versions = sorted(set(store.versions()) | {d["version"] for d in store.devices() if d["version"]})
    for version in versions:
        totals = store.totals(version)
        if totals.windows:
            calls.add_metric([version], totals.calls)
            samples.add_metric([version], totals.samples)
            errors.add_metric([version], totals.errors)
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, LATENCY_BUCKETS), "+Inf"], totals.latency_counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric([version], buckets, totals.latency_sum)
        if (value := store.accuracy(version)) is not None:
            accuracy.add_metric([version], value)
        if (psi := store.drift(version)) is not None:
            drift.add_metric([version], psi)
    yield from (calls, samples, errors, latency, accuracy, drift)


@dataclass(frozen=True)
class MetricsAddress:
    """Where ``/metrics`` is served: loopback unless a host is given."""

    host: str = "127.0.0.1"
    port: int = 9094

    def __post_init__(self) -> None:
        if not self.host:
            raise InputError("the metrics host is empty; give an address such as 127.0.0.1")
        if not 0 < self.port < 65536:
            raise InputError(f"metrics port {self.port} is not a TCP port (1-65535)")


class MetricsServer:
    """``/metrics`` of a fleet database, served by ``prometheus_client``'s HTTP server in a daemon thread."""

    def __init__(self, database: str | Path, address: MetricsAddress) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(FleetCollector(database))
        try:
            self._server, self._thread = start_http_server(address.port, addr=address.host, registry=registry)
        except OSError as exc:
            raise InputError(f"cannot serve metrics on {address.host}:{address.port}: {exc.strerror}") from None
        self.address = address

    @property
    def url(self) -> str:
        return f"http://{self.address.host}:{self.address.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

