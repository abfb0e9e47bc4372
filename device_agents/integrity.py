"""Manifest reading and artifact integrity checks (SHA-256 and size), device side.

>>> entry = verified_artifact("out")            # doctest: +SKIP
>>> entry.path.name, entry.format                # doctest: +SKIP
('model.tflite', 'tflite')
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agents.errors import ArtifactError, IntegrityError
from device_agents.runtime import ArtifactFormat, Runtime, available_runtimes

MANIFEST = "manifest.json"
"""The file name of the manifest in every edgekit output folder."""
SCHEMA_VERSION = 1
"""The manifest schema this agent reads (inference and trainable manifests share it)."""


@dataclass(frozen=True)
class ArtifactEntry:
    path: Path
    format: str
    sha256: str
    bytes: int
    entry: dict[str, Any]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read ``folder/manifest.json``, refusing a missing or malformed one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST}; give an edgekit output folder or an artifact file")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts"), list):
        raise ArtifactError(f"{path} has no 'artifacts' list; it is not an edgekit manifest")
    return manifest


def check_entry(folder: str | Path, entry: dict[str, Any]) -> bytes:
    """Read the artifact named by ``entry`` and check its size and SHA-256; return its bytes."""
    try:
        name, expected = entry["file"], entry["sha256"]
    except (KeyError, TypeError):
        raise ArtifactError("a manifest artifact entry lacks 'file' or 'sha256'") from None
    path = Path(folder) / name
    if Path(name).name != name:
        raise ArtifactError(f"manifest names artifact {name!r} outside its folder; refusing it")
    if not path.is_file():
        raise ArtifactError(f"manifest lists {name} but {path} does not exist")
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if actual != expected:
        raise IntegrityError(
            f"{path} does not match its manifest: sha256 {actual[:12]}... != {expected[:12]}...; "
            "the file was altered or truncated, refusing it",
            expected=expected, actual=actual)
    if "bytes" in entry and entry["bytes"] != len(data):
        raise IntegrityError(f"{path} has {len(data)} bytes, its manifest says {entry['bytes']}",
                             expected=str(entry["bytes"]), actual=str(len(data)))
    return data


def check_folder(folder: str | Path) -> list[ArtifactEntry]:
    """Check every artifact the manifest lists; return them."""
    manifest = read_manifest(folder)
    out = []
    for entry in manifest["artifacts"]:
        data = check_entry(folder, entry)
        out.append(ArtifactEntry(Path(folder) / entry["file"], entry.get("format", ""), entry["sha256"],
                                 len(data), entry))
    return out


def verified_artifact(folder: str | Path, *, runtime: Runtime | str | None = None,
                      kind: str | None = None) -> ArtifactEntry:
    """Pick the artifact of ``folder`` this device can run (TFLite first), check it, return it."""
    manifest = read_manifest(folder)
    if kind is not None and manifest.get("kind", "inference") != kind:
        raise ArtifactError(f"{folder} holds a {manifest.get('kind')} artifact, not a {kind} one")
    installed = set(available_runtimes())
    if runtime is not None:
        installed &= {Runtime(runtime)}
    runnable = {ArtifactFormat.TFLITE.value: bool(installed & {Runtime.LITERT, Runtime.TFLITE_RUNTIME}),
                ArtifactFormat.ONNX.value: Runtime.ONNXRUNTIME in installed}
    entries = sorted(manifest["artifacts"], key=lambda e: e.get("format") != ArtifactFormat.TFLITE.value)
    for entry in entries:
        if runnable.get(entry.get("format"), False):
            data = check_entry(folder, entry)
            return ArtifactEntry(Path(folder) / entry["file"], entry["format"], entry["sha256"], len(data), entry)
    formats = ", ".join(sorted({e.get('format', '?') for e in entries})) or "none"
    raise ArtifactError(f"no artifact in {folder} can run here (it has: {formats}; installed runtimes: "
                        f"{', '.join(r.value for r in installed) or 'none'})")
