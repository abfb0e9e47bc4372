"""Manifest reading and artifact integrity checks (SHA-256 and size), device side.

>>> entry = verified_artifact("out")            # doctest: +SKIP
>>> entry.path.name, entry.format                # doctest: +SKIP
('model.tflite', 'tflite')
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agents.errors import ArtifactError, IntegrityError, first_line
from device_agents.files import MAX_ARTIFACT_BYTES, MAX_MANIFEST_BYTES, UnsafeFileError, read_bounded
from device_agents.serving.runtime import ArtifactFormat, Runtime, available_runtimes

MANIFEST = "manifest.json"
"""The file name of the manifest in every edgekit output folder."""
SCHEMA_VERSION = 1
"""The manifest schema this agent reads (inference and trainable manifests share it)."""


@dataclass(frozen=True)
class ArtifactEntry:
    """One checked artifact: its path, format, SHA-256, size, manifest entry, and (when read) its bytes."""

    path: Path
    format: str
    sha256: str
    bytes: int
    entry: dict[str, Any]
    data: bytes | None = field(default=None, repr=False)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read ``folder/manifest.json`` (at most 16 MiB), refusing a missing or malformed one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST}; give an edgekit output folder or an artifact file")
    try:
        data = read_bounded(path, max_bytes=MAX_MANIFEST_BYTES, what="manifest")
    except UnsafeFileError as exc:
        raise ArtifactError(str(exc)) from None
    return parse_manifest(data, path)


def parse_manifest(data: bytes, path: str | Path) -> dict[str, Any]:
    """The manifest in ``data`` (read from ``path``), refusing malformed JSON or entries."""
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({first_line(exc, limit=120)})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts"), list):
        raise ArtifactError(f"{path} has no 'artifacts' list; it is not an edgekit manifest")
    for entry in manifest["artifacts"]:
        _entry_fields(entry)
    return manifest


def _entry_fields(entry: Any) -> tuple[str, str, int]:
    """(file, sha256, bytes) of a manifest entry, each of the right type, or :class:`ArtifactError`."""
    if not isinstance(entry, dict):
        raise ArtifactError("a manifest artifact entry is not an object")
    name, digest, size = entry.get("file"), entry.get("sha256"), entry.get("bytes")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ArtifactError(f"manifest names artifact {name!r} outside its folder; refusing it")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ArtifactError(f"manifest entry {name}: 'sha256' is not a SHA-256 hex digest")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_ARTIFACT_BYTES:
        raise ArtifactError(f"manifest entry {name}: 'bytes' must be a size between 0 and {MAX_ARTIFACT_BYTES:,}")
    return name, digest, size


def _artifact_path(folder: str | Path, name: str, size: int, fmt: Any = None) -> Path:
    """The artifact's path, after checking what its first bytes and its size say, before it is read, copied
    or hashed: a regular file of the manifest's size, a TFLite flatbuffer or an ONNX model (of the manifest's
    format, when the entry names one)."""
    from device_agents.serving.runtime import detect_format

    path = Path(folder) / name
    if path.is_symlink() or not path.is_file():
        raise ArtifactError(f"manifest lists {name} but {path} is not a regular file")
    actual = path.stat().st_size
    if actual != size:  # checked before anything is read or hashed
        raise IntegrityError(f"{path} has {actual:,} bytes, its manifest says {size:,}; "
                             "the file was altered or truncated, refusing it", expected=str(size), actual=str(actual))
    with open(path, "rb") as handle:
        head = handle.read(16)
    try:
        found = detect_format(head)
    except ArtifactError:
        raise ArtifactError(f"{path} is neither a TFLite flatbuffer nor an ONNX model (its first bytes); "
                            f"refused before its {size:,} bytes were read") from None
    if fmt in (ArtifactFormat.TFLITE.value, ArtifactFormat.ONNX.value) and found.value != fmt:
        raise ArtifactError(f"{path} is a {found.value} file, its manifest says {fmt}; refusing it")
    return path


def _mismatch(path: Path, expected: str, actual: str) -> IntegrityError:
    return IntegrityError(f"{path} does not match its manifest: sha256 {actual[:12]}... != {expected[:12]}...; "
                          "the file was altered or truncated, refusing it", expected=expected, actual=actual)


def check_entry(folder: str | Path, entry: dict[str, Any]) -> bytes:
    """Read the artifact named by ``entry`` (size checked first) and check its SHA-256; return its bytes.

    The bytes returned are the ones hashed: a file swapped after the check is never used.
    """
    name, expected, size = _entry_fields(entry)
    path = _artifact_path(folder, name, size, entry.get("format"))
    data = read_bounded(path, max_bytes=size, what="manifest entry of that size")
    actual = sha256_bytes(data)
    if actual != expected:
        raise _mismatch(path, expected, actual)
    return data


def copy_verified(folder: str | Path, entry: dict[str, Any], target: Path) -> None:
    """Copy the artifact of ``entry`` to ``target`` in 1 MiB chunks, hashing what is written; the copy
    is flushed to disk and must match the manifest (memory stays bounded whatever the file's size)."""
    name, expected, size = _entry_fields(entry)
    path = _artifact_path(folder, name, size, entry.get("format"))
    digest, written = hashlib.sha256(), 0
    with open(path, "rb") as src, open(target, "wb") as dst:
        while written <= size and (chunk := src.read(1 << 20)):
            digest.update(chunk)
            dst.write(chunk)
            written += len(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    if written != size or digest.hexdigest() != expected:
        raise _mismatch(path, expected, digest.hexdigest())


def check_folder(folder: str | Path) -> list[ArtifactEntry]:
    """Check every artifact the manifest lists, hashing in 1 MiB chunks; return them (without bytes)."""
    manifest = read_manifest(folder)
    out = []
    for entry in manifest["artifacts"]:
        name, expected, size = _entry_fields(entry)
        path = _artifact_path(folder, name, size, entry.get("format"))
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != expected:
            raise _mismatch(path, expected, digest.hexdigest())
        out.append(ArtifactEntry(path, entry.get("format", ""), expected, size, entry))
    return out


def verified_artifact(folder: str | Path, *, runtime: Runtime | str | None = None,
                      kind: str | None = None) -> ArtifactEntry:
    """Pick the artifact of ``folder`` this device can run (TFLite first), read and check it, return it
    with its bytes (load those: they are the ones that were hashed)."""
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
            return ArtifactEntry(Path(folder) / entry["file"], entry["format"], entry["sha256"], len(data), entry,
                                 data)
    formats = ", ".join(sorted({str(e.get('format', '?')) for e in entries})) or "none"
    raise ArtifactError(f"no artifact in {folder} can run here (it has: {formats}; installed runtimes: "
                        f"{', '.join(r.value for r in installed) or 'none'})")
