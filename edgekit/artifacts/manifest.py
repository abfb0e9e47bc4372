"""``manifest.json``: the hand-off between the server and the devices, one schema for every output.

Both kinds share the header (``schema_version``, ``edgekit_version``, ``kind``, ``created``,
``source``) and the artifact entry (``file``, ``format``, ``sha256``, ``bytes``, plus ``role`` for
trainable outputs and the measurements for inference outputs). ``kind`` is ``"inference"``
(:func:`inference_manifest`) or ``"trainable"`` (:func:`trainable_manifest`). The device agent reads
only this file and the artifacts it lists (:mod:`device_agents.serving.integrity` checks hashes and sizes
against it); the file name and the schema version are the device's constants.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgekit.artifacts.results import ArtifactResult, CompressResult

from device_agents.serving.integrity import MANIFEST, SCHEMA_VERSION
from edgekit._io import write_atomic
from edgekit._version import __version__
from edgekit.config import Quantization

KERAS_MODEL = "model.keras"
"""The selected float Keras model in every compress output (for further training or federation)."""

__all__ = ["KERAS_MODEL", "MANIFEST", "SCHEMA_VERSION", "artifact_entry", "file_entry", "inference_manifest",
           "trainable_manifest", "write_manifest"]


def _header(kind: str, source: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "edgekit_version": __version__, "kind": kind,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": source}


def file_entry(name: str, data: bytes, *, fmt: str, role: str | None = None) -> dict[str, Any]:
    """The entry every artifact has: file name, format, SHA-256, size (and its role, when it has one)."""
    entry: dict[str, Any] = {"file": name, "format": fmt, "sha256": hashlib.sha256(data).hexdigest(),
                             "bytes": len(data)}
    if role is not None:
        entry["role"] = role
    return entry


def artifact_entry(art: ArtifactResult, *, evaluated: int = 0) -> dict[str, Any]:
    """The entry of a measured inference artifact (:class:`~edgekit.ArtifactResult`); with the number of samples it
    was evaluated on, its accuracy's 95% Wilson interval and its drop's 95% margin."""
    from edgekit.artifacts.uncertainty import drop_margin, wilson_interval

    noise = {}
    if evaluated and art.accuracy is not None:
        noise = {"accuracy_ci95": [_round(v, 2) for v in wilson_interval(art.accuracy, evaluated)],
                 "drop_margin95": _round(drop_margin(art.top1_agreement, evaluated), 2)}
    return {
        **file_entry(art.filename, art.data, fmt=art.format.value),
        "gzip_bytes": art.gzip_bytes, "quantization": art.quantization.value, "sparsity": round(art.sparsity, 4),
        "accuracy": _round(art.accuracy), "accuracy_drop": _round(art.accuracy_drop),
        "quantization_drop": _round(art.quantization_drop),
        "top1_agreement": _round(art.top1_agreement), "max_abs_diff": _round(art.max_abs_diff, 6),
        "conversion_max_abs_diff": _round(art.conversion_max_abs_diff, 6), "tolerance": art.tolerance,
        "verified_with": art.runtime, "latency_us": _round(art.latency_us, 1),
        "float32_latency_us": _round(art.float32_latency_us, 1), "float32_bytes": art.float32_bytes,
        "time_vs_float32": _round(art.time_vs_float32, 3),
        "time_vs_float32_blocks": art.float32_time_blocks or None,
        "input": [s.to_dict() for s in art.inputs], "output": [s.to_dict() for s in art.outputs],
        "notes": art.notes,
        "remedy": art.remedy or None, "quantizer_options": art.quantizer_options or None,
        # null: the rung wrote nothing that runs (its quantizer failed, or the runtime could not prepare it); a size
        # rung that did not run is {"ran": false}
        "remedies_tried": {k: (v if math.isfinite(v) else None) for k, v in art.remedies_tried.items()} or None,
        "search_stopped": art.search_stopped,  # where the accuracy-controlled search ran out of time (null: it did not)
        "speed_remedy": art.speed_remedy or None,
        "speed_tried": {k: (v if math.isfinite(v) else None) for k, v in art.speed_tried.items()} or None,
        "size_remedy": art.size_remedy or None, "size_tried": art.size_tried or None,
        **noise,
    }


def inference_manifest(result: CompressResult, *, keras_model: str | None = KERAS_MODEL) -> dict[str, Any]:
    """The manifest of a :class:`~edgekit.CompressResult` whose candidate was selected; ``keras_model``
    names the float Keras model written beside the artifacts (``None`` when there is none)."""
    selected = result.selected
    recipe = selected.recipe
    return {
        **_header("inference", result.source),
        "data": result.data_info,
        "recipe": {"name": recipe.name, "prune": recipe.prune,
                   "structured": f"{recipe.structured[0]}:{recipe.structured[1]}" if recipe.structured else None,
                   "quantize": recipe.quantize.value, "student_width": recipe.student_width,
                   "student": recipe.student, "params": selected.params},
        "max_accuracy_drop": result.config.max_accuracy_drop,
        "accuracy_budget": result.budget.points,
        "accuracy_budget_basis": result.budget.basis.value,
        "budget_within_noise": result.verdict_within_noise(selected) or None,
        "warnings": result.warnings or None,
        "float32_reference": result.reference,
        # the calibration data's predicted classes and per-feature summaries and decile bins: served traffic is
        # counted in these bins on the device and compared with them (population stability index)
        "reference": result.data_reference,
        "artifacts": [artifact_entry(a, evaluated=result.evaluated) for a in selected.artifacts],
        "layer_sparsity": selected.layer_sparsity,
        "skipped_layers": selected.skipped_layers,
        "keras_model": keras_model,
    }


def trainable_manifest(source: dict[str, Any], files: dict[str, bytes], trainable: dict[str, Any], *,
                       backbone: Quantization = Quantization.INT8) -> dict[str, Any]:
    """The manifest of a trainable export: ``files`` maps file name -> bytes (``trainable.tflite``
    and, head-only, ``backbone.tflite``, quantized as ``backbone`` says); ``trainable`` is the signature and
    tensor contract."""
    roles = {"trainable.tflite": "trainable", "backbone.tflite": "backbone"}
    quantization = {"trainable.tflite": Quantization.NONE, "backbone.tflite": backbone}
    return {
        **_header("trainable", source),
        "artifacts": [{**file_entry(name, data, fmt="tflite", role=roles[name]),
                       "quantization": quantization[name].value} for name, data in files.items()],
        "trainable": trainable,
    }


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``folder/manifest.json`` atomically."""
    return write_atomic(Path(folder) / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)
