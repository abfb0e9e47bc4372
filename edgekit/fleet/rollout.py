"""Canary rollouts of signed releases over a served fleet, and fleet status.

A rollout sends the release (its bytes, in a Flower message) to a canary fraction of the connected
devices. Each verifies, installs atomically, smoke-tests and measures it against the version it served
before, on its own data (:mod:`device_agents.fleet`). The canary passes when every canary device installed
it and the aggregates meet :class:`Gates`; the release then goes to every other device. Otherwise the
canary devices roll back and :class:`RolloutError` says which gate failed, with the numbers.

>>> result = rollout("fleet", "out", RolloutConfig(canary=0.25, gates=Gates(min_accuracy=90)))  # doctest: +SKIP
>>> fleet_status("fleet", "fleet/status")                                                         # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from device_agents.errors import AgentError
from edgekit.errors import InputError, RolloutError


@dataclass(frozen=True)
class Gates:
    """What the canary must show. ``max_error_rate``: failed inferences / inferences; ``max_p99_ms``: the
    worst canary device's p99 latency; ``min_accuracy``: accuracy (%) on the devices' labeled data;
    ``max_accuracy_drop``: points lost against the version the same devices served before (None: off)."""

    max_error_rate: float = 0.0
    max_p99_ms: float | None = None
    min_accuracy: float | None = None
    max_accuracy_drop: float | None = 2.0

    def __post_init__(self) -> None:
        checks = {"max_error_rate": (self.max_error_rate, 0.0, 1.0), "max_p99_ms": (self.max_p99_ms, 0.0, 1e7),
                  "min_accuracy": (self.min_accuracy, 0.0, 100.0),
                  "max_accuracy_drop": (self.max_accuracy_drop, 0.0, 100.0)}
        for name, (value, low, high) in checks.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or not low <= value <= high):
                raise InputError(f"gate {name} = {value!r} must be a number from {low:g} to {high:g}")

    def failures(self, summary: dict[str, Any]) -> list[str]:
        """Why the canary fails (empty: it passes), each with the measured number and the limit."""
        out = []
        if summary["installed"] < summary["nodes"]:
            out.append(f"{summary['nodes'] - summary['installed']} of {summary['nodes']} canary node(s) did not "
                       f"install it ({'; '.join(summary['refusals'])[:300]})")
        if summary["error_rate"] is not None and summary["error_rate"] > self.max_error_rate:
            out.append(f"error rate {summary['error_rate']:.3f} > {self.max_error_rate:g}")
        if self.max_p99_ms is not None and summary["p99_ms"] is not None and summary["p99_ms"] > self.max_p99_ms:
            out.append(f"p99 latency {summary['p99_ms']:.2f} ms > {self.max_p99_ms:g} ms")
        if self.min_accuracy is not None:
            if summary["accuracy"] is None:
                out.append("no canary device has labeled data to measure accuracy on")
            elif summary["accuracy"] < self.min_accuracy:
                out.append(f"accuracy {summary['accuracy']:.1f}% < {self.min_accuracy:g}%")
        before, now = summary["previous_accuracy"], summary["accuracy_same_nodes"]
        if self.max_accuracy_drop is not None and before is not None and now is not None \
                and before - now > self.max_accuracy_drop:
            out.append(f"accuracy fell {before - now:.1f} points ({before:.1f}% -> {now:.1f}%) > "
                       f"{self.max_accuracy_drop:g}")
        return out


@dataclass(frozen=True)
class RolloutConfig:
    """``canary``: fraction of the connected devices that get the release first (at least one);
    ``min_nodes``: wait (up to ``wait`` s) for this many devices; ``timeout``: seconds per step."""

    canary: float = 0.25
    gates: Gates = field(default_factory=Gates)
    min_nodes: int = 1
    wait: float = 30.0
    timeout: float = 300.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.canary <= 1:
            raise InputError(f"canary fraction {self.canary} must be more than 0 and at most 1")
        if self.min_nodes < 1 or not 0 <= self.wait <= 3600 or not 1 <= self.timeout <= 86_400:
            raise InputError("min_nodes must be at least 1, wait 0-3600 s and timeout 1-86400 s")


def _check_release(folder: Path) -> None:
    from device_agents.integrity import check_folder
    from device_agents.release import RELEASE

    if not (folder / RELEASE).is_file():
        raise InputError(f"{folder} is not a signed release (no {RELEASE}); sign it first")
    try:
        check_folder(folder)
    except AgentError as exc:
        raise InputError(f"cannot roll out {folder}: {exc}") from None


def rollout(fleet: str | Path, release: str | Path, config: RolloutConfig | None = None, *,
            log: Any = print) -> dict[str, Any]:
    """Roll ``release`` (a signed folder) out to the served ``fleet``; the result is also written to the
    job folder as ``rollout.json``. Raises :class:`RolloutError` when the canary stops it."""
    from edgekit.fleet.serve import submit_job

    config = config or RolloutConfig()
    folder = Path(release).absolute()
    _check_release(folder)
    spec = {**asdict(config), "release": str(folder)}
    result = submit_job(fleet, "rollout", spec, timeout=config.wait + 4 * config.timeout + 120, log=log)
    (Path(result["job"]) / "rollout.json").write_text(json.dumps(result, indent=2))
    if result["status"] == "error":
        from edgekit.errors import FederationError

        raise FederationError(f"the rollout job failed: {result['reason']}")
    if result["status"] != "complete":
        raise RolloutError(f"rollout {result['status']}: {result['reason']}", result)
    return result


def fleet_status(fleet: str | Path, out: str | Path | None = None, *, timeout: float = 120.0,
                 log: Any = print) -> dict[str, Any]:
    """Ask every connected device for its versions and a measurement; write ``fleet.json`` and
    ``fleet.png`` to ``out`` (default: the fleet's ``status/``)."""
    from edgekit.fleet.serve import submit_job

    result = submit_job(fleet, "status", {"timeout": timeout, "min_nodes": 1, "wait": 5.0}, timeout=timeout + 120,
                        log=log)
    target = Path(out) if out is not None else Path(fleet) / "status"
    target.mkdir(parents=True, exist_ok=True)
    summary = {"nodes": result.get("nodes", []), "versions": _by_version(result.get("nodes", []))}
    (target / "fleet.json").write_text(json.dumps(summary, indent=2))
    plot_status(summary, target / "fleet.png")
    return {**summary, "out": str(target)}


def _by_version(rows: list[dict[str, Any]]) -> dict[str, Any]:
    versions: dict[str, Any] = {}
    for row in rows:
        if not row["ok"]:
            continue
        key = row["version_id"] or "none"
        entry = versions.setdefault(key, {"release": row.get("release"), "nodes": 0, "inferences": 0.0,
                                          "errors": 0.0, "p99_ms": []})
        entry["nodes"] += 1
        entry["inferences"] += max(0.0, row["inferences"])
        entry["errors"] += max(0.0, row["errors"])
        if row["p99_ms"] >= 0:
            entry["p99_ms"].append(row["p99_ms"])
    for entry in versions.values():
        entry["error_rate"] = entry["errors"] / entry["inferences"] if entry["inferences"] else None
        entry["p99_ms"] = max(entry["p99_ms"]) if entry["p99_ms"] else None
    return versions


def plot_status(summary: dict[str, Any], path: Path) -> Path:
    """Nodes per version, worst p99 latency and error rate per version, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = summary["versions"]
    names = [f"{k[:8]}\nrelease {v['release']:g}" if v["release"] is not None and v["release"] >= 0 else k[:8]
             for k, v in versions.items()]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    panels = [("nodes", "devices serving it"), ("p99_ms", "worst p99 latency (ms)"), ("error_rate", "error rate")]
    for ax, (key, title) in zip(axes, panels):
        values = [v[key] or 0 for v in versions.values()]
        ax.bar(names, values, color="#4c72b0")
        ax.set_ylim(0, max([*values, 0.05 if key == "error_rate" else 1]) * 1.15)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"fleet: {len(summary['nodes'])} device(s)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
