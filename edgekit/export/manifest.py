"""``manifest.json``: the hand-off between the server and the devices.

The device agent reads only this file and the artifacts it lists (see
:mod:`device_agents.integrity`, which checks hashes and sizes against it).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgekit._output import write_atomic
from edgekit._version import __version__

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


def build_manifest(result: Any) -> dict[str, Any]:
    """The manifest of a :class:`~edgekit.CompressResult` whose candidate was selected."""
    selected = result.selected
    return {
        "schema_version": SCHEMA_VERSION,
        "edgekit_version": __version__,
        "kind": "inference",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": result.source,
        "data": result.data_info,
        "recipe": {"name": selected.recipe.name, "prune": selected.recipe.prune,
                   "structured": "2:4" if selected.recipe.structured else None,
                   "quantize": selected.recipe.quantize.value, "student_width": selected.recipe.student_width,
                   "student": selected.recipe.student, "params": selected.params},
        "max_accuracy_drop": result.config.max_accuracy_drop,
        "artifacts": [artifact_entry(a) for a in selected.artifacts],
        "layer_sparsity": selected.layer_sparsity,
        "keras_model": "model.keras",
    }


def artifact_entry(art: Any) -> dict[str, Any]:
    return {
        "file": art.filename, "format": art.format.value, "sha256": art.sha256, "bytes": art.bytes,
        "gzip_bytes": art.gzip_bytes, "quantization": art.quantization.value, "sparsity": round(art.sparsity, 4),
        "accuracy": _round(art.accuracy), "accuracy_drop": _round(art.accuracy_drop),
        "top1_agreement": _round(art.top1_agreement), "max_abs_diff": _round(art.max_abs_diff, 6),
        "conversion_max_abs_diff": _round(art.conversion_max_abs_diff, 6), "tolerance": art.tolerance,
        "verified_with": art.runtime,
        "input": [s.to_dict() for s in art.inputs], "output": [s.to_dict() for s in art.outputs],
        "notes": art.notes,
    }


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(folder) / MANIFEST
    write_atomic(path, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
    return path


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)
