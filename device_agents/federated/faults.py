"""Rehearsed faults (tests and drills): what a faulty or hostile device sends instead of its honest reply, and the
audit copy of every reply, so a device owner can check what left the device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from device_agents.protocol import Fault, Metric


def rehearse(fault: Fault, pid: int, new: dict[str, np.ndarray], metrics: dict[str, Any], *,
              output_bias: str, base: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """What a faulty or hostile device sends instead of its honest reply (tests and drills)."""
    if fault is Fault.CRASH:
        raise RuntimeError(f"client {pid}: simulated crash")
    if fault is Fault.NAN:
        new = {k: np.full_like(v, np.nan) for k, v in new.items()}
    elif fault is Fault.SHAPE:
        new = {k: v[..., :1] if v.ndim else v for k, v in new.items()}
    elif fault is Fault.SCALE:
        new = {k: (v * np.float32(1e30)).astype(np.float32) for k, v in new.items()}
    elif fault is Fault.LIAR:  # the output bias makes every prediction class 0
        bias = np.zeros_like(new[output_bias])
        bias[..., 0] = 100.0
        new = {**new, output_bias: bias}
        metrics = {**metrics, Metric.NUM_EXAMPLES: 10**12}
    elif fault is Fault.SIGN_FLIP:
        new = {k: (base[k] - np.float32(4.5) * (v - base[k])).astype(v.dtype) for k, v in new.items()}
        metrics = {**metrics, Metric.NUM_EXAMPLES: int(metrics[Metric.NUM_EXAMPLES]) * 100}
    elif fault is Fault.FLOAT64:
        new = {k: np.full(v.shape, 1e300, np.float64) for k, v in new.items()}
    elif fault is Fault.NAN_EXAMPLES:
        metrics = {**metrics, Metric.NUM_EXAMPLES: float("nan")}
    elif fault is Fault.LIST_EXAMPLES:
        metrics = {**metrics, Metric.NUM_EXAMPLES: [5]}
    elif fault is Fault.EXTRA_METRIC:
        metrics = {**metrics, "label-0-count": 17}
    return new, metrics


def audit(audit_dir: str | None, pid: int, kind: str, content: Any) -> None:
    """Write what a reply carries: every array, and every metric/config value."""
    if audit_dir is None:
        return
    import json
    import os

    folder = Path(audit_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"client{pid}-{kind}-{os.getpid()}-{len(list(folder.iterdir()))}"
    from flwr.app import ArrayRecord

    tensors = [name for name in ("arrays", "codec") if name in content and isinstance(content[name], ArrayRecord)]
    arrays = {f"{record}/{k}": v.numpy() for record in tensors for k, v in content[record].items()}
    np.savez(f"{stem}.npz", **{k.replace("/", "__"): v for k, v in arrays.items()})
    records = {name: {k: v for k, v in content[name].items()} for name in ("metrics", "codec")
               if name in content and name not in tensors}
    Path(f"{stem}.json").write_text(json.dumps(records, default=float))
