"""Inspection: ops, sizes, I/O quantization of an artifact, and a check of an output folder's manifest."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path
from typing import Any

from device_agents.errors import AgentError
from device_agents.serving.integrity import check_entry, read_manifest
from device_agents.serving.runtime import ArtifactFormat, Model, detect_format
from edgekit.errors import InputError


def inspect_artifact(target: str | Path) -> dict[str, Any]:
    """Describe a ``.tflite``/``.onnx`` file, or check and describe every artifact of an output folder.

    >>> info = inspect_artifact("out")                     # doctest: +SKIP
    >>> info["manifest_ok"], info["artifacts"][0]["ops"]   # doctest: +SKIP
    (True, {'CONV_2D': 2, 'FULLY_CONNECTED': 1, ...})
    """
    target = Path(target)
    if not target.exists():
        raise InputError(f"{target} does not exist; give a .tflite/.onnx file or an edgekit output folder")
    if target.is_file():
        from device_agents.files import MAX_ARTIFACT_BYTES, UnsafeFileError, read_bounded

        try:
            data = read_bounded(target, max_bytes=MAX_ARTIFACT_BYTES, what="artifact")
        except UnsafeFileError as exc:
            raise InputError(str(exc)) from None
        return {"path": str(target), "manifest_ok": None, "artifacts": [_describe(data, target.name)]}
    try:
        manifest = read_manifest(target)
    except AgentError as exc:
        raise InputError(str(exc)) from None
    artifacts, problems = [], []
    for entry in manifest["artifacts"]:
        try:
            data = check_entry(target, entry)
        except AgentError as exc:
            problems.append(str(exc))
            continue
        info = _describe(data, entry["file"])
        info.update({k: entry.get(k) for k in ("quantization", "sparsity", "accuracy", "top1_agreement")})
        info["sha256_ok"] = True
        artifacts.append(info)
    return {"path": str(target), "manifest_ok": not problems, "problems": problems,
            "edgekit_version": manifest.get("edgekit_version"), "kind": manifest.get("kind"),
            "source": manifest.get("source"), "artifacts": artifacts}


def _describe(data: bytes, name: str) -> dict[str, Any]:
    try:
        fmt = detect_format(data)
    except AgentError as exc:
        raise InputError(f"{name}: {exc}") from None
    info = {"file": name, "format": fmt.value, "bytes": len(data),
            "gzip_bytes": len(gzip.compress(data, compresslevel=9, mtime=0)), "signatures": {}}
    from google.protobuf.message import DecodeError

    try:
        if fmt is ArtifactFormat.TFLITE:
            from edgekit.export.tflite import tflite_ops, tflite_signatures

            info["ops"] = dict(sorted(Counter(tflite_ops(data)).items()))
            info["signatures"] = tflite_signatures(data)
        else:
            from edgekit.export.onnx import onnx_ops

            info["ops"] = dict(sorted(Counter(onnx_ops(data)).items()))
    except (ValueError, RuntimeError, DecodeError) as exc:  # the runtime's or onnx's parser refused it
        from device_agents.errors import first_line

        raise InputError(f"{name}: not a valid {fmt.value} artifact ({first_line(exc)})") from None
    if info["signatures"] and len(info["signatures"]) > 1:  # a trainable artifact: signatures, no plain input
        info["inputs"], info["outputs"] = [], []
        return info
    try:
        if fmt is ArtifactFormat.TFLITE:  # in a child first: a file LiteRT aborts on would take this process along
            from edgekit.export.verify import probe

            probe(data, _zeros(data))
        model = Model.load(data)
    except AgentError as exc:
        raise InputError(f"{name}: {exc}") from None
    info["inputs"] = [s.to_dict() for s in model.inputs]
    info["outputs"] = [s.to_dict() for s in model.outputs]
    return info


def _zeros(data: bytes) -> Any:
    """One all-zero sample of a ``.tflite``'s first input, read without allocating its tensors."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(model_content=data).get_input_details()
    if not details:  # Model.load says what it lacks
        return np.zeros((1,), np.float32)
    return np.zeros([max(int(d), 1) for d in details[0]["shape"]], details[0]["dtype"])
