"""Shared by the benchmark scripts: each one rewrites its own section of BENCHMARKS.md."""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = ("# edgekit benchmarks\n\nEvery figure below was measured by the script named in its section, "
          "side by side in one run, on the machine described there. Re-run a script to refresh its section.\n")


def machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, commit {commit()}"


def commit() -> str:
    """The short hash of the checked-out commit (what a row was measured at)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=ROOT).stdout.strip() or "?"


def median_us(fn: Callable[[], object], *, repeats: int = 200, warmup: int = 20) -> tuple[float, float]:
    """Median and 99th percentile of ``fn``'s wall time in microseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - start) / 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def interleaved_us(fn_a: Callable[[], object], fn_b: Callable[[], object], *, blocks: int = 10,
                   per_block: int = 100) -> tuple[float, float, float]:
    """Medians (µs) of ``fn_a`` and ``fn_b`` measured in alternating blocks, and the median of the
    per-block ratios a/b: drift of the machine (frequency, other load) hits both alike."""
    a_all, b_all, ratios = [], [], []
    for _ in range(blocks):
        a, _ = median_us(fn_a, repeats=per_block, warmup=5)
        b, _ = median_us(fn_b, repeats=per_block, warmup=5)
        a_all.append(a)
        b_all.append(b)
        ratios.append(a / b)
    return statistics.median(a_all), statistics.median(b_all), statistics.median(ratios)


def write_section(name: str, body: str, *, path: Path = BENCHMARKS) -> None:
    """Replace the section between this benchmark's markers in ``path`` (or append it)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
