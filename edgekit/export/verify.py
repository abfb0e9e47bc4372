"""Run each artifact in its own runtime (through the device agent's code) and compare with the source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from device_agents.errors import AgentError
from device_agents.serving.runtime import Model, TensorSpec
from edgekit.config import Quantization
from edgekit.errors import ConversionError, VerificationError

# Float artifacts must reproduce the Keras model they were converted from:
# |artifact - keras| <= atol + rtol * max|keras output|.
FLOAT_TOLERANCE = {Quantization.NONE: (1e-4, 1e-4), Quantization.FLOAT16: (5e-2, 5e-2)}


def float_tolerance(quantization: Quantization) -> tuple[float, float] | None:
    """(atol, rtol) a float artifact must meet, or ``None`` for quantized artifacts."""
    return FLOAT_TOLERANCE.get(quantization)


@dataclass
class Verification:
    runtime: str
    accuracy: float | None
    top1_agreement: float
    max_abs_diff: float              # vs the source model
    conversion_max_abs_diff: float   # vs the Keras model the artifact was converted from
    tolerance: float | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    latency_us: float  # median single-sample time in its runtime (see latency_us)


LATENCY_REPEATS = 40
PROBED_KEPT = 512
"""How many artifacts' probe outcomes :func:`load_probed` remembers (by digest), so a verified artifact is not
probed again when it is timed or loaded once more."""
_probed: dict[bytes, str | None] = {}


def load_probed(artifact: bytes, sample: np.ndarray, *, threads: int | None = None) -> Model:
    """``artifact`` loaded in this process, a ``.tflite`` after its first run in a child process
    (:func:`device_agents.store.isolation.probe_artifact`, on ``sample``'s first row).

    LiteRT aborts the process on some of the converter's int8 graphs (SIGABRT in ``allocate_tensors()``, delegate
    or not: a Keras time-series Transformer's), which no exception reports: edgekit died with exit code 134 and no
    message, its output's staging folder left behind. A crash in the child is an :class:`AgentError` here, which a
    quantization ladder treats as a rung that did not run."""
    probe(artifact, sample)
    return Model.load(artifact, num_threads=threads)


def probe(artifact: bytes, sample: np.ndarray) -> None:
    """Run a ``.tflite`` ``artifact`` once on ``sample[:1]`` in a child process, unless it ran before (remembered
    by digest); :class:`AgentError` saying what happened when it crashed, failed or hung (see :func:`load_probed`).
    Call it before any interpreter of this process allocates a quantized artifact's tensors."""
    import hashlib

    from device_agents.errors import ArtifactError
    from device_agents.serving.runtime import ArtifactFormat, detect_format
    from device_agents.store.isolation import probe_artifact

    if detect_format(artifact) is not ArtifactFormat.TFLITE:
        return
    key = hashlib.sha256(artifact).digest()
    if key not in _probed:
        if len(_probed) >= PROBED_KEPT:
            _probed.pop(next(iter(_probed)))
        _probed[key] = probe_artifact(artifact, sample[:1])
    if _probed[key] is not None:
        raise ArtifactError(str(_probed[key]))


def _clock(threads: int | None) -> Callable[[], int]:
    """The clock single-sample calls are timed with: with one thread both runtimes compute on the calling thread, so
    that thread's CPU time, which other processes on the machine do not inflate (on an idle machine it equals the
    wall time); with more threads the wall time, since the parallel speed-up is part of what is measured."""
    import time

    return time.thread_time_ns if threads == 1 else time.perf_counter_ns


def latency_us(model: Model, sample: np.ndarray, *, threads: int | None, repeats: int = LATENCY_REPEATS) -> float:
    """Median time of one single-sample call of ``model`` (loaded with ``threads`` threads) in microseconds, after 5
    warm-up calls, timed as :func:`_clock` says."""
    import statistics

    clock = _clock(threads)
    for _ in range(5):
        model.predict(sample)
    times = []
    for _ in range(repeats):
        start = clock()
        model.predict(sample)
        times.append((clock() - start) / 1000)
    return float(statistics.median(times))


BLOCK_SECONDS = 0.01
"""How long one block of :func:`latency_ratio` runs at least (in CPU time with one thread): a tiny model's block of
20 calls was about 1 ms, timer and scheduler noise. 10 ms blocks measured as steady as 20 ms ones and cost half the
time (the 8x8 test CNN's int8 ``.onnx`` against itself, 12 ratios each: median ratio 0.98-1.04 with a standard
deviation of 0.019 at 10 ms, 0.97-1.02 and 0.020 at 20 ms; 0.13 s a ratio against 0.25 s). A model whose call takes
over 0.5 ms runs :data:`MIN_BLOCK_CALLS` calls a block either way."""
MIN_BLOCK_CALLS = 20
"""Calls per block at least: fewer let the other model's block bias the ratio (its cache state lasts several calls:
EfficientNetB0's 16x8 ``.tflite`` read 4.9x the float32 time in blocks of 3 calls, 6.3x in blocks of 20, 6.2x apart)."""


def latency_ratio(reference: bytes, candidate: bytes, sample: np.ndarray, *, threads: int, blocks: int = 8,
                  calls: int | None = None) -> float:
    """The median of :func:`latency_ratios`: ``candidate``'s single-sample time over ``reference``'s."""
    import statistics

    return float(statistics.median(latency_ratios(reference, candidate, sample, threads=threads, blocks=blocks,
                                                  calls=calls)))


def latency_ratios(reference: bytes, candidate: bytes, sample: np.ndarray, *, threads: int, blocks: int = 8,
                   calls: int | None = None) -> list[float]:
    """``candidate``'s single-sample time over ``reference``'s in each of ``blocks`` alternating blocks of ``calls``
    calls, so both see the same machine state and small differences are not noise from running one after the
    other (their spread is the measurement's own). ``calls`` defaults to what makes the slower model's block last at
    least :data:`BLOCK_SECONDS` (:data:`MIN_BLOCK_CALLS` to 500 calls), timed on the warm-up calls; each block
    starts with one untimed call.

    Blocks are timed as :func:`_clock` says: with one thread in CPU time, so other processes on the machine (a
    build, a test run, the other tenants of a CI box) cannot bias the ratio; in wall time, with four busy processes
    on two cores, an artifact against itself read from 0.37x to 5.5x. With more threads the ratio is in wall time,
    as exact as the machine is quiet.

    >>> latency_ratios(float32_tflite, int8_tflite, x[:1], threads=1)   # doctest: +SKIP
    [0.66, 0.65, 0.67, 0.66, 0.66, 0.68, 0.65, 0.66]
    """
    clock = _clock(threads)
    models = [Model.load(reference, num_threads=threads), Model.load(candidate, num_threads=threads)]
    warm: list[int] = []
    for model in models:
        model.predict(sample)
        start = clock()
        for _ in range(4):
            model.predict(sample)
        warm.append((clock() - start) // 4)
    if calls is None:
        calls = int(min(500, max(MIN_BLOCK_CALLS, BLOCK_SECONDS * 1e9 // max(max(warm), 1))))
    ratios: list[float] = []
    for _ in range(blocks):
        pair: list[int] = []
        for model in models:
            model.predict(sample)  # untimed: the other model's block left the caches cold
            start = clock()
            for _ in range(calls):
                model.predict(sample)
            pair.append(max(clock() - start, 1))
        ratios.append(pair[1] / pair[0])
    return ratios


def measure_latency(artifact: bytes, sample: np.ndarray, *, threads: int) -> float:
    """Single-sample latency (µs) of an artifact in its runtime."""
    return latency_us(Model.load(artifact, num_threads=threads), sample, threads=threads)


def verify(artifact: bytes, *, name: str, quantization: Quantization, x: np.ndarray, y: np.ndarray | None,
           source_outputs: np.ndarray, converted_outputs: np.ndarray,
           tolerance_rule: tuple[float, float] | None = None, threads: int = 1) -> Verification:
    """Load ``artifact`` in its runtime, run ``x``, and compare with the source model's outputs.

    ``converted_outputs`` are those of the Keras model the artifact was converted from (the pruned
    or distilled model, say): a float artifact must reproduce them within the tolerance, else
    :class:`VerificationError`. ``tolerance_rule`` is (atol, rtol), see :func:`float_tolerance`.
    Accuracy, top-1 agreement and max abs difference are vs the source; latency is the median single-sample
    time with ``threads`` interpreter threads.
    """
    try:
        model = (Model.load(artifact, num_threads=threads) if quantization is Quantization.NONE
                 else load_probed(artifact, x, threads=threads))  # the crashes seen are all in quantized kernels
        out = model.predict(x)
        latency = latency_us(model, x[:1], threads=threads)
    except AgentError as exc:
        raise ConversionError(f"{name}: the exported artifact does not run in its runtime: {exc}") from None
    if out.shape != source_outputs.shape:
        raise VerificationError(f"{name}: outputs have shape {out.shape}, the source's {source_outputs.shape}",
                                max_abs_diff=float("inf"), tolerance=0.0, artifact=name)
    diff = float(np.max(np.abs(out - source_outputs))) if out.size else 0.0
    conversion_diff = float(np.max(np.abs(out - converted_outputs))) if out.size else 0.0
    tolerance = None
    if tolerance_rule is not None:
        atol, rtol = tolerance_rule
        tolerance = atol + rtol * float(np.max(np.abs(converted_outputs)))
        if not conversion_diff <= tolerance:
            raise VerificationError(
                f"{name}: outputs differ from the Keras model it was converted from by up to "
                f"{conversion_diff:.3g} (tolerance {tolerance:.3g} for {quantization.value})",
                max_abs_diff=conversion_diff, tolerance=tolerance, artifact=name)
    agreement = float(np.mean(out.argmax(1) == source_outputs.argmax(1)) * 100.0)
    accuracy = None if y is None else float(np.mean(out.argmax(1) == y) * 100.0)
    return Verification(model.runtime.value, accuracy, agreement, diff, conversion_diff, tolerance,
                        model.inputs, model.outputs, latency)
