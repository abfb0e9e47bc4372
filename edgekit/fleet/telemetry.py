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
from pathlib import Path

import numpy as np

from device_agents.serving.stats import LATENCY_BUCKETS, ServingStats

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS windows (
    node TEXT NOT NULL,
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
    PRIMARY KEY (node, sequence)
);
CREATE INDEX IF NOT EXISTS windows_by_version ON windows (version, end);
"""
"""The telemetry database's tables: one row per window a device served (the lists as JSON text; a node id as
text: Flower's are unsigned 64-bit, past SQLite's signed INTEGER)."""

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
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    class_counts: list[int] = field(default_factory=list)
    edges: list[list[float]] | None = None
    bin_counts: list[list[int]] | None = None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.calls if self.calls else None


DRIFT_THRESHOLD = 0.25
"""The population stability index past which a version's served inputs are said to have drifted from the data
its release was calibrated on (0.1-0.25 is commonly read as a moderate shift, over 0.25 as a significant one)."""


def drift(totals: Totals, reference: dict | None) -> float | None:
    """The largest population stability index over the features of ``totals``' served inputs against the release's
    ``reference`` (its manifest's), or ``None`` when the windows were not binned in that reference's bins."""
    from device_agents.serving.stats import stability_index

    if (not reference or totals.bin_counts is None or totals.edges is None
            or totals.edges != reference.get("feature_edges")):
        return None
    shares = reference.get("feature_bin_frequencies") or []
    if len(shares) != len(totals.bin_counts):
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
            elif found[0] != str(SCHEMA_VERSION):
                raise ValueError(f"{self.path} holds telemetry schema {found[0]}; this edgekit reads "
                                 f"{SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def add(self, node: int, sequence: int, stats: ServingStats, *, now: float) -> str:
        """Store one window of ``node`` (its spool ``sequence``); "" when stored, else why not (implausible, or
        already stored)."""
        why = plausible(stats, now=now)
        if why:
            return why
        row = (str(node), sequence, stats.version, stats.start, stats.end, now, stats.calls, stats.samples,
               stats.errors, stats.latency_sum, json.dumps(stats.latency_counts), json.dumps(stats.class_counts),
               stats.feature_count, json.dumps(stats.feature_sum), json.dumps(stats.feature_sumsq),
               None if stats.edges is None else json.dumps(stats.edges),
               None if stats.bin_counts is None else json.dumps(stats.bin_counts))
        with self._db:
            cursor = self._db.execute(f"INSERT OR IGNORE INTO windows VALUES ({', '.join('?' * len(row))})", row)
        return "" if cursor.rowcount == 1 else "already stored"

    def last_sequence(self, node: int) -> int:
        """The newest sequence stored of ``node`` (0: none): what it may drain from its spool."""
        found = self._db.execute("SELECT MAX(sequence) FROM windows WHERE node = ?", (str(node),)).fetchone()[0]
        return int(found or 0)

    def versions(self) -> list[str]:
        return [v for (v,) in self._db.execute("SELECT DISTINCT version FROM windows ORDER BY version")]

    def totals(self, version: str, *, since: float | None = None) -> Totals:
        """Every stored window of ``version`` (ending after ``since``) summed; reference bins only where the
        windows share their edges."""
        rows = self._db.execute(
            "SELECT node, calls, samples, errors, latency_sum, latency_counts, class_counts, edges, bin_counts "
            "FROM windows WHERE version = ? AND end > ? ORDER BY end", (version, -1.0 if since is None else since))
        totals, nodes, edges = Totals(version), set(), None
        for node, calls, samples, errors, latency_sum, latency, classes, window_edges, bins in rows:
            totals.windows += 1
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
