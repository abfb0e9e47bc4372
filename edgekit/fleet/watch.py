"""What a served fleet does on its own: convergence passes, telemetry collections and ``/metrics``.

``fleet serve`` runs, in a background thread, a convergence pass (:func:`edgekit.fleet.rollout.converge`) every
``converge_every`` seconds, so a device that was offline at a rollout or joins later installs the desired release
when it connects, and a telemetry collection (:func:`edgekit.fleet.rollout.collect`) every ``collect_every``
seconds. Jobs run one at a time on the fleet (a lock in its ``jobs/`` folder): an operator's rollout waits for a
pass and a pass for a rollout. A failed pass is logged (``logs/watch.log``) and tried again at the next tick.
With ``metrics``, Prometheus text exposition of the fleet database is served (:mod:`edgekit.fleet.metrics`).

>>> WatchConfig(collect_every=60.0, converge_every=None).converge_every is None
True
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import InputError
from edgekit.fleet.metrics import MetricsAddress, MetricsServer

MIN_PERIOD = 5.0
MAX_PERIOD = 86_400.0


@dataclass(frozen=True)
class WatchConfig:
    """``converge_every`` / ``collect_every``: seconds between convergence passes / telemetry collections (None:
    never); ``metrics``: where to serve ``/metrics`` (None: not served)."""

    converge_every: float | None = 60.0
    collect_every: float | None = 300.0
    metrics: MetricsAddress | None = None

    def __post_init__(self) -> None:
        for name in ("converge_every", "collect_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or not MIN_PERIOD <= value <= MAX_PERIOD):
                raise InputError(f"{name} = {value!r} must be {MIN_PERIOD:g} to {MAX_PERIOD:g} seconds")


class Watcher:
    """The background thread of :class:`WatchConfig` over the served fleet in ``folder``; :meth:`stop` ends it
    (after the job in progress)."""

    def __init__(self, folder: Path, config: WatchConfig, *, log: Callable[[str], Any] | None = None) -> None:
        from edgekit.fleet.rollout import database

        self.folder, self.config = folder, config
        self._log_file = folder / "logs" / "watch.log"
        self._echo = log
        self._stop = threading.Event()
        self.metrics = MetricsServer(database(folder), config.metrics) if config.metrics is not None else None
        self._thread = threading.Thread(target=self._run, name="edgekit-fleet-watch", daemon=True)
        self.passes = {"converge": 0, "collect": 0}

    def start(self) -> Watcher:
        if self.config.converge_every is not None or self.config.collect_every is not None:
            self._thread.start()
        return self

    def log(self, line: str) -> None:
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
        with open(self._log_file, "a") as out:
            out.write(stamped + "\n")
        if self._echo is not None:
            self._echo(line)

    def _run(self) -> None:
        from edgekit.fleet.rollout import collect, converge

        jobs = [(name, every, run) for name, every, run in
                (("converge", self.config.converge_every, converge), ("collect", self.config.collect_every, collect))
                if every is not None]
        due = {name: time.monotonic() + min(every, 10.0) for name, every, _ in jobs}
        while not self._stop.is_set():
            for name, every, run in jobs:
                if self._stop.is_set() or time.monotonic() < due[name]:
                    continue
                self._once(name, run)
                due[name] = time.monotonic() + every
            self._stop.wait(0.5)

    def _once(self, name: str, run: Callable[..., dict[str, Any]]) -> None:
        from edgekit.errors import EdgeKitError

        try:
            result = run(self.folder, log=self.log)
            self.passes[name] += 1
            if result.get("status") not in (None, "complete"):
                self.log(f"{name}: {result['status']}: {result.get('reason', '')}")
        except EdgeKitError as exc:  # the fleet keeps serving; the next tick tries again
            self.log(f"{name} failed: {exc}")

    def halt(self) -> None:
        """Start no new job."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=600)
        if self.metrics is not None:
            self.metrics.stop()
