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
ROOT = Path(__file__).resolve().parents[1]


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def sh(*args: str) -> None:
    print("$ " + " ".join(args), flush=True)
    code = subprocess.run(args).returncode
    if code:  # the command printed its one-line error: stop with its exit code, no traceback
        sys.exit(code)


def train(out: Path) -> Path:
    """Train the digits CNN on the fine-tune/calibration parts; the evaluation part stays unseen."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    from edgekit.loading import zoo
    from edgekit.loading.data import Dataset, load_digits, split

    parts = split(load_digits(), seed=0)  # the same seeded split `edgekit compress --data digits` makes
    train_set = Dataset(np.concatenate([parts.finetune.x, parts.calibration.x]),
                        np.concatenate([parts.finetune.y, parts.calibration.y]), "digits-train")
    start = time.perf_counter()
    model = zoo.train(zoo.digits_cnn(), train_set, epochs=25)
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

    step("4. Run it through the device agent (a process without TensorFlow) next to the source model")
    device_vs_source(model, args.out)

    step("5. Federated learning: the devices' private data teaches the model what the server never saw")
    federate(args.out)
    print(f"\nreport: {args.out / 'compressed' / 'report.md'}; federated: {args.out / 'federated' / 'history.json'}")
    return 0


SERVER_CLASSES = 5
"""The server's own data holds only the digits 0-4; the devices hold every digit."""


def federate(out: Path) -> None:
    """A model trained on digits 0-4 only, federated over 10 devices holding every digit (non-IID)."""
    import json

    import numpy as np

    from edgekit.loading import zoo
    from edgekit.loading.data import Dataset, load_digits, split

    parts = split(load_digits(), seed=0)
    x = np.concatenate([parts.finetune.x, parts.calibration.x])
    y = np.concatenate([parts.finetune.y, parts.calibration.y])
    seen = y < SERVER_CLASSES
    model = zoo.train(zoo.digits_cnn(), Dataset(x[seen], y[seen], "server-digits-0-4"), epochs=15)
    path = out / "server_digits_0-4.keras"
    model.save(path)
    print(f"the server trained the digits CNN on its own {int(seen.sum())} samples of the digits "
          f"0-{SERVER_CLASSES - 1}; the devices' data (every digit) never leaves them", flush=True)
    sh(str(BIN / "edgekit"), "fl", "simulate", "--model", str(path), "--data", "digits", "--clients", "10",
       "--rounds", "10", "--partition", "dirichlet:0.5", "--compress-updates", "int4",
       "--out", str(out / "federated"), "--quiet")
    rounds = json.loads((out / "federated" / "history.json").read_text())["rounds"]
    trace = "  ".join(f"{h['accuracy']:.0f}" for h in rounds)
    print(f"held-out accuracy on every digit, round by round (%): {trace}")
    print(f"before federated learning: {rounds[0]['accuracy']:.2f}%  after {len(rounds) - 1} rounds: "
          f"{rounds[-1]['accuracy']:.2f}%  plot: {out / 'federated' / 'accuracy.png'}")


def device_vs_source(model: Path, out: Path) -> None:
    """Accuracy, latency and memory of the agent (LiteRT) and of the source model (TensorFlow)."""
    import json

    import numpy as np

    from edgekit.loading.data import load_digits, split

    evaluation = split(load_digits(), seed=0).evaluation
    npz = out / "evaluation.npz"
    np.savez(npz, x=evaluation.x, y=evaluation.y)
    agent = [str(BIN / "edgekit-agent")]
    sh(*agent, "predict", "--model", str(out / "compressed"), "--input", str(npz), "--output",
       str(out / "predictions.npy"))
    accuracy = float(np.mean(np.load(out / "predictions.npy").argmax(1) == evaluation.y) * 100)
    bench = json.loads(subprocess.run([*agent, "bench", "--model", str(out / "compressed"), "--input", str(npz),
                                       "--json"], check=True, capture_output=True, text=True).stdout)
    probe = ROOT / "benchmarks" / "keras_probe.py"
    keras = json.loads(subprocess.run([sys.executable, str(probe), str(model), str(npz)],
                                      check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    rows = [("", "source (TensorFlow, Keras __call__)", f"device agent ({bench['runtime']}, {bench['format']})"),
            ("accuracy %", f"{keras['accuracy']:.2f}", f"{accuracy:.2f}"),
            ("latency p50 (ms)", f"{keras['latency_ms']['p50']:.3f}", f"{bench['latency_ms']['p50']:.3f}"),
            ("latency p99 (ms)", f"{keras['latency_ms']['p99']:.3f}", f"{bench['latency_ms']['p99']:.3f}"),
            ("process start to first prediction (s)", f"{keras['cold_start_s']:.2f}", f"{bench['cold_start_s']:.2f}"),
            ("peak RSS (MiB)", f"{keras['peak_rss_mib']:.0f}", f"{bench['peak_rss_mib']:.0f}")]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    sys.exit(main())
