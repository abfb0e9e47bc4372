"""The fleet's jobs: one Flower app, one job per run (``--run-config job=PATH``), run by
:func:`edgekit.federated.server_apps.job_server_app`.

:data:`ACTIONS` maps a job's ``action`` to its handler; each gets the Flower grid and the job, and
returns the JSON result written beside the job. Replies from devices are checked before use
(:func:`node_row`): exactly the protocol's metric names, finite numbers, short text.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from device_agents.errors import AgentError
from device_agents.files import read_bounded
from device_agents.protocol import FLEET_METRICS, MAX_RELEASE_BYTES, Query
from device_agents.store.release import RELEASE, release_number
from edgekit.federated.server_apps import report

MAX_TEXT = 300


def fleet_server_app() -> Any:
    """The ``flwr.serverapp.ServerApp`` of the fleet: runs the job named by the run config's ``job``."""
    from edgekit.federated.server_apps import job_server_app

    return job_server_app(ACTIONS)


def _nodes(grid: Any, job: dict[str, Any]) -> list[int]:
    from edgekit.federated.server_app import wait_for_nodes

    wait_for_nodes(grid, int(job.get("min_nodes", 1)), float(job.get("wait", 30)))
    return sorted(int(n) for n in grid.get_node_ids())


def node_row(node: int, reply: Any) -> dict[str, Any]:
    """One node's answer as a row: ``ok``, ``reason`` and the metrics, or a refusal of a malformed reply."""
    row: dict[str, Any] = {"node": node, "ok": False, "answered": False, "reason": "", "version_id": "",
                           "previous_id": ""}
    if reply is None or reply.has_error():
        row["reason"] = "no reply" if reply is None else f"error: {str(reply.error.reason)[:MAX_TEXT]}"
        return row
    content = reply.content
    metrics = content.get("metrics") if "metrics" in content.keys() else None
    text = content.get("text") if "text" in content.keys() else None
    if metrics is None or text is None or set(metrics.keys()) != set(FLEET_METRICS):
        row["reason"] = "malformed reply (not the fleet protocol's metrics)"
        return row
    values = dict(metrics.items())
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) < 1e12
               for v in values.values()):
        row["reason"] = "malformed reply (non-finite or out-of-range numbers)"
        return row
    strings = {k: v for k, v in text.items() if k in ("version-id", "previous-id", "reason") and isinstance(v, str)}
    row.update({k.replace("-", "_"): float(v) for k, v in values.items()})
    row.update({"ok": values["ok"] == 1.0, "answered": True, "reason": strings.get("reason", "")[:MAX_TEXT],
                "version_id": strings.get("version-id", "")[:32], "previous_id": strings.get("previous-id", "")[:32]})
    return row


def _ask(grid: Any, nodes: list[int], query: str, content: Any, timeout: float) -> list[dict[str, Any]]:
    from flwr.app import Message

    if not nodes:
        return []
    messages = [Message(content=content, message_type=f"query.{query}", dst_node_id=node) for node in nodes]
    replies = {int(r.metadata.src_node_id): r for r in grid.send_and_receive(messages=messages, timeout=timeout)}
    return [node_row(node, replies.get(node)) for node in nodes]


def release_files(folder: Path) -> dict[str, bytes]:
    from device_agents.serving.integrity import MANIFEST, read_manifest

    names = [RELEASE, MANIFEST, *(entry["file"] for entry in read_manifest(folder)["artifacts"])]
    return {name: read_bounded(folder / name, max_bytes=MAX_RELEASE_BYTES, what="release file")
            for name in names}


def rollout_job(grid: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Send the release to the nodes stage by stage (``stages``; without them a canary fraction, then the rest),
    each stage gated on its devices' measurements and, with ``bake``, on what they served meanwhile; a failed
    gate rolls every stage back. The last stage's success makes the release the fleet's desired one."""
    from flwr.app import ConfigRecord, RecordDict

    from edgekit.fleet.rollout import Gates

    gates = Gates(**job["gates"])
    files = release_files(Path(job["release"]))
    release_id = hashlib.sha256(files[RELEASE]).hexdigest()[:16]
    with _database(job) as store:
        if store is not None:
            store.record_release(release_id, release_number(files[RELEASE]) or -1, job["release"],
                                 _reference(Path(job["release"])), now=time.time())
    nodes = _nodes(grid, job)
    if not nodes:
        return {"status": "halted", "reason": "no device is connected to the fleet", "release_id": release_id}
    plan = stage_plan(nodes, job)
    content = RecordDict({"release": ConfigRecord(files)})
    result: dict[str, Any] = {"release_id": release_id, "nodes": len(nodes), "canary_nodes": plan[0],
                              "canary_seed": job.get("seed"), "payload_bytes_per_node": sum(map(len, files.values())),
                              "seconds": {}, "gates": job["gates"], "stages": [], "canary": [], "rest": [],
                              "rolled_back": []}
    staged = bool(job.get("stages"))
    report(f"release {release_id} ({result['payload_bytes_per_node']:,} bytes) to {len(plan[0])} "
           f"{'first-stage' if staged else 'canary'} node(s) of {len(nodes)}")
    sent: list[dict[str, Any]] = []
    for index, batch in enumerate(plan):
        gated = staged or index == 0
        stage = _stage(grid, job, gates, batch, content, release_id, gated=gated)
        stage["fraction"] = job["stages"][index] if staged else (job["canary"] if index == 0 else 1.0)
        result["stages"].append(stage)
        sent += stage["rows"]
        result["canary" if index == 0 else "rest"] += stage["rows"]
        result["seconds"]["canary" if index == 0 else "rest"] = stage["seconds"]
        if index == 0:
            result.update(canary_votes=stage["verdict"]["votes"], dropped_votes=stage["verdict"]["dropped"],
                          canary_summary=stage["summary"])
        if stage["failures"]:
            return _halt(grid, job, result, sent, release_id, stage["failures"], stage=index + 1)
        if index + 1 < len(plan):
            report(f"stage {index + 1} passed ({summary_line(stage['summary'])}); release to "
                   f"{len(plan[index + 1])} more node(s)" if staged else
                   f"canary passed ({summary_line(stage['summary'])}); release to the other "
                   f"{len(plan[index + 1])} node(s)")
    with _database(job) as store:
        if store is not None:  # every gate passed: this is what every device should serve from now on
            store.set_desired(release_id)
            record_installs(store, sent, release_id)
    missing = [row for row in result["rest"] if not row["ok"]]
    if missing:
        reasons = sorted({row["reason"] or "failed" for row in missing})
        return {**result, "status": "partial",
                "reason": f"{len(missing)} of {len(result['rest'])} node(s) after the canary did not install it: "
                          f"{'; '.join(reasons)[:MAX_TEXT]}"}
    return {**result, "status": "complete", "reason": ""}


def stage_plan(nodes: list[int], job: dict[str, Any]) -> list[list[int]]:
    """The nodes of each stage, in a random order drawn once (OS randomness, or ``seed``): stage ``k`` brings the
    nodes reached to ``ceil(fraction_k * len(nodes))`` (at least one more than before); without ``stages``, a
    canary fraction then the rest. A stage that would add no node is left out."""
    chooser = random.SystemRandom() if job.get("seed") is None else random.Random(job["seed"])
    order = chooser.sample(nodes, len(nodes))
    fractions = job.get("stages") or [job["canary"], 1.0]
    plan, reached = [], 0
    for fraction in fractions:
        upto = min(len(nodes), max(reached + 1, math.ceil(fraction * len(nodes) - 1e-9)))
        if upto > reached:
            plan.append(sorted(order[reached:upto]))
            reached = upto
    return plan


def _stage(grid: Any, job: dict[str, Any], gates: Any, batch: list[int], content: Any, release_id: str, *,
           gated: bool) -> dict[str, Any]:
    """Install on ``batch``; with ``gated``, judge the measurements (:func:`~edgekit.fleet.rollout.canary_verdict`)
    and, with a bake, what the devices that installed it served meanwhile (:func:`bake`)."""
    from edgekit.fleet.rollout import canary_verdict

    started, wall = time.monotonic(), time.time()
    rows = _ask(grid, batch, Query.INSTALL, content, job["timeout"])
    verdict = canary_verdict(rows, gates)
    stage: dict[str, Any] = {"nodes": batch, "rows": rows, "verdict": verdict,
                             "summary": gate_summary(rows, verdict), "failures": [], "bake": None,
                             "seconds": round(time.monotonic() - started, 3)}
    for dropped in verdict["dropped"]:
        report(f"node {dropped['node']} reported impossible numbers ({dropped['reason']}); its vote is dropped")
    if not gated:
        return stage
    stage["failures"] = list(verdict["failures"])
    if not stage["failures"] and float(job.get("bake") or 0) > 0:
        installed = [row["node"] for row in rows if row["ok"]]
        stage["bake"] = bake(grid, job, gates, installed, release_id, since=wall)
        stage["failures"] = stage["bake"]["failures"]
    return stage


def bake(grid: Any, job: dict[str, Any], gates: Any, nodes: list[int], release_id: str, *,
         since: float) -> dict[str, Any]:
    """Wait ``job["bake"]`` seconds while ``nodes`` serve the release, collect their serving telemetry and judge
    what they served of it since ``since`` (:func:`~edgekit.fleet.rollout.bake_verdict`)."""
    from edgekit.fleet.rollout import bake_verdict
    from edgekit.fleet.telemetry import TelemetryStore

    report(f"baking {float(job['bake']):g} s on {len(nodes)} node(s)")
    time.sleep(float(job["bake"]))
    with _database(job) as store:
        own = store
        if own is None:
            own = TelemetryStore(":memory:")
            own.record_release(release_id, -1, "", None, now=time.time())
        rows = collect_from(grid, own, nodes, job["timeout"])
        served = {node: own.totals(release_id, since=since, node=node) for node in nodes}
        release = own.release(release_id)
        evidence = bake_verdict(served, gates, None if release is None else release["reference"])
    evidence["collected"] = [{k: r[k] for k in ("node", "stored", "reason")} for r in rows]
    report(f"bake: {evidence['line']}")
    return evidence


def _halt(grid: Any, job: dict[str, Any], result: dict[str, Any], sent: list[dict[str, Any]], release_id: str,
          failures: list[str], *, stage: int) -> dict[str, Any]:
    """Roll back every device sent the release (but those that answered that they refused it: one that crashed
    after its swap never answered; a device rolls back only when it serves this release)."""
    from flwr.app import ConfigRecord, RecordDict

    back = RecordDict({"config": ConfigRecord({"from-id": release_id})})
    ask = [row["node"] for row in sent if row["ok"] or not row["answered"]]
    result["rolled_back"] = _ask(grid, ask, Query.ROLLBACK, back, job["timeout"])
    done = sum(row["ok"] for row in result["rolled_back"])
    what = f"stage {stage}" if job.get("stages") else "canary"
    report(f"{what} failed: {'; '.join(failures)}; rolled back on {done} node(s)")
    reason = "; ".join(failures)
    return {**result, "status": "halted", "halted_at_stage": stage,
            "reason": reason if not job.get("stages") else f"stage {stage}: {reason}"}


def gate_summary(rows: list[dict[str, Any]], verdict: dict[str, Any]) -> dict[str, Any]:
    """What the canary showed, for people: nodes that installed, votes, and per-device figures over the
    credible devices (each device once: the mean of their accuracies, the worst error rate and p99)."""
    dropped = {d["node"] for d in verdict["dropped"]}
    good = [r for r in rows if r["ok"] and r["node"] not in dropped]
    rates = [r["errors"] / r["inferences"] if r["inferences"] > 0 else 1.0 for r in good]
    labeled = [r for r in good if r["accuracy"] >= 0]
    before = [r for r in labeled if r["previous_accuracy"] >= 0]
    p99 = [r["p99_ms"] for r in good if r["p99_ms"] >= 0]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return {"nodes": len(rows), "installed": sum(r["ok"] for r in rows), "credible": verdict["credible"],
            "passed": verdict["passed"], "dropped": len(dropped),
            "refusals": sorted({r["reason"] or "failed" for r in rows if not r["ok"]}),
            "error_rate": max(rates) if rates else None, "p99_ms": max(p99) if p99 else None,
            "accuracy": mean([r["accuracy"] for r in labeled]),
            "min_accuracy": min((r["accuracy"] for r in labeled), default=None),
            "accuracy_same_nodes": mean([r["accuracy"] for r in before]),
            "previous_accuracy": mean([r["previous_accuracy"] for r in before]),
            "previous_p99_ms": max((r["previous_p99_ms"] for r in good if r["previous_p99_ms"] >= 0), default=None)}


def summary_line(summary: dict[str, Any]) -> str:
    parts = [f"{summary['installed']}/{summary['nodes']} installed, {summary['passed']} passed every gate"]
    if summary["dropped"]:
        parts.append(f"{summary['dropped']} vote(s) dropped")
    if summary["error_rate"] is not None:
        parts.append(f"worst error rate {summary['error_rate']:.3f}")
    if summary["p99_ms"] is not None:
        parts.append(f"worst p99 {summary['p99_ms']:.2f} ms")
    if summary["min_accuracy"] is not None:
        parts.append(f"accuracy {summary['min_accuracy']:.1f}% or more")
    return ", ".join(parts)


def status_job(grid: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Every connected node's versions and a measurement of the one it serves."""
    from flwr.app import ConfigRecord, RecordDict

    nodes = _nodes(grid, job)
    rows = _ask(grid, nodes, Query.STATUS, RecordDict({"config": ConfigRecord({})}), job["timeout"])
    report(f"{sum(r['ok'] for r in rows)} of {len(nodes)} node(s) answered")
    with _database(job) as store:
        if store is not None:
            record_status(store, rows)
    return {"status": "complete", "nodes": rows}


@contextlib.contextmanager
def _database(job: dict[str, Any]) -> Iterator[Any]:
    """The fleet database of ``job`` (``job["database"]``; None when the job names none)."""
    from edgekit.fleet.telemetry import TelemetryStore

    if not job.get("database"):
        yield None
        return
    store = TelemetryStore(job["database"])
    try:
        yield store
    finally:
        store.close()


def _reference(folder: Path) -> dict[str, Any] | None:
    """The reference statistics of a release's manifest (None: it carries none)."""
    from device_agents.serving.integrity import read_manifest

    reference = read_manifest(folder).get("reference")
    return reference if isinstance(reference, dict) else None


def _measured(store: Any, row: dict[str, Any], now: float) -> None:
    rate = row["errors"] / row["inferences"] if row["inferences"] > 0 else None
    store.record_measurement(row["node"], row["version_id"], now=now,
                             accuracy=row["accuracy"] if row["accuracy"] >= 0 else None, error_rate=rate,
                             p99_ms=row["p99_ms"] if row["p99_ms"] >= 0 else None)


def record_installs(store: Any, rows: list[dict[str, Any]], release_id: str) -> None:
    """Each device's state after it was sent the desired release ``release_id``: converged when it serves it,
    failed when it answered that it could not install it (the reason), pending when it did not answer."""
    from edgekit.fleet.rollout import implausible
    from edgekit.fleet.telemetry import DeviceState

    now = time.time()
    for row in rows:
        if not row["answered"]:
            store.record_device(row["node"], row["previous_id"], DeviceState.PENDING, row["reason"] or "no reply",
                                now=now)
        elif not row["ok"]:
            store.record_device(row["node"], row["previous_id"], DeviceState.FAILED, row["reason"] or "failed",
                                now=now)
        elif row["version_id"] != release_id:
            store.record_device(row["node"], row["version_id"], DeviceState.FAILED,
                                f"serves {row['version_id'][:16]} after installing {release_id}", now=now)
        else:
            store.record_device(row["node"], release_id, DeviceState.CONVERGED, now=now)
            if implausible(row) is None:
                _measured(store, row, now)


def record_status(store: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each answering device's state against the desired release, from what it serves (a device that failed the
    desired release stays failed while it serves the same version); its measurement when credible. Returns the
    rows of devices that should be sent the desired release."""
    from edgekit.fleet.rollout import implausible
    from edgekit.fleet.telemetry import DeviceState

    now, desired, behind = time.time(), store.desired(), []
    for row in rows:
        if not row["ok"]:
            continue
        if implausible(row) is None:
            _measured(store, row, now)
        version = row["version_id"]
        if desired is None:
            store.record_device(row["node"], version, DeviceState.UNTRACKED, "no release rolled out yet", now=now)
            continue
        wanted = desired["release_id"]
        known = store.device(row["node"])
        if version == wanted:
            store.record_device(row["node"], version, DeviceState.CONVERGED, now=now)
        elif known and known["state"] == DeviceState.FAILED and known["target"] == wanted and \
                known["version"] == version:
            continue
        else:
            store.record_device(row["node"], version, DeviceState.PENDING,
                                f"serves {version[:16] or 'nothing'}; release {desired['release']} ({wanted}) is "
                                "installed at the next convergence pass", now=now)
            behind.append(row)
    return behind


def converge_job(grid: Any, job: dict[str, Any]) -> dict[str, Any]:
    """One convergence pass: every connected device is asked what it serves; each that does not serve the desired
    release (and has not already failed it) is sent it, with every check an install has."""
    from flwr.app import ConfigRecord, RecordDict

    with _database(job) as store:
        desired = store.desired()
        if desired is None:
            return {"status": "complete", "reason": "no release rolled out yet", "nodes": [], "installed": []}
        nodes = _nodes(grid, job)
        rows = _ask(grid, nodes, Query.STATUS, RecordDict({"config": ConfigRecord({})}), job["timeout"])
        behind = [row["node"] for row in record_status(store, rows)]
        installed: list[dict[str, Any]] = []
        if behind:
            try:
                files = release_files(Path(desired["folder"]))
            except AgentError as exc:
                return {"status": "error", "reason": f"the desired release cannot be read: {exc}", "nodes": rows,
                        "installed": []}
            if hashlib.sha256(files[RELEASE]).hexdigest()[:16] != desired["release_id"]:
                return {"status": "error", "nodes": rows, "installed": [],
                        "reason": f"{desired['folder']} is no longer release {desired['release_id']}"}
            installed = _ask(grid, behind, Query.INSTALL, RecordDict({"release": ConfigRecord(files)}),
                             job["timeout"])
            record_installs(store, installed, desired["release_id"])
        states = store.devices()
    report(f"convergence to release {desired['release']} ({desired['release_id']}): {len(nodes)} connected, "
           f"{len(behind)} behind, {sum(r['ok'] for r in installed)} installed it now; "
           f"{sum(d['state'] == 'converged' for d in states)} converged, "
           f"{sum(d['state'] == 'failed' for d in states)} failed of {len(states)} seen")
    return {"status": "complete", "reason": "", "nodes": rows, "installed": installed, "devices": states}


def collected(store: Any, node: int, reply: Any, *, now: float) -> dict[str, Any]:
    """Store one device's telemetry reply (:data:`~device_agents.protocol.Query.TELEMETRY`) in ``store`` (a
    :class:`~edgekit.fleet.telemetry.TelemetryStore`): every window checked as a message from outside (exact names,
    at most :data:`~device_agents.protocol.MAX_WINDOWS` of at most ``MAX_WINDOW_BYTES``, a well-formed window of
    a release rolled out to this fleet, :func:`~edgekit.fleet.telemetry.plausible`); a refused window is named
    with why, the others are kept."""
    import json

    from device_agents.protocol import MAX_WINDOW_BYTES, MAX_WINDOWS, TelemetryWire
    from device_agents.serving.spool import valid_id
    from device_agents.serving.stats import ServingStats

    row: dict[str, Any] = {"node": node, "stored": 0, "refused": [], "reason": ""}
    if reply is None or reply.has_error():
        row["reason"] = "no reply" if reply is None else f"error: {str(reply.error.reason)[:MAX_TEXT]}"
        return row
    content = reply.content
    windows = content.get(TelemetryWire.WINDOWS) if TelemetryWire.WINDOWS in content.keys() else None
    if windows is None or len(windows) > MAX_WINDOWS:
        row["reason"] = "malformed reply (no windows, or more than a reply may carry)"
        return row
    spool = ""  # a device without a spool identity counts in the spool ""
    if TelemetryWire.SPOOL in content.keys():
        spool = content[TelemetryWire.SPOOL].get(TelemetryWire.SPOOL_ID)
        if not valid_id(spool):
            row["reason"] = "malformed reply (a spool id is 16 hex digits)"
            return row
    row["spool"] = spool
    for key, data in sorted(windows.items()):
        if not (isinstance(key, str) and key.isdigit() and len(key) == 12 and isinstance(data, bytes)
                and len(data) <= MAX_WINDOW_BYTES):
            row["refused"].append(f"{str(key)[:20]}: not a spool window")
            continue
        try:
            stats = ServingStats.from_dict(json.loads(data))
        except (ValueError, TypeError, RecursionError, AgentError) as exc:  # not JSON, or not a window
            row["refused"].append(f"{key}: {str(exc)[:MAX_TEXT]}")
            continue
        if store.release(stats.version) is None:  # also bounds the versions (metric labels) a device can invent
            row["refused"].append(f"{key}: version {stats.version[:40]!r} is no release rolled out to this fleet")
            continue
        why = store.add(node, int(key), stats, now=now, spool=spool)
        if why and why != "already stored":
            row["refused"].append(f"{key}: {why}")
        elif not why:
            row["stored"] += 1
    return row


def collect_from(grid: Any, store: Any, nodes: list[int], timeout: float) -> list[dict[str, Any]]:
    """Collect ``nodes``' serving telemetry into ``store`` (:func:`collected`): each device is told the newest
    window stored of it and of which spool (which it drains when that is its spool) and sends the others."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from device_agents.protocol import TelemetryWire

    def config(node: int) -> ConfigRecord:
        spool, through = store.last_stored(node)
        return ConfigRecord({TelemetryWire.THROUGH: through, TelemetryWire.SPOOL: spool})

    messages = [Message(RecordDict({"config": config(n)}), message_type=f"query.{Query.TELEMETRY}", dst_node_id=n)
                for n in nodes]
    replies = {int(r.metadata.src_node_id): r
               for r in (grid.send_and_receive(messages=messages, timeout=timeout) if nodes else [])}
    now = time.time()
    return [collected(store, node, replies.get(node), now=now) for node in nodes]


def collect_job(grid: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Collect every connected device's serving telemetry into the fleet's database (``job["database"]``)."""
    with _database(job) as store:
        nodes = _nodes(grid, job)
        rows = collect_from(grid, store, nodes, job["timeout"])
    report(f"telemetry: {sum(r['stored'] for r in rows)} window(s) from {len(nodes)} node(s), "
           f"{sum(len(r['refused']) for r in rows)} refused")
    return {"status": "complete", "nodes": rows}


def train_job(grid: Any, job: dict[str, Any]) -> dict[str, Any]:
    """The federated rounds of a run folder prepared by :func:`edgekit.federated.fleet_run.run_on_fleet`, after checking
    that every device holds the trainable release of this model (else no round runs)."""
    from edgekit.federated.server_apps import run_rounds_in

    run_dir = Path(job["run_dir"])
    mismatch = _trainable_mismatch(grid, run_dir, job)
    if mismatch:
        return {"status": "refused", "reason": mismatch}
    run_rounds_in(grid, run_dir, log=report)
    return {"status": "complete"}


def _trainable_mismatch(grid: Any, run_dir: Path, job: dict[str, Any]) -> str:
    """Why the connected devices cannot train this run's model (empty: they can): a device that holds no
    trainable release, or one of another model (its tensor names and shapes differ)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from device_agents.federated.wire import tensors_digest
    from device_agents.training.trainer import Trainer
    from edgekit.federated.run import RunSpec

    spec = RunSpec.read(run_dir)
    expected = tensors_digest(Trainer.load(run_dir / "trainable").tensors)
    nodes = _nodes(grid, {"min_nodes": spec.clients, "wait": 120})
    if not nodes:
        return "no device is connected to the fleet"
    messages = [Message(RecordDict({"config": ConfigRecord({})}), message_type=f"query.{Query.TRAINABLE}",
                        dst_node_id=n) for n in nodes]
    replies = {int(r.metadata.src_node_id): r for r in grid.send_and_receive(messages=messages, timeout=120)}
    wrong = []
    for node in nodes:
        reply = replies.get(node)
        text = None if reply is None or reply.has_error() or "text" not in reply.content else reply.content["text"]
        digest = text.get("tensors-sha256") if text is not None else None
        if digest != expected:
            why = "no answer" if text is None else (str(text.get("reason", ""))[:MAX_TEXT] or "another model")
            wrong.append(f"node {node}: {why}")
    if not wrong:
        return ""
    return (f"{len(wrong)} of {len(nodes)} device(s) do not hold the trainable release of this model "
            f"({'; '.join(wrong)[:MAX_TEXT]}); roll it out first: edgekit trainable, edgekit release, "
            "edgekit fleet rollout")


ACTIONS: dict[str, Callable[[Any, dict[str, Any]], dict[str, Any]]] = {
    "collect": collect_job,
    "converge": converge_job,
    "rollout": rollout_job,
    "status": status_job,
    "train": train_job,
}
"""Job action -> handler (run in the fleet's ServerApp)."""
