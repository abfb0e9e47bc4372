"""The fleet's pictures: ``fleet.png`` (:func:`plot_status`, each version's devices and measurements now) and
``serving.png`` (:func:`plot_serving`, what each version served over time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_status(summary: dict[str, Any], path: Path) -> Path:
    """Per version: devices serving it, accuracy (bar: mean over devices; dots: each device), worst p99
    latency and error rate; a broken release shows as a low accuracy bar however healthy its latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    versions = summary["versions"]
    names = [f"{k[:8]}\nrelease {v['release']:g}" if v["release"] is not None and v["release"] >= 0 else k[:8]
             for k, v in versions.items()]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    panels = [("nodes", "devices serving it"), ("accuracy", "accuracy on the devices' data (%)"),
              ("p99_ms", "worst p99 latency (ms)"), ("error_rate", "error rate")]
    for ax, (key, title) in zip(axes, panels):
        values = [v[key] or 0 for v in versions.values()]
        ax.bar(names, values, color="#4c72b0")
        if key == "accuracy":
            for i, entry in enumerate(versions.values()):
                dots = [d["accuracy"] for d in entry["devices"] if d["accuracy"] is not None]
                ax.scatter([i] * len(dots), dots, color="#dd8452", zorder=3, s=18, label="a device" if i == 0 else None)
            ax.set_ylim(0, 100)
            if any(entry["devices"] for entry in versions.values()):
                ax.legend(fontsize=7, loc="lower right")
        else:
            ax.set_ylim(0, max([*values, 0.05 if key == "error_rate" else 1]) * 1.15)
        if key == "nodes":
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"fleet: {len(summary['nodes'])} device(s)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SERVING_PANELS = (("calls", "served calls / s"), ("error_rate", "error rate"), ("p50_s", "p50 latency (ms)"),
                  ("p99_s", "p99 latency (ms)"), ("accuracy", "accuracy on the devices' data (%)"),
                  ("drift_psi", "input drift (PSI)"))
"""The panels of ``serving.png``: series key (:func:`edgekit.fleet.telemetry.series`) and title."""


def plot_serving(database: str | Path, path: Path) -> Path:
    """Time series per version of what the fleet served (:func:`edgekit.fleet.telemetry.series`): volume, error
    rate, p50/p99 latency, the devices' accuracy measurements and input drift with its threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgekit.fleet.telemetry import DRIFT_THRESHOLD, TelemetryStore, series

    store = TelemetryStore(database) if Path(database).is_file() else TelemetryStore(":memory:")
    try:
        lines = series(store)
    finally:
        store.close()
    fig, axes = plt.subplots(2, 3, figsize=(14, 6.2), sharex=True)
    start = min((p[0] for v in lines.values() for s in v.values() for p in s), default=0.0)
    for ax, (key, title) in zip(axes.flat, SERVING_PANELS):
        scale = 1000.0 if key in ("p50_s", "p99_s") else 1.0
        for version, data in lines.items():
            points = data[key]
            if points:
                ax.plot([(t - start) / 60 for t, _ in points], [v * scale for _, v in points], marker="o",
                        markersize=3, label=version[:8])
        if key == "drift_psi":
            ax.axhline(DRIFT_THRESHOLD, color="#c44e52", linestyle="--", linewidth=1, label="drift threshold")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("minutes since the first window")
    fig.suptitle(f"fleet serving telemetry: {len(lines)} version(s)" if lines else "no serving telemetry yet",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
