"""Local telemetry: counts, errors, latency percentiles, model version, peak memory. Never data.

>>> t = Telemetry(model_version="3f2a...")     # doctest: +SKIP
>>> with t.measure(): model.predict(x)         # doctest: +SKIP
>>> t.write("telemetry.json")                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.files import write_atomic


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB.

    Linux: ``VmHWM`` of /proc/self/status (``ru_maxrss`` survives fork+exec, so a process started
    by a large parent would report the parent's peak). Elsewhere: ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class Telemetry:
    """Aggregates of inference calls; keeps the last ``window`` latencies for percentiles."""

    def __init__(self, *, model_version: str | None = None, window: int = 10_000) -> None:
        self.model_version = model_version
        self.count = 0
        self.errors = 0
        self.samples = 0
        self._latencies: deque[float] = deque(maxlen=window)
        self.started = time.time()

    @contextmanager
    def measure(self, samples: int = 1):  # noqa: ANN201
        start = time.perf_counter()
        try:
            yield
        except Exception:
            self.errors += 1
            raise
        else:
            self._latencies.append((time.perf_counter() - start) * 1000.0)
            self.count += 1
            self.samples += samples

    def snapshot(self) -> dict[str, Any]:
        lat = np.array(self._latencies) if self._latencies else None
        pct = {f"p{p}": (round(float(np.percentile(lat, p)), 4) if lat is not None else None) for p in (50, 90, 99)}
        return {"model_version": self.model_version, "inferences": self.count, "samples": self.samples,
                "errors": self.errors, "latency_ms": pct, "peak_rss_mib": round(peak_rss_mib(), 1),
                "uptime_s": round(time.time() - self.started, 1)}

    def write(self, path: str | Path) -> Path:
        """Write the snapshot as JSON (atomically: temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(path, (json.dumps(self.snapshot(), indent=2) + "\n").encode())
