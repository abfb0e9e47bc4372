"""The store's current version, served with telemetry: an application that serves through the agent records what
it served (:mod:`device_agents.serving.stats`) into the store's bounded spool (:mod:`device_agents.serving.spool`),
aggregates only, never a sample.

>>> with ServedModel.open(ModelStore("/var/lib/edgekit")) as served:     # doctest: +SKIP
...     scores = served.predict(x)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.errors import AgentError, InstallError
from device_agents.serving.integrity import read_manifest, verified_artifact
from device_agents.serving.runtime import Model, Runtime
from device_agents.serving.spool import DEFAULT_SPOOL_BYTES, Spool
from device_agents.serving.stats import ServingStats, features_of, reference_edges
from device_agents.store.model_store import ModelStore

SPOOL_FOLDER = "telemetry"
"""The spool's folder in the store's root."""
FLUSH_SECONDS = 60.0
FLUSH_CALLS = 10_000
FOLLOW_SECONDS = 1.0
"""How often a :class:`ServedModel` opened from a store looks for a new current version (a rollout, a rollback)."""


class ServedModel:
    """A :class:`~device_agents.Model` whose every :meth:`predict` is counted, timed and summarised per version;
    the window goes to the spool every ``flush_seconds`` or ``flush_calls`` calls, and at :meth:`close`.

    Opened from a store (:meth:`open`), it follows the store: at most every :data:`FOLLOW_SECONDS` it looks at the
    current version and, when a rollout or a rollback changed it, flushes the window and serves the new one (a
    version that does not verify or load is not served: the one in memory keeps serving, and is looked at again
    at the next check). A call that raises, or returns non-finite scores, is an error."""

    def __init__(self, model: Model, version: str, spool: Spool, *, edges: list[list[float]] | None = None,
                 flush_seconds: float = FLUSH_SECONDS, flush_calls: int = FLUSH_CALLS,
                 follow: ModelStore | None = None, runtime: Runtime | str | None = None,
                 num_threads: int | None = None) -> None:
        self.spool, self.flush_seconds, self.flush_calls = spool, float(flush_seconds), int(flush_calls)
        self._follow, self._load_options = follow, {"runtime": runtime, "num_threads": num_threads}
        self._next_check = time.monotonic() + FOLLOW_SECONDS
        self._serve(model, version, edges)
        self._stats = self._new()

    def _serve(self, model: Model, version: str, edges: list[list[float]] | None) -> None:
        self.model, self.version, self.edges = model, version, edges
        self._features = features_of(model.example_input()).shape[1]
        if edges is not None and len(edges) != self._features:
            self.edges = None  # a reference of another input shape: served without bins
        self._classes = int(np.prod([d for d in model.outputs[0].shape[1:] if d > 0]) or 1)

    @classmethod
    def open(cls, store: ModelStore, *, runtime: Runtime | str | None = None, num_threads: int | None = None,
             max_spool_bytes: int = DEFAULT_SPOOL_BYTES, flush_seconds: float = FLUSH_SECONDS,
             flush_calls: int = FLUSH_CALLS) -> ServedModel:
        """The store's current version (hash-checked as :func:`~device_agents.serving.integrity.verified_artifact`
        checks it), served into the store's spool; served inputs are counted in the bins of the release's
        reference statistics (its manifest's ``reference``) when it has them."""
        current = store.current
        if current is None:
            raise InstallError(f"{store.root} has no current version: install one first")
        model, edges = _load(current, runtime=runtime, num_threads=num_threads)
        spool = Spool(Path(store.root) / SPOOL_FOLDER, max_bytes=max_spool_bytes)
        return cls(model, current.name, spool, edges=edges, flush_seconds=flush_seconds, flush_calls=flush_calls,
                   follow=store, runtime=runtime, num_threads=num_threads)

    def _check_store(self) -> None:
        """Serve the store's current version when it is no longer the one served (see the class)."""
        if self._follow is None or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + FOLLOW_SECONDS
        current = self._follow.current
        if current is None or current.name == self.version:
            return
        try:
            model, edges = _load(current, **self._load_options)
        except AgentError:
            return
        self.flush()
        self._serve(model, current.name, edges)
        self._stats = self._new()

    def _new(self) -> ServingStats:
        now = time.time()
        return ServingStats(self.version, self._classes, self._features, self.edges, start=now, end=now)

    def predict(self, x: np.ndarray, **kwargs: Any) -> np.ndarray:
        """:meth:`Model.predict`, recorded (a failed call is counted as an error and re-raised; non-finite scores
        are returned and counted as an error)."""
        self._check_store()
        start = time.perf_counter()
        try:
            outputs = self.model.predict(x, **kwargs)
        except Exception:
            self._stats.record_error(seconds=time.perf_counter() - start)
            self._maybe_flush()
            raise
        seconds = time.perf_counter() - start
        if not np.all(np.isfinite(outputs)):
            self._stats.record_error(seconds=seconds)
            self._maybe_flush()
            return outputs
        batch = np.asarray(x)
        single = batch.ndim == len(self.model.inputs[0].shape) - 1
        self._stats.record(batch[None] if single else batch, outputs[None] if single else outputs, seconds=seconds)
        self._maybe_flush()
        return outputs

    def _maybe_flush(self) -> None:
        if (self._stats.calls >= self.flush_calls
                or time.time() - self._stats.start >= self.flush_seconds):
            self.flush()

    def flush(self) -> Path | None:
        """Write the current window to the spool (nothing when nothing was served) and start a new one."""
        stats, self._stats = self._stats, self._new()
        stats.end = time.time()
        return self.spool.append(stats)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ServedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load(folder: Path, *, runtime: Runtime | str | None, num_threads: int | None) -> tuple[Model,
                                                                                          list[list[float]] | None]:
    """The inference artifact of an installed version (hash-checked) and its release's reference bin edges."""
    entry = verified_artifact(folder, runtime=runtime, kind="inference")
    model = Model.load(entry.data, runtime=runtime, num_threads=num_threads)
    return model, reference_edges(read_manifest(folder))
