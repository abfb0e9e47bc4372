"""The main job on the embedded digits data: train a small CNN, compress it within a 1-point budget.

Run by ``make demo``. Each step calls the ``edgekit`` command line, as a user would.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def sh(*args: str) -> None:
    print("$ " + " ".join(args), flush=True)
    subprocess.run(args, check=True)


def train(out: Path) -> Path:
    """Train the digits CNN on the fine-tune/calibration parts; the evaluation part stays unseen."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from edgekit import zoo
    from edgekit.data import Dataset, load_digits, split

    data = load_digits()
    parts = split(data, seed=0)  # the same seeded split `edgekit compress --data digits` makes
    train_set = Dataset(
        *(__import__("numpy").concatenate([a, b]) for a, b in
          ((parts.finetune.x, parts.calibration.x), (parts.finetune.y, parts.calibration.y))), "digits-train")
    start = time.perf_counter()
    model = zoo.train(zoo.digits_cnn(), train_set, epochs=15)
    print(f"trained the digits CNN on {len(train_set)} samples on the {zoo.device_name()} "
          f"in {time.perf_counter() - start:.1f} s", flush=True)
    path = out / "digits_cnn.keras"
    model.save(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    step("1. Train a small CNN on the embedded digits data")
    model = train(args.out)

    step("2. Compress it to TFLite and ONNX within 1 accuracy point (every candidate verified in its runtime)")
    sh(str(BIN / "edgekit"), "compress", str(model), "--data", "digits", "--out", str(args.out / "compressed"),
       "--max-accuracy-drop", "1", "--formats", "tflite,onnx")

    step("3. Inspect the result")
    sh(str(BIN / "edgekit"), "inspect", str(args.out / "compressed"))
    print(f"\nreport: {args.out / 'compressed' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
