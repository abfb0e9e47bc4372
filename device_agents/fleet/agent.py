"""A device's side of the fleet: install a signed release sent over Flower, measure it, roll back, report.

The SuperNode's node config says where things are: ``store`` (the :class:`~device_agents.store.model_store.ModelStore`
root), ``trust`` (the release signing key, ``signing.pub``; a store that pinned one keeps requiring it),
and the device's own labeled data, ``data-file`` (an ``.npz`` with ``x`` and ``y``), or ``data-dir`` with
``partition-id`` as in federated rounds. Queries (Flower message types ``query.<name>``):

- ``install``: a ConfigRecord ``release`` of file name -> bytes (``release.json``, ``manifest.json`` and the
  artifacts). The device measures the version it serves, verifies and installs the release (signature,
  hashes, version newer than any installed, smoke test; atomic swap), and measures the new version.
- ``rollback``: config ``from-id``; the device rolls back only when that version is the one it serves.
- ``status``: the versions the store holds, and a measurement of the current one.

A measurement runs up to 200 of the device's samples one at a time through the model: inference and
error counts, latency p50/p99, peak RSS and, when the data has labels, accuracy (to 0.1 points, over a
sample count rounded to tens). Only these aggregates leave the device
(:data:`~device_agents.protocol.FLEET_METRICS`); refusal reasons are one line of text.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.errors import AgentError, first_line
from device_agents.protocol import FLEET_METRICS, MAX_FILES, MAX_RELEASE_BYTES, MAX_SAMPLES, MEASURE
from device_agents.store.model_store import ModelStore


def _metrics(**values: float) -> dict[str, float]:
    """A reply's metrics: every name of :data:`~device_agents.protocol.FLEET_METRICS` (-1 where there is nothing
    to report), then ``values`` (names with ``-`` written as ``_``)."""
    metrics = dict.fromkeys(FLEET_METRICS, -1.0)
    metrics.update({k.replace("_", "-"): v for k, v in values.items()})
    return metrics


def _store(node: Any) -> ModelStore:
    if "store" not in node:
        raise AgentError("this SuperNode has no 'store' in its node config; start it with edgekit-agent join")
    trust = node.get("trust") or None
    return ModelStore(str(node["store"]), trust=str(trust) if trust else None)


def local_samples(node: Any) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The device's own samples (and labels when it has them), or None when its node config names none."""
    from device_agents.files import read_npz

    if "data-file" in node:
        path = Path(str(node["data-file"]))
    elif "data-dir" in node:
        path = Path(str(node["data-dir"])) / f"{int(node.get('partition-id', 0))}.npz"
    else:
        return None
    arrays = read_npz(path, names=("x", "y"))
    if "x" not in arrays:
        raise AgentError(f"{path} has no array 'x'")
    y = arrays.get("y")
    return arrays["x"][:MAX_SAMPLES].astype(np.float32), (None if y is None else y[:MAX_SAMPLES].astype(np.int64))


def _predictor(folder: Path) -> Any:
    from device_agents.serving.integrity import read_manifest, verified_artifact
    from device_agents.serving.runtime import Model

    if read_manifest(folder).get("kind") == "trainable":
        from device_agents.training.trainer import Trainer

        trainer = Trainer.load(folder, num_threads=1)
        return trainer.predict, [1, *trainer.spec["input"]["shape"][1:]]
    entry = verified_artifact(folder, kind="inference")
    model = Model.load(entry.data, num_threads=1)
    return model.predict, list(model.example_input().shape)


def measure(folder: Path | None, samples: tuple[np.ndarray, np.ndarray | None] | None) -> dict[str, float]:
    """Run the version in ``folder`` on the samples one at a time (zeros, 50 times, without samples)."""
    from device_agents.serving.telemetry import Telemetry, peak_rss_mib

    result = dict.fromkeys(MEASURE, -1.0)
    if folder is None:
        return result
    telemetry, correct, errors = Telemetry(), 0, 0
    try:
        predict, shape = _predictor(folder)
    except AgentError:
        result.update(inferences=0.0, errors=1.0)
        return result
    x, y = samples if samples is not None else (np.zeros([50, *shape[1:]], np.float32), None)
    for i in range(len(x)):
        try:
            with telemetry.measure():
                out = predict(x[i:i + 1])
            good = bool(np.isfinite(out).all())
        except Exception:  # noqa: BLE001 (an error of the model under test is counted, not raised)
            good = False
        if not good:  # an exception or a non-finite answer
            errors += 1
            continue
        correct += int(y is not None and int(np.argmax(out[0])) == int(y[i]))
    snap = telemetry.snapshot()
    result.update({"inferences": float(len(x)), "errors": float(errors),
                   "p50-ms": float(snap["latency_ms"]["p50"] or -1), "p99-ms": float(snap["latency_ms"]["p99"] or -1),
                   "peak-rss-mib": float(round(peak_rss_mib(), 1)), "samples": float(max(10, len(x) // 10 * 10))})
    if y is not None and len(x):
        result["accuracy"] = round(100.0 * correct / len(x), 1)
    return result


def _release(folder: Path | None) -> float:
    """The signed release number of an installed version folder as a metric (-1: unsigned or none)."""
    release = ModelStore.release_of(folder)
    return -1.0 if release is None else float(release)


def _receive(files: Any, store: ModelStore) -> Path:
    """Write the release's files (name -> bytes) into a fresh folder inside the store, names and sizes checked."""
    names = list(files.keys())
    if not 2 <= len(names) <= MAX_FILES:
        raise AgentError(f"a release has 2 to {MAX_FILES} files, {len(names)} were sent")
    total = 0
    for name in names:
        value = files[name]
        if not isinstance(name, str) or Path(name).name != name or name.startswith(".") or not isinstance(value, bytes):
            raise AgentError(f"refusing release file {str(name)[:40]!r}: not a plain file name with bytes")
        total += len(value)
    if total > MAX_RELEASE_BYTES:
        raise AgentError(f"a release of {total:,} bytes is larger than {MAX_RELEASE_BYTES:,}")
    store.root.mkdir(parents=True, exist_ok=True)
    for stale in store.root.glob(".incoming.*"):  # left by a device that stopped mid-install
        shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=".incoming.", dir=store.root))
    for name in names:
        (folder / name).write_bytes(files[name])
    return folder


def install(files: Any, node: Any) -> tuple[dict[str, float], dict[str, str]]:
    """Handle ``query.install``: (metrics, text) of the reply."""
    store = _store(node)
    samples = local_samples(node)
    before_folder = store.current
    before = measure(before_folder, samples)
    metrics = {**_metrics(ok=0.0, previous_release=_release(before_folder)),
               **{f"previous-{k}": v for k, v in before.items()}}
    text = {"version-id": "", "previous-id": before_folder.name if before_folder else "", "reason": ""}
    sent = files["release.json"] if "release.json" in files.keys() else None
    if before_folder is not None and (before_folder / "release.json").is_file() and \
            (before_folder / "release.json").read_bytes() == sent:  # a repeated rollout: nothing to do
        metrics.update({"ok": 1.0, "release": metrics["previous-release"], **before})
        text.update({"version-id": before_folder.name, "reason": "already serving this release"})
        return metrics, text
    incoming = None
    try:
        incoming = _receive(files, store)
        target = store.install(incoming)
    except AgentError as exc:
        text["reason"] = first_line(exc, limit=300)
        return metrics, text
    finally:
        if incoming is not None:
            shutil.rmtree(incoming, ignore_errors=True)
    metrics.update({"ok": 1.0, "release": _release(target), **measure(target, samples)})
    text["version-id"] = target.name
    return metrics, text


def rollback(from_id: str, node: Any) -> tuple[dict[str, float], dict[str, str]]:
    """Handle ``query.rollback``: roll back only when ``from_id`` is the version serving now."""
    store = _store(node)
    current = store.current
    metrics = _metrics(ok=0.0, release=_release(current))
    if current is None or current.name != from_id:
        return metrics, {"version-id": current.name if current else "",
                         "reason": f"not serving {from_id[:16]}: nothing rolled back"}
    try:
        target = store.rollback()
    except AgentError as exc:
        return metrics, {"version-id": current.name, "reason": first_line(exc, limit=300)}
    metrics.update({"ok": 1.0, "release": _release(target)})
    return metrics, {"version-id": target.name, "reason": ""}


def status(node: Any) -> tuple[dict[str, float], dict[str, str]]:
    """Handle ``query.status``: the versions served and a measurement of the current one."""
    store = _store(node)
    current, previous = store.current, store.previous
    metrics = {**_metrics(ok=1.0, release=_release(current),
                          previous_release=_release(previous)),
               **measure(current, local_samples(node))}
    return metrics, {"version-id": current.name if current else "", "previous-id": previous.name if previous else "",
                     "reason": ""}


def telemetry(through: int, spool_id: str | None, node: Any) -> tuple[dict[str, bytes], dict[str, float], str]:
    """The store's spool for a collection: drain what the server has stored (sequences up to ``through`` of the
    spool ``spool_id``: only when that is this spool, and never past what it held), then up to
    :data:`~device_agents.protocol.MAX_WINDOWS` of the windows left, oldest first, as sequence -> bytes; the newest
    sequence the spool holds, and its id. ``spool_id`` None (a server that names no spool) drains by sequence
    alone. Only aggregates leave the device (the windows are checked as the spool reads them: a file that is not a
    window stays behind)."""
    from device_agents.protocol import MAX_WINDOW_BYTES, MAX_WINDOWS, TelemetryWire
    from device_agents.serving.spool import Spool
    from device_agents.store.serving import SPOOL_FOLDER

    spool = Spool(_store(node).root / SPOOL_FOLDER)
    own = spool.identity()
    if spool_id in (None, own) and 0 < through <= spool.last_sequence():
        spool.drain(through)
    windows: dict[str, bytes] = {}
    for sequence, path in spool.files():
        if len(windows) >= MAX_WINDOWS:
            break
        data = path.read_bytes() if path.stat().st_size <= MAX_WINDOW_BYTES else b""
        if data and spool.parse(data) is not None:
            windows[f"{sequence:012d}"] = data
    return windows, {TelemetryWire.LAST_SEQUENCE: float(spool.last_sequence())}, own


def finite(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics with every value a finite float (a reply is refused by the server otherwise)."""
    return {k: float(v) if isinstance(v, (int, float)) and math.isfinite(v) else -1.0 for k, v in metrics.items()}
