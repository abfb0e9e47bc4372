"""Canary rollouts of signed releases over a served fleet, and fleet status.

A rollout sends the release (its bytes, in a Flower message) to a canary fraction of the connected
devices. Each verifies, installs atomically, smoke-tests and measures it against the version it served
before, on its own data (:mod:`device_agents.fleet.agent`). The canary passes when every canary device installed
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
from edgekit.fleet.telemetry import DRIFT_THRESHOLD, Totals, quantile


@dataclass(frozen=True)
class Gates:
    """What every canary device must show, each on its own measurement (one vote per device, never a mean
    weighted by what devices report). ``max_error_rate``: failed inferences / inferences; ``max_p99_ms``:
    p99 latency; ``min_accuracy``: accuracy (%) on the device's labeled data; ``max_accuracy_drop``: points
    lost against the version the same device served before (None: off, e.g. for the first release of a new
    model family, whose predecessor answered another task); ``quorum``: the fraction of credible canary
    devices that must pass every gate (1.0: all; a device whose numbers are impossible has no vote).

    A bake (:class:`RolloutConfig` ``bake``) judges what each of the stage's devices served of the release
    meanwhile, one vote per device and ``quorum`` again: ``max_error_rate`` and ``max_p99_ms`` on its served
    calls, and ``max_drift_psi``:
    the population stability index of the served inputs against the release's reference (None: not judged)."""

    max_error_rate: float = 0.0
    max_p99_ms: float | None = None
    min_accuracy: float | None = None
    max_accuracy_drop: float | None = 2.0
    quorum: float = 1.0
    max_drift_psi: float | None = DRIFT_THRESHOLD

    def __post_init__(self) -> None:
        checks = {"max_error_rate": (self.max_error_rate, 0.0, 1.0), "max_p99_ms": (self.max_p99_ms, 0.0, 1e7),
                  "min_accuracy": (self.min_accuracy, 0.0, 100.0),
                  "max_accuracy_drop": (self.max_accuracy_drop, 0.0, 100.0), "quorum": (self.quorum, 0.5, 1.0),
                  "max_drift_psi": (self.max_drift_psi, 0.0, 100.0)}
        for name, (value, low, high) in checks.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or not low <= value <= high):
                raise InputError(f"gate {name} = {value!r} must be a number from {low:g} to {high:g}")

    def device_failures(self, row: dict[str, Any]) -> dict[str, str]:
        """Gate name -> why one installed canary device's measurement fails it (empty: it passes them all)."""
        out = {}
        inferences, errors = row["inferences"], row["errors"]
        rate = errors / inferences if inferences > 0 else 1.0
        if rate > self.max_error_rate:
            out["max_error_rate"] = f"error rate {rate:.3f} > {self.max_error_rate:g}"
        if self.max_p99_ms is not None and row["p99_ms"] > self.max_p99_ms:
            out["max_p99_ms"] = f"p99 latency {row['p99_ms']:.2f} ms > {self.max_p99_ms:g} ms"
        if self.min_accuracy is not None and 0 <= row["accuracy"] < self.min_accuracy:
            out["min_accuracy"] = f"accuracy {row['accuracy']:.1f}% < {self.min_accuracy:g}%"
        before, now = row["previous_accuracy"], row["accuracy"]
        if self.max_accuracy_drop is not None and before >= 0 and now >= 0 and before - now > self.max_accuracy_drop:
            out["max_accuracy_drop"] = (f"accuracy fell {before - now:.1f} points ({before:.1f}% -> {now:.1f}%) > "
                                        f"{self.max_accuracy_drop:g}")
        return out


def implausible(row: dict[str, Any]) -> str | None:
    """Why a device's measurement cannot be true (None: it can): more samples or inferences than the protocol
    asks, more errors than inferences, an accuracy its own error count rules out, inferences without a latency
    (which would dodge the latency gate), p99 below p50. The
    measurement of the version served before is held to the same rules."""
    for prefix, what in (("", "measurement"), ("previous_", "previous version's measurement")):
        reason = _impossible({key: row[prefix + key] for key in ("inferences", "errors", "accuracy", "samples",
                                                                  "p50_ms", "p99_ms")})
        if reason is not None:
            return f"{what}: {reason}"
    return None


def _impossible(m: dict[str, float]) -> str | None:
    from device_agents.protocol import MAX_SAMPLES

    inferences, errors, accuracy = m["inferences"], m["errors"], m["accuracy"]
    if m["samples"] > MAX_SAMPLES or inferences > MAX_SAMPLES:
        return f"{max(m['samples'], inferences):g} samples, more than the {MAX_SAMPLES} the protocol asks for"
    if inferences >= 0 and errors > max(inferences, 1):  # a model that does not load: 0 inferences, 1 error
        return f"{errors:g} errors in {inferences:g} inferences"
    if accuracy > 100 or (accuracy >= 0 and (inferences <= 0 or m["samples"] <= 0)):
        return f"accuracy {accuracy:g}% from {inferences:g} inferences"
    if accuracy >= 0 and accuracy > 100.0 * (inferences - max(errors, 0.0)) / inferences + 0.05:
        return f"accuracy {accuracy:g}% is more than {inferences:g} inferences with {errors:g} errors can give"
    if inferences > 0 and (m["p50_ms"] < 0 or m["p99_ms"] < 0):  # it ran them, so it timed them
        return f"{inferences:g} inferences without a latency"
    if m["p50_ms"] >= 0 and 0 <= m["p99_ms"] < m["p50_ms"]:
        return f"p99 {m['p99_ms']:g} ms below p50 {m['p50_ms']:g} ms"
    return None


def canary_verdict(rows: list[dict[str, Any]], gates: Gates) -> dict[str, Any]:
    """Each canary device's vote, and why the canary fails (``failures`` empty: it passes).

    A device that did not install the release fails the canary. A device whose numbers are impossible
    (:func:`implausible`) is reported and has no vote. The canary passes when at least ``quorum`` of the
    credible devices (and at least one) pass every gate, and, with ``min_accuracy``, one of them had labels.
    Each failure names one failing device's number and how many devices failed that gate."""
    votes, refused = [], []
    for row in rows:
        vote: dict[str, Any] = {"node": row["node"], "installed": bool(row["ok"]), "dropped": "", "failures": {}}
        if not row["ok"]:
            refused.append(row["reason"] or "failed")
        elif (reason := implausible(row)) is not None:
            vote["dropped"] = reason
        else:
            vote["failures"] = gates.device_failures(row)
            vote["labeled"] = row["accuracy"] >= 0
        votes.append(vote)
    credible = [v for v in votes if v["installed"] and not v["dropped"]]
    passed = [v for v in credible if not v["failures"]]
    failures = []
    if refused:
        failures.append(f"{len(refused)} of {len(rows)} canary node(s) did not install it "
                        f"({'; '.join(sorted(set(refused)))[:300]})")
    if not credible and not refused:
        failures.append(f"no canary device reported a credible measurement ({len(rows)} dropped)")
    elif credible and len(passed) < max(1, math.ceil(gates.quorum * len(credible) - 1e-9)):
        for gate in ("max_error_rate", "max_p99_ms", "min_accuracy", "max_accuracy_drop"):
            failed = [v["failures"][gate] for v in credible if gate in v["failures"]]
            if failed:
                failures.append(f"{failed[0]} on {len(failed)} of {len(credible)} canary device(s)")
    if gates.min_accuracy is not None and credible and not any(v["labeled"] for v in credible):
        failures.append("no canary device has labeled data to measure accuracy on")
    return {"votes": votes, "credible": len(credible), "passed": len(passed), "failures": failures,
            "dropped": [{"node": v["node"], "reason": v["dropped"]} for v in votes if v["dropped"]]}


def bake_verdict(served: dict[int, Totals], gates: Gates, reference: dict | None) -> dict[str, Any]:
    """What each of a stage's devices served of the release during a bake (``served``: node -> its windows since
    the stage began) against ``gates``, one vote per device as in the canary: a device that claims a flood of
    error-free calls cannot dilute another's errors. The bake fails when fewer than ``quorum`` of the devices
    that served (and at least one) pass every gate; ``failures`` names each failing gate with one device's number
    and how many failed it. A device that served nothing has no vote; no served call at all is no evidence
    against the release: it passes, and ``line`` says so."""
    from edgekit.fleet.telemetry import drift

    devices = []
    for node, totals in sorted(served.items()):
        p99, psi = quantile(totals.latency_counts, 0.99), drift(totals, reference)
        device: dict[str, Any] = {"node": node, "calls": totals.calls, "errors": totals.errors,
                                  "samples": totals.samples, "error_rate": totals.error_rate, "p99_s": p99,
                                  "drift_psi": psi, "failures": {}}
        if totals.calls:
            device["failures"] = _served_failures(totals, p99, psi, gates)
        devices.append(device)
    voters = [d for d in devices if d["calls"]]
    calls, errors = sum(d["calls"] for d in devices), sum(d["errors"] for d in devices)
    evidence: dict[str, Any] = {"devices": devices, "nodes": len(voters), "calls": calls, "errors": errors,
                                "samples": sum(d["samples"] for d in devices),
                                "error_rate": errors / calls if calls else None, "failures": []}
    if not voters:
        evidence["line"] = "no served call of the release was collected (nothing to judge)"
        return evidence
    passed = [d for d in voters if not d["failures"]]
    if len(passed) < max(1, math.ceil(gates.quorum * len(voters) - 1e-9)):
        for gate in ("max_error_rate", "max_p99_ms", "max_drift_psi"):
            failed = [d["failures"][gate] for d in voters if gate in d["failures"]]
            if failed:
                evidence["failures"].append(f"{failed[0]} on {len(failed)} of {len(voters)} device(s) during the "
                                            "bake")
    worst_p99 = max((d["p99_s"] for d in voters if d["p99_s"] is not None), default=None)
    evidence["line"] = (f"{calls} calls on {len(voters)} device(s), {len(passed)} passed every gate, error rate "
                        f"{errors / calls:.3f}" + (f", worst p99 {1000 * worst_p99:.2f} ms" if worst_p99 else ""))
    return evidence


def _served_failures(totals: Totals, p99: float | None, psi: float | None, gates: Gates) -> dict[str, str]:
    """Gate name -> why what one device served fails it."""
    out = {}
    if totals.error_rate > gates.max_error_rate:
        out["max_error_rate"] = (f"served error rate {totals.error_rate:.3f} > {gates.max_error_rate:g} "
                                 f"({totals.errors} of {totals.calls} calls)")
    if gates.max_p99_ms is not None and p99 is not None and 1000 * p99 > gates.max_p99_ms:
        out["max_p99_ms"] = f"served p99 latency {1000 * p99:.2f} ms > {gates.max_p99_ms:g} ms"
    if gates.max_drift_psi is not None and psi is not None and psi > gates.max_drift_psi:
        out["max_drift_psi"] = f"served inputs drifted: PSI {psi:.3f} > {gates.max_drift_psi:g}"
    return out


MAX_STAGES = 10
MAX_BAKE_SECONDS = 86_400.0


@dataclass(frozen=True)
class RolloutConfig:
    """``canary``: fraction of the connected devices that get the release first (at least one), chosen at
    random for each rollout (``seed``: None draws from the OS, so no device knows in advance it will be in the
    canary; a number makes the choice repeatable); ``min_nodes``: wait (up to ``wait`` s) for this many
    devices; ``timeout``: seconds per step.

    ``stages``: cumulative fractions of the devices, increasing, the last 1 (e.g. ``(0.1, 0.5, 1.0)``): each
    stage is gated like a canary, and on what its devices served during the ``bake`` (seconds; 0: no bake); a
    failed gate rolls every stage back. Without stages, the canary is gated (and baked) and then every other
    device gets the release."""

    canary: float = 0.25
    gates: Gates = field(default_factory=Gates)
    min_nodes: int = 1
    wait: float = 30.0
    timeout: float = 300.0
    seed: int | None = None
    stages: tuple[float, ...] = ()
    bake: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.canary <= 1:
            raise InputError(f"canary fraction {self.canary} must be more than 0 and at most 1")
        if self.min_nodes < 1 or not 0 <= self.wait <= 3600 or not 1 <= self.timeout <= 86_400:
            raise InputError("min_nodes must be at least 1, wait 0-3600 s and timeout 1-86400 s")
        if not (isinstance(self.bake, (int, float)) and not isinstance(self.bake, bool)
                and 0 <= self.bake <= MAX_BAKE_SECONDS):
            raise InputError(f"bake {self.bake!r} must be 0 to {MAX_BAKE_SECONDS:g} seconds")
        if self.stages:
            stages = list(self.stages)
            if (len(stages) > MAX_STAGES or any(not isinstance(f, (int, float)) or isinstance(f, bool)
                                                or not math.isfinite(f) for f in stages)
                    or any(not 0 < f <= 1 for f in stages) or stages != sorted(set(stages)) or stages[-1] != 1):
                raise InputError(f"stages {tuple(self.stages)} must be at most {MAX_STAGES} increasing fractions "
                                 "of the devices, more than 0, the last 1 (e.g. 0.1, 0.5, 1)")

    @property
    def seconds(self) -> float:
        """The longest the rollout may take: waiting for devices, each stage's install, bake and collection, and
        a rollback."""
        steps = len(self.stages) or 2
        return self.wait + steps * (2 * self.timeout + self.bake) + self.timeout + 120


def _check_release(folder: Path) -> None:
    from device_agents.serving.integrity import check_folder
    from device_agents.store.release import RELEASE

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
    from edgekit.federated.submit import submit_job

    config = config or RolloutConfig()
    folder = Path(release).absolute()
    _check_release(folder)
    spec = {**asdict(config), "release": str(keep_release(fleet, folder)), "database": str(database(fleet))}
    result = submit_job(fleet, "rollout", spec, timeout=config.seconds, log=log)
    (Path(result["job"]) / "rollout.json").write_text(json.dumps(result, indent=2))
    if result["status"] == "error":
        from edgekit.errors import FederationError

        raise FederationError(f"the rollout job failed: {result['reason']}")
    if result["status"] != "complete":
        raise RolloutError(f"rollout {result['status']}: {result['reason']}", result)
    return result


TELEMETRY_DATABASE = "telemetry.sqlite"
"""The fleet's database (serving telemetry, releases, device states), in its folder
(:class:`edgekit.fleet.telemetry.TelemetryStore`)."""
RELEASES = "releases"
"""The fleet folder's copies of the releases rolled out (``releases/<release id>/``): what a device that converges
later is sent, whatever became of the folder the operator rolled out."""


def database(fleet: str | Path) -> Path:
    """The fleet database's path in the fleet folder ``fleet``."""
    return Path(fleet).resolve() / TELEMETRY_DATABASE


def keep_release(fleet: str | Path, folder: Path) -> Path:
    """The fleet's own copy of the release ``folder`` (made once, atomically): ``releases/<release id>``."""
    import hashlib
    import shutil
    import tempfile

    from device_agents.store.release import RELEASE
    from edgekit.fleet.jobs import release_files

    files = release_files(folder)
    kept = Path(fleet).resolve() / RELEASES / hashlib.sha256(files[RELEASE]).hexdigest()[:16]
    if kept.is_dir():
        return kept
    kept.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{kept.name}.", dir=kept.parent))
    try:
        for name, data in files.items():
            (partial / name).write_bytes(data)
        partial.rename(kept)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return kept


def converge(fleet: str | Path, *, timeout: float = 300.0, log: Any = print) -> dict[str, Any]:
    """One convergence pass (the job :func:`edgekit.fleet.jobs.converge_job`): every connected device that does not
    serve the desired release (the last one rolled out past its canary) is sent it. ``fleet serve`` runs one every
    :attr:`~edgekit.fleet.watch.WatchConfig.converge_every` seconds.

    >>> converge("fleet")["devices"]                                          # doctest: +SKIP
    [{'node': '5123...', 'version': '9f2c...', 'state': 'converged', ...}]
    """
    from edgekit.federated.submit import submit_job

    return submit_job(fleet, "converge", {"timeout": timeout, "min_nodes": 1, "wait": 5.0,
                                          "database": str(database(fleet))}, timeout=timeout * 2 + 120, log=log)


def collect(fleet: str | Path, *, timeout: float = 120.0, log: Any = print) -> dict[str, Any]:
    """Collect every connected device's serving telemetry into the fleet's database (the job
    :func:`edgekit.fleet.jobs.collect_job`)."""
    from edgekit.federated.submit import submit_job

    return submit_job(fleet, "collect", {"timeout": timeout, "min_nodes": 1, "wait": 5.0,
                                         "database": str(database(fleet))},
                      timeout=timeout + 120, log=log)


def serving_summary(fleet: str | Path) -> dict[str, Any]:
    """Per version, what the devices served as their telemetry says: windows, nodes, calls, samples, errors,
    error rate, p50/p99 latency (seconds) over every window stored, the mean of the devices' latest accuracy
    measurements, and ``drift_psi`` against the release's reference (``drifted``: past
    :data:`~edgekit.fleet.telemetry.DRIFT_THRESHOLD`)."""
    from edgekit.fleet.telemetry import DRIFT_THRESHOLD, TelemetryStore, quantile

    path = database(fleet)
    if not path.is_file():
        return {}
    store = TelemetryStore(path)
    try:
        summary = {}
        for version in store.versions():
            t = store.totals(version)
            psi = store.drift(version)
            summary[version] = {"windows": t.windows, "nodes": t.nodes, "calls": t.calls, "samples": t.samples,
                                "errors": t.errors, "error_rate": t.error_rate,
                                "p50_s": quantile(t.latency_counts, 0.5), "p99_s": quantile(t.latency_counts, 0.99),
                                "accuracy": store.accuracy(version), "drift_psi": psi,
                                "drifted": psi is not None and psi > DRIFT_THRESHOLD}
        return summary
    finally:
        store.close()


def fleet_state(fleet: str | Path) -> dict[str, Any]:
    """The desired release (None before a rollout completed) and each device seen, with its state against it."""
    from edgekit.fleet.telemetry import TelemetryStore

    path = database(fleet)
    if not path.is_file():
        return {"desired": None, "devices": []}
    store = TelemetryStore(path)
    try:
        desired = store.desired()
        return {"desired": None if desired is None else {k: desired[k] for k in ("release_id", "release")},
                "devices": store.devices()}
    finally:
        store.close()


def fleet_status(fleet: str | Path, out: str | Path | None = None, *, timeout: float = 120.0,
                 log: Any = print) -> dict[str, Any]:
    """Collect the devices' serving telemetry (:func:`collect`), then ask every connected device for its versions
    and a measurement; write ``fleet.json`` (``nodes``, ``versions``, ``serving``: :func:`serving_summary`,
    ``desired`` and ``devices``: :func:`fleet_state`), ``fleet.png`` (the devices' measurements per version) and
    ``serving.png`` (:func:`~edgekit.fleet.plots.plot_serving`, served telemetry over time) to ``out`` (default:
    the fleet's ``status/``)."""
    from edgekit.errors import EdgeKitError
    from edgekit.federated.submit import submit_job
    from edgekit.fleet.plots import plot_serving, plot_status

    try:
        collect(fleet, timeout=timeout, log=log)
    except EdgeKitError as exc:  # the status is still worth having; the telemetry waits for the next collection
        log(f"telemetry not collected: {exc}")
    result = submit_job(fleet, "status", {"timeout": timeout, "min_nodes": 1, "wait": 5.0,
                                          "database": str(database(fleet))}, timeout=timeout + 120, log=log)
    target = Path(out) if out is not None else Path(fleet) / "status"
    target.mkdir(parents=True, exist_ok=True)
    summary = {"nodes": result.get("nodes", []), "versions": _by_version(result.get("nodes", [])),
               "serving": serving_summary(fleet), **fleet_state(fleet)}
    (target / "fleet.json").write_text(json.dumps(summary, indent=2))
    plot_status(summary, target / "fleet.png")
    plot_serving(database(fleet), target / "serving.png")
    return {**summary, "out": str(target)}


def _by_version(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per version served: devices, inferences and errors, worst p99, and accuracy (each device once: the
    mean and the lowest of the devices with labels, and each device's own figure and sample count)."""
    versions: dict[str, Any] = {}
    for row in rows:
        if not row["ok"]:
            continue
        key = row["version_id"] or "none"
        entry = versions.setdefault(key, {"release": row.get("release"), "nodes": 0, "inferences": 0.0,
                                          "errors": 0.0, "p99_ms": [], "devices": []})
        entry["nodes"] += 1
        entry["inferences"] += max(0.0, row["inferences"])
        entry["errors"] += max(0.0, row["errors"])
        if row["p99_ms"] >= 0:
            entry["p99_ms"].append(row["p99_ms"])
        entry["devices"].append({"node": row["node"], "accuracy": row["accuracy"] if row["accuracy"] >= 0 else None,
                                 "samples": row["samples"] if row["samples"] >= 0 else None})
    for entry in versions.values():
        entry["error_rate"] = entry["errors"] / entry["inferences"] if entry["inferences"] else None
        entry["p99_ms"] = max(entry["p99_ms"]) if entry["p99_ms"] else None
        labeled = [d["accuracy"] for d in entry["devices"] if d["accuracy"] is not None]
        entry["accuracy"] = sum(labeled) / len(labeled) if labeled else None
        entry["min_accuracy"] = min(labeled) if labeled else None
    return versions
