"""Measure the source Keras model the way the agent is measured: run as its own process.

``python benchmarks/keras_probe.py MODEL X.npz [--repeats N]`` prints one JSON line: accuracy (when the
npz has ``y``), single-sample ``__call__`` latency percentiles, time from process start to the first
prediction, and peak RSS. Used by ``make demo`` and ``benchmarks/agent.py`` to compare with
``edgekit-agent``. A benchmark helper: it is not shipped in the edgekit-sdk wheel.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def _process_age() -> float:
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        return float(Path("/proc/uptime").read_text().split()[0]) - start
    except (OSError, ValueError, IndexError):
        return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    from device_agents.serving.telemetry import peak_rss_mib
    from edgekit.loading.models import load_model

    with np.load(args.data) as npz:
        x = npz["x"].astype(np.float32)
        y = npz["y"] if "y" in npz.files else None
    model = load_model(args.model).model
    model(x[:1], training=False)
    cold = _process_age()
    lat = []
    for i in range(args.repeats):
        sample = x[i % len(x): i % len(x) + 1]
        start = time.perf_counter()
        model(sample, training=False)
        lat.append((time.perf_counter() - start) * 1000)
    out = np.concatenate([np.asarray(model(x[i:i + 256], training=False)) for i in range(0, len(x), 256)])
    print(json.dumps({
        "accuracy": None if y is None else float(np.mean(out.argmax(1) == y) * 100),
        "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))},
        "cold_start_s": cold, "peak_rss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main()
