"""The KL (entropy) threshold search: onnxruntime's ``get_entropy_threshold`` against edgekit's vectorised one
(``edgekit/export/entropy.py``), on the same 2048-bin histograms, in alternating blocks of CPU time; both must
choose the same thresholds. Writes the "entropy" section of BENCHMARKS.md.

    .venv/bin/python benchmarks/entropy.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from _report import machine, write_section  # noqa: E402


def histograms(count: int = 21) -> list[tuple]:
    """Activation-like histograms as onnxruntime's collector keeps them: normal, one-sided heavy-tailed (after a
    ReLU) and with a few massive values, 20,000 values each."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(count):
        values = rng.standard_normal(20_000) * (1 + k % 3)
        if k % 3 == 1:
            values = np.abs(values) ** 2
        if k % 3 == 2:
            values[:4] = 500.0 * (k + 1)
        top = np.abs(values).max()
        counts, edges = np.histogram(values, bins=2048, range=(-top, top))
        out.append((counts.astype(np.int64), edges.astype(np.float32), np.float32(values.min()),
                    np.float32(values.max())))
    return out


def main() -> None:
    from onnxruntime.quantization.calibrate import HistogramCollector

    from edgekit.export.entropy import entropy_threshold

    theirs = HistogramCollector(method="entropy", symmetric=False, num_bins=2048, num_quantized_bins=128,
                                percentile=99.999, scenario="same").get_entropy_threshold
    cases = histograms()
    same = all([float(v) for v in theirs(h, 128)] == [float(v) for v in entropy_threshold(h, 128)] for h in cases)
    blocks: list[tuple[float, float]] = []
    for _ in range(5):
        pair = []
        for search in (theirs, entropy_threshold):
            start = time.process_time()
            for h in cases:
                search(h, 128)
            pair.append(time.process_time() - start)
        blocks.append((pair[0], pair[1]))
    ratios = [a / b for a, b in blocks]
    lines = ["## The KL (entropy) threshold search", "",
             f"`.venv/bin/python benchmarks/entropy.py` on {machine()}.", "",
             f"{len(cases)} activation-like 2048-bin histograms (normal, one-sided heavy-tailed, a few massive "
             "values), 128 quantized bins, CPU time in 5 alternating blocks:", "",
             "| search | CPU s for all histograms (median block) | per histogram |", "|---|---|---|",
             f"| onnxruntime `HistogramCollector.get_entropy_threshold` | {statistics.median(b[0] for b in blocks):.2f}"
             f" | {statistics.median(b[0] for b in blocks) / len(cases) * 1000:.0f} ms |",
             f"| edgekit `entropy_threshold` | {statistics.median(b[1] for b in blocks):.2f} | "
             f"{statistics.median(b[1] for b in blocks) / len(cases) * 1000:.0f} ms |", "",
             f"Median block ratio {statistics.median(ratios):.1f}x (blocks {min(ratios):.1f}-{max(ratios):.1f}x); "
             f"the same thresholds on every histogram: {'yes' if same else 'NO'}. Each entropy rung of the remedy "
             "ladders runs this search once per activation tensor in each format."]
    write_section("entropy", "\n".join(lines))
    print("\n".join(lines))
    if not same:
        raise SystemExit("the thresholds differ from onnxruntime's")


if __name__ == "__main__":
    main()
