"""Run a model for the first time in a child process.

A runtime that aborts takes its process with it, with no Python exception to catch: LiteRT aborted (SIGABRT in
``invoke()``) on the TFLite converter's 16x8 ``.tflite`` of a Keras transformer. So a model that has never run on
this machine runs once in a child first, through this package's own code; a crash, a failure or a hang becomes a
reason string, and the calling process (a device's installer, edgekit's quantizer) carries on.

>>> probe_artifact(data, x[:1]) is None                     # doctest: +SKIP
True
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from device_agents.errors import AgentError, InstallError
from device_agents.protocol import FLOWER_ENV
from device_agents.serving.integrity import read_manifest, verified_artifact
from device_agents.serving.runtime import Model

PROBE_SECONDS = 300.0
"""How long one probe may take (loading the runtime and one inference) before it counts as hung."""
_FAILED = 3  # the child's exit code when the model ran and failed (the reason is its last stderr line)


def probe_artifact(artifact: bytes, sample: np.ndarray, *, runtime: str | None = None,
                   timeout: float = PROBE_SECONDS) -> str | None:
    """Run ``artifact`` once on ``sample`` (:class:`~device_agents.serving.runtime.Model`) in a child process:
    ``None`` when it ran, else what happened."""
    with tempfile.TemporaryDirectory(prefix="edgekit-probe-") as tmp:
        model, x = Path(tmp, "artifact"), Path(tmp, "sample.npy")
        model.write_bytes(artifact)
        np.save(x, sample, allow_pickle=False)
        return _run(["artifact", str(model), str(x), runtime or ""], cwd=tmp, timeout=timeout)


def probe_folder(folder: str | Path, *, runtime: str | None = None, timeout: float = PROBE_SECONDS) -> str | None:
    """Run the smoke test of a model folder (:func:`smoke_test`) in a child process: ``None``
    when it passed, else why not."""
    return _run(["folder", str(Path(folder).absolute()), runtime or ""], cwd=str(folder), timeout=timeout)


def _run(args: list[str], *, cwd: str, timeout: float) -> str | None:
    root = str(Path(__file__).resolve().parents[2])  # the folder holding device_agents/
    path = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))
    env = {**os.environ, **FLOWER_ENV, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": path}
    try:
        proc = subprocess.run([sys.executable, "-m", "device_agents.store.isolation", *args], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        return f"the runtime did not finish one inference in {timeout:g} s"
    if proc.returncode < 0:
        return f"the runtime crashed running it ({signal.Signals(-proc.returncode).name})"
    if proc.returncode:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        return lines[-1][:300] if lines else f"the probe exited with code {proc.returncode}"
    return None


def _main(argv: list[str]) -> int:
    mode, *rest = argv
    try:
        if mode == "artifact":
            path, sample, runtime = rest
            Model.load(Path(path).read_bytes(), runtime=runtime or None, num_threads=1).predict(
                np.load(sample, allow_pickle=False))
        else:
            folder, runtime = rest
            smoke_test(Path(folder), runtime or None)
    except (AgentError, ValueError, OSError) as exc:
        print(f"{type(exc).__name__}: {exc}" if not isinstance(exc, AgentError) else str(exc), file=sys.stderr)
        return _FAILED
    return 0


SMOKE_FAILED = "the new version failed its smoke test"


def smoke_test(folder: Path, runtime: str | None) -> None:
    """Load the artifact, run one sample, require finite outputs (:class:`InstallError` otherwise). The store runs
    it in a child process (:func:`probe_folder`)."""
    import numpy as np

    try:
        manifest = read_manifest(folder)
        if manifest.get("kind") == "trainable":
            from device_agents.training.trainer import Trainer

            trainer = Trainer.load(folder, runtime=runtime)
            shape = [1, *trainer.spec["input"]["shape"][1:]]
            out = trainer.predict(np.zeros(shape, np.float32))
        else:
            entry = verified_artifact(folder, runtime=runtime)
            model = Model.load(entry.data, runtime=runtime)
            out = model.predict(model.example_input())
    except AgentError as exc:
        raise InstallError(f"{SMOKE_FAILED}: {exc}") from None
    if not np.isfinite(out).all():
        raise InstallError(f"{SMOKE_FAILED}: non-finite outputs")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
