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


MAX_SCRAPES = 16
"""Connections served at once; a new one past it closes the oldest (a Prometheus server scrapes over one)."""
REQUEST_SECONDS = 10.0
"""The longest a request may take to arrive, however its client trickles it (the answer is not bounded: a scrape
reads the whole fleet database)."""
IDLE_SECONDS = 10.0
"""The longest a connection may send or read nothing."""


class MetricsServer:
    """``/metrics`` of a fleet database, served by ``prometheus_client``'s WSGI app on a thread per connection,
    with the limits its ``start_http_server`` lacks: a connection is closed after :data:`IDLE_SECONDS` of silence
    or when its request has not arrived whole within :data:`REQUEST_SECONDS`, and past :data:`MAX_SCRAPES` open
    connections a new one closes the oldest, so connections that send nothing cannot pile up threads in the fleet
    server nor lock scrapes out."""

    def __init__(self, database: str | Path, address: MetricsAddress) -> None:
        import socket
        import threading
        from wsgiref.simple_server import make_server

        from prometheus_client import CollectorRegistry, make_wsgi_app

        registry = CollectorRegistry(auto_describe=False)
        registry.register(FleetCollector(database))
        server_class, handler_class = _bounded_server()
        try:
            server_class.address_family = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)[0][0]
            self._server = make_server(address.host, address.port, make_wsgi_app(registry), server_class,
                                       handler_class=handler_class)
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise InputError(f"cannot serve metrics on {address.host}:{address.port}: {why}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="edgekit-metrics", daemon=True)
        self._thread.start()
        self.address = address

    @property
    def url(self) -> str:
        host = f"[{self.address.host}]" if ":" in self.address.host else self.address.host  # an IPv6 address
        return f"http://{host}:{self.address.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _bounded_server() -> tuple[type, type]:
    """prometheus_client's threading WSGI server and silent handler, bounded in connections and time."""
    import socket
    import threading
    import time
    from wsgiref.simple_server import WSGIRequestHandler

    from prometheus_client.exposition import ThreadingWSGIServer

    def cut(connection: socket.socket) -> None:
        try:
            connection.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed
            pass

    class Handler(WSGIRequestHandler):
        timeout = IDLE_SECONDS

        def parse_request(self) -> bool:  # reads the headers after the request line
            parsed = super().parse_request()
            self.server.arrived(self.request)
            return parsed

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            """No line per scrape."""

    class Server(ThreadingWSGIServer):  # type: ignore[misc]
        def server_activate(self) -> None:
            self.open: dict[Any, float] = {}
            self.deadlines: dict[Any, threading.Timer] = {}
            self.lock = threading.Lock()
            super().server_activate()

        def verify_request(self, request: Any, client_address: Any) -> bool:
            with self.lock:
                while len(self.open) >= MAX_SCRAPES:
                    oldest = min(self.open, key=self.open.__getitem__)
                    del self.open[oldest]
                    cut(oldest)
                self.open[request] = time.monotonic()
                self.deadlines[request] = threading.Timer(REQUEST_SECONDS, cut, (request,))
                self.deadlines[request].start()
            return True

        def arrived(self, request: Any) -> None:
            """The request line and headers are in: the request deadline no longer applies."""
            with self.lock:
                deadline = self.deadlines.pop(request, None)
            if deadline is not None:
                deadline.cancel()

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.arrived(request)
                with self.lock:
                    self.open.pop(request, None)

    return Server, Handler
