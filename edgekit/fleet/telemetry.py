"""The fleet's serving telemetry on the server: windows devices collected (:mod:`device_agents.serving.stats`),
kept in SQLite (the schema is :data:`SCHEMA`, here and nowhere else), each checked for plausibility first.

A window is stored once per (node, sequence): a collection that is repeated (a reply lost, a job re-run) adds
nothing. :func:`plausible` refuses what a device could not have served in the window it claims: time spent
serving beyond the window's length times :data:`MAX_CONCURRENCY`, more samples than :data:`MAX_BATCH` per call,
a window from the future or older than :data:`MAX_AGE_SECONDS`. Per version the store sums counts, latency
histograms, predicted classes and reference bins (:meth:`TelemetryStore.totals`); :func:`quantile` reads a
latency quantile from a histogram as Prometheus's ``histogram_quantile`` does.

>>> store = TelemetryStore(":memory:")
>>> stats = ServingStats("v1", num_classes=2, features=1, start=100.0, end=160.0)
>>> stats.record(np.zeros((4, 1)), np.eye(2)[[0, 1, 1, 1]], seconds=0.004)
>>> store.add(7, 1, stats, now=200.0), store.add(7, 1, stats, now=201.0)
('', 'already stored')
>>> store.totals("v1").samples, store.totals("v1").class_counts
(4, [1, 3])
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.serving.stats import LATENCY_BUCKETS, ServingStats

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS windows (
    node TEXT NOT NULL,
    spool TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    version TEXT NOT NULL,
    start REAL NOT NULL,
    end REAL NOT NULL,
    received REAL NOT NULL,
    calls INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    latency_sum REAL NOT NULL,
    latency_counts TEXT NOT NULL,
    class_counts TEXT NOT NULL,
    feature_count INTEGER NOT NULL,
    feature_sum TEXT NOT NULL,
    feature_sumsq TEXT NOT NULL,
    edges TEXT,
    bin_counts TEXT,
    PRIMARY KEY (node, spool, sequence)
);
CREATE INDEX IF NOT EXISTS windows_by_version ON windows (version, end);
CREATE TABLE IF NOT EXISTS releases (
    release_id TEXT PRIMARY KEY,
    release INTEGER NOT NULL,
    folder TEXT NOT NULL,
    reference TEXT,
    recorded REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    node TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    state TEXT NOT NULL,
    target TEXT NOT NULL,
    reason TEXT NOT NULL,
    seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS measurements (
    node TEXT NOT NULL,
    version TEXT NOT NULL,
    time REAL NOT NULL,
    accuracy REAL,
    error_rate REAL,
    p99_ms REAL
);
CREATE INDEX IF NOT EXISTS measurements_by_version ON measurements (version, time);
"""
"""The fleet database's tables: ``windows``, one row per window a device served, by (node, spool, sequence) (the
lists as JSON text; a node id as text: Flower's are unsigned 64-bit, past SQLite's signed INTEGER); ``releases``,
each release rolled out (its folder and its manifest's reference statistics, for drift); ``devices``, each
device's state against the desired release (:class:`DeviceState`, ``target`` the release it should serve);
``measurements``, what each device measured of the version it served (rollouts and status); ``meta`` holds the
schema version and the desired release (``desired``)."""

class DeviceState(str, Enum):
    """Where a device stands against the fleet's desired release."""

    CONVERGED = "converged"  # it serves the desired release
    PENDING = "pending"      # it does not yet (offline, not asked yet, or no reply): the next pass installs it
    FAILED = "failed"        # it refused or failed the desired release (the reason says why); not retried
    UNTRACKED = "untracked"  # no release has been rolled out yet: there is nothing to converge to


DEVICE_FIELDS = ("node", "version", "state", "target", "reason", "seen")
"""The columns of the ``devices`` table, as :meth:`TelemetryStore.devices` returns them."""

MAX_CONCURRENCY = 64
"""Calls a device may have served at once: its time spent serving is at most the window's length times this."""
MAX_BATCH = 65_536
"""Samples one call may have served at most."""
CLOCK_SKEW_SECONDS = 300.0
MAX_AGE_SECONDS = 366 * 86_400.0


def plausible(stats: ServingStats, *, now: float) -> str:
    """Why ``stats`` (already well-formed, :meth:`ServingStats.from_dict`) could not have been served as it says
    ("" when it could): the numbers are checked against the time the window claims."""
    length = stats.end - stats.start
    if stats.end > now + CLOCK_SKEW_SECONDS:
        return f"a window ending {stats.end - now:.0f} s in the future"
    if stats.start < now - MAX_AGE_SECONDS:
        return f"a window that started {(now - stats.start) / 86_400:.0f} days ago"
    if stats.latency_sum > length * MAX_CONCURRENCY + 1.0:
        return (f"{stats.latency_sum:.1f} s spent serving in a window of {length:.1f} s (at most "
                f"{MAX_CONCURRENCY} calls at once)")
    if stats.samples > stats.calls * MAX_BATCH:
        return f"{stats.samples} samples in {stats.calls} calls (at most {MAX_BATCH:,} a call)"
    return ""


@dataclass
class Totals:
    """One version's windows summed (see :meth:`TelemetryStore.totals`)."""

    version: str
    windows: int = 0
    nodes: int = 0
    calls: int = 0
    samples: int = 0
    errors: int = 0
    latency_sum: float = 0.0
    seconds: float = 0.0  # the windows' lengths summed
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    class_counts: list[int] = field(default_factory=list)
    edges: list[list[float]] | None = None
    bin_counts: list[list[int]] | None = None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.calls if self.calls else None

    @property
    def calls_per_second(self) -> float | None:
        """Calls the fleet served per second while these windows ran: the calls over the time a device's windows
        cover (their lengths summed, over the devices), whatever the windows' lengths."""
        return self.calls / (self.seconds / self.nodes) if self.seconds > 0 and self.nodes else None


DRIFT_THRESHOLD = 0.25
"""The population stability index past which a version's served inputs are said to have drifted from the data
its release was calibrated on (0.1-0.25 is commonly read as a moderate shift, over 0.25 as a significant one)."""


DRIFT_MIN_SAMPLES = 100
"""Served samples below which no drift is computed: on a few samples the index is mostly noise (its expected value
on the reference's own distribution is about bins / samples)."""


def drift(totals: Totals, reference: dict | None) -> float | None:
    """The largest population stability index over the features of ``totals``' served inputs against the release's
    ``reference`` (its manifest's), or ``None`` when the windows were not binned in that reference's bins or hold
    fewer than :data:`DRIFT_MIN_SAMPLES` binned samples."""
    from device_agents.serving.stats import stability_index

    if (not reference or totals.bin_counts is None or totals.edges is None
            or totals.edges != reference.get("feature_edges")):
        return None
    shares = reference.get("feature_bin_frequencies") or []
    if len(shares) != len(totals.bin_counts) or min(map(sum, totals.bin_counts), default=0) < DRIFT_MIN_SAMPLES:
        return None
    return max(stability_index(e, c) for e, c in zip(shares, totals.bin_counts, strict=True))


def quantile(counts: list[int], q: float) -> float | None:
    """The ``q`` quantile (seconds) of a latency histogram over :data:`LATENCY_BUCKETS`, interpolated linearly
    within its bucket as Prometheus's ``histogram_quantile`` does (the last, open bucket reports its lower bound).

    >>> quantile([0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0.5)
    0.00075
    """
    total = sum(counts)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index == len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            low = LATENCY_BUCKETS[index - 1] if index else 0.0
            return low + (LATENCY_BUCKETS[index] - low) * (rank - seen) / count
        seen += count
    return LATENCY_BUCKETS[-1]


class TelemetryStore:
    """The fleet's telemetry database (SQLite, ``path`` or ``":memory:"``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0)
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        with self._db:
            self._db.executescript(SCHEMA)
            found = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if found is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif found[0] == "1":
                self._upgrade_from_1()
            elif found[0] != str(SCHEMA_VERSION):
                raise ValueError(f"{self.path} holds fleet database schema {found[0]}; this edgekit reads "
                                 f"{SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def _upgrade_from_1(self) -> None:
        """Schema 1 had only the windows, keyed (node, sequence): they are kept, under the spool id "" (the
        spool a device without an identity counted in); the new tables were just created."""
        columns = [row[1] for row in self._db.execute("PRAGMA table_info(windows)")]
        if "spool" not in columns:
            self._db.execute("ALTER TABLE windows RENAME TO windows_1")
            self._db.execute("DROP INDEX IF EXISTS windows_by_version")
            self._db.executescript(SCHEMA)
            kept = ", ".join(columns)
            self._db.execute(f"INSERT INTO windows (spool, {kept}) SELECT '', {kept} FROM windows_1")
            self._db.execute("DROP TABLE windows_1")
        self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    def add(self, node: int, sequence: int, stats: ServingStats, *, now: float, spool: str = "") -> str:
        """Store one window of ``node`` (its ``spool``'s ``sequence``); "" when stored, else why not (implausible,
        or already stored)."""
        why = plausible(stats, now=now)
        if why:
            return why
        row = {"node": str(node), "spool": spool, "sequence": sequence, "version": stats.version,
               "start": stats.start, "end": stats.end, "received": now, "calls": stats.calls,
               "samples": stats.samples, "errors": stats.errors, "latency_sum": stats.latency_sum,
               "latency_counts": json.dumps(stats.latency_counts), "class_counts": json.dumps(stats.class_counts),
               "feature_count": stats.feature_count, "feature_sum": json.dumps(stats.feature_sum),
               "feature_sumsq": json.dumps(stats.feature_sumsq),
               "edges": None if stats.edges is None else json.dumps(stats.edges),
               "bin_counts": None if stats.bin_counts is None else json.dumps(stats.bin_counts)}
        with self._db:
            cursor = self._db.execute(f"INSERT OR IGNORE INTO windows ({', '.join(row)}) "
                                      f"VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
        return "" if cursor.rowcount == 1 else "already stored"

    def last_stored(self, node: int) -> tuple[str, int]:
        """(spool id, sequence): the spool of the window of ``node`` received last and the newest sequence stored
        of it (``("", 0)``: none), what the device may drain of that spool."""
        found = self._db.execute("SELECT spool FROM windows WHERE node = ? ORDER BY rowid DESC LIMIT 1",
                                 (str(node),)).fetchone()  # rowid: the order windows were stored in
        if found is None:
            return "", 0
        newest = self._db.execute("SELECT MAX(sequence) FROM windows WHERE node = ? AND spool = ?",
                                  (str(node), found[0])).fetchone()[0]
        return found[0], int(newest)

    def versions(self) -> list[str]:
        return [v for (v,) in self._db.execute("SELECT DISTINCT version FROM windows ORDER BY version")]

    def totals(self, version: str, *, since: float | None = None, until: float | None = None,
               node: int | None = None) -> Totals:
        """Every stored window of ``version`` (ending after ``since``, at or before ``until``; of ``node`` alone
        when given) summed; reference bins only where the windows share their edges."""
        rows = self._db.execute(
            "SELECT node, start, end, calls, samples, errors, latency_sum, latency_counts, class_counts, edges, "
            "bin_counts FROM windows WHERE version = ? AND end > ? AND end <= ? AND (? IS NULL OR node = ?) "
            "ORDER BY end", (version, -1.0 if since is None else since, float("inf") if until is None else until,
                             None if node is None else str(node), None if node is None else str(node)))
        totals, nodes, edges = Totals(version), set(), None
        for node, start, end, calls, samples, errors, latency_sum, latency, classes, window_edges, bins in rows:
            totals.windows += 1
            totals.seconds += max(end - start, 0.0)
            nodes.add(node)
            totals.calls, totals.samples, totals.errors = (totals.calls + calls, totals.samples + samples,
                                                          totals.errors + errors)
            totals.latency_sum += latency_sum
            totals.latency_counts = [a + b for a, b in zip(totals.latency_counts, json.loads(latency), strict=True)]
            classes = json.loads(classes)
            totals.class_counts = [a + b for a, b in zip(totals.class_counts or [0] * len(classes), classes,
                                                         strict=True)]
            if bins is not None and (edges is None or edges == window_edges):
                edges = window_edges
                bins = json.loads(bins)
                base = totals.bin_counts or [[0] * len(b) for b in bins]
                totals.bin_counts = [list(np.add(a, b)) for a, b in zip(base, bins, strict=True)]
        totals.nodes, totals.edges = len(nodes), None if edges is None else json.loads(edges)
        totals.bin_counts = None if totals.bin_counts is None else [[int(v) for v in b] for b in totals.bin_counts]
        return totals

    def record_release(self, release_id: str, release: int, folder: str | Path, reference: dict | None, *,
                       now: float) -> None:
        """Remember a release rolled out: its number, its folder (what a device that converges later gets) and its
        manifest's reference statistics (what its served inputs are compared with)."""
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO releases VALUES (?, ?, ?, ?, ?)",
                             (release_id, int(release), str(folder),
                              None if reference is None else json.dumps(reference), now))

    def release(self, release_id: str) -> dict[str, Any] | None:
        """A recorded release: ``release_id``, ``release``, ``folder``, ``reference``; None when never rolled out."""
        row = self._db.execute("SELECT release_id, release, folder, reference FROM releases WHERE release_id = ?",
                               (release_id,)).fetchone()
        if row is None:
            return None
        return {"release_id": row[0], "release": row[1], "folder": row[2],
                "reference": None if row[3] is None else json.loads(row[3])}

    def set_desired(self, release_id: str) -> None:
        """Make ``release_id`` (recorded with :meth:`record_release`) what every device should serve."""
        if self.release(release_id) is None:
            raise ValueError(f"release {release_id} was never recorded")
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('desired', ?)", (release_id,))

    def desired(self) -> dict[str, Any] | None:
        """The desired release (:meth:`release`), or None before any rollout completed."""
        found = self._db.execute("SELECT value FROM meta WHERE key = 'desired'").fetchone()
        return None if found is None else self.release(found[0])

    def record_device(self, node: int, version: str, state: DeviceState, reason: str = "", *, now: float) -> None:
        """A device seen serving ``version``, and its ``state`` against the desired release."""
        target = (self.desired() or {}).get("release_id", "")
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO devices VALUES (?, ?, ?, ?, ?, ?)",
                             (str(node), version, DeviceState(state).value, target, reason[:300], now))

    def device(self, node: int) -> dict[str, Any] | None:
        """One device as :meth:`devices` lists it (None: never seen)."""
        found = self._db.execute(f"SELECT {', '.join(DEVICE_FIELDS)} FROM devices WHERE node = ?",
                                 (str(node),)).fetchone()
        return None if found is None else dict(zip(DEVICE_FIELDS, found, strict=True))

    def devices(self) -> list[dict[str, Any]]:
        """Every device seen: ``node``, ``version``, ``state``, ``target`` (the desired release then), ``reason``,
        ``seen`` (time)."""
        rows = self._db.execute(f"SELECT {', '.join(DEVICE_FIELDS)} FROM devices ORDER BY node")
        return [dict(zip(DEVICE_FIELDS, row, strict=True)) for row in rows]

    def record_measurement(self, node: int, version: str, *, now: float, accuracy: float | None,
                           error_rate: float | None, p99_ms: float | None) -> None:
        """What a device measured of ``version`` on its own data (a rollout's or a status's measurement)."""
        with self._db:
            self._db.execute("INSERT INTO measurements VALUES (?, ?, ?, ?, ?, ?)",
                             (str(node), version, now, accuracy, error_rate, p99_ms))

    def accuracy(self, version: str) -> float | None:
        """The mean over devices of each one's latest accuracy measured of ``version`` (None: no labeled device)."""
        rows = self._db.execute(
            "SELECT m.accuracy FROM measurements m JOIN (SELECT node, MAX(time) AS time FROM measurements "
            "WHERE version = ? AND accuracy IS NOT NULL GROUP BY node) latest "
            "ON m.node = latest.node AND m.time = latest.time WHERE m.version = ? AND m.accuracy IS NOT NULL",
            (version, version)).fetchall()
        return sum(r[0] for r in rows) / len(rows) if rows else None

    def accuracy_series(self, version: str) -> list[tuple[float, float]]:
        """(time, accuracy) of every labeled measurement of ``version``, oldest first."""
        return [(t, a) for t, a in self._db.execute(
            "SELECT time, accuracy FROM measurements WHERE version = ? AND accuracy IS NOT NULL ORDER BY time",
            (version,))]

    def drift(self, version: str, *, since: float | None = None) -> float | None:
        """:func:`drift` of ``version``'s served inputs against its release's reference (None: unknown)."""
        release = self.release(version)
        return drift(self.totals(version, since=since), None if release is None else release["reference"])

    def span(self, version: str) -> tuple[float, float] | None:
        """The first window's start and the last window's end of ``version`` (None: no window)."""
        row = self._db.execute("SELECT MIN(start), MAX(end) FROM windows WHERE version = ?", (version,)).fetchone()
        return None if row[0] is None else (float(row[0]), float(row[1]))


def series(store: TelemetryStore, *, points: int = 24) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per version, time series of what its devices served, over the span of every stored window cut into
    ``points`` equal steps (a step's point is at its end; steps with no window ending in them are left out):
    ``calls`` per second (:attr:`Totals.calls_per_second`), ``error_rate``, ``p50_s``, ``p99_s``, ``drift_psi``
    (of that step's windows), and each labeled ``accuracy`` measurement."""
    spans = [s for v in store.versions() if (s := store.span(v)) is not None]
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    if not spans:
        return out
    first, last = min(s[0] for s in spans), max(s[1] for s in spans)
    step = max((last - first) / points, 1e-3)
    for version in store.versions():
        release = store.release(version)
        lines: dict[str, list[tuple[float, float]]] = {k: [] for k in ("calls", "error_rate", "p50_s", "p99_s",
                                                                      "drift_psi")}
        for index in range(points):
            low, high = first + index * step, (last if index == points - 1 else first + (index + 1) * step)
            t = store.totals(version, since=low if index else low - 1.0, until=high)
            if not t.windows:
                continue
            values = {"calls": t.calls_per_second, "error_rate": t.error_rate, "p50_s": quantile(t.latency_counts, 0.5),
                      "p99_s": quantile(t.latency_counts, 0.99),
                      "drift_psi": drift(t, None if release is None else release["reference"])}
            for key, value in values.items():
                if value is not None:
                    lines[key].append((high, value))
        lines["accuracy"] = store.accuracy_series(version)
        out[version] = lines
    return out
