"""Federated benchmark on digits: 100 clients, Dirichlet(0.5), compared in one run with centralized
training on the union of the clients' data and with plain float32 FedAvg.

Both federated runs and the centralized run start from the same model, warm-started on a small
server-side seed set (5% of the training data); all are evaluated on the same held-out split.
Rounds to reach 95% of the centralized accuracy, final accuracy, bytes sent per client per round,
seconds per round. Writes its section of BENCHMARKS.md.

    .venv/bin/python benchmarks/federated.py [--rounds 20] [--clients 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from _report import machine, write_section  # noqa: E402

TARGETS = ("rounds to 95% of centralized accuracy <= 20; update compression bytes <= 1/3.5 of float32 FedAvg "
           "with <= 0.5 point accuracy cost")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--local-epochs", type=int, default=5)
    args = parser.parse_args()
    from edgekit.federated.config import Partition, PartitionScheme, RoundSettings
    from edgekit.federated.simulate import SimulationConfig, simulate
    from edgekit.loading import zoo
    from edgekit.loading.data import Dataset, load_digits, split

    data = load_digits()
    parts = split(data, seed=0)
    pool = Dataset(np.concatenate([parts.finetune.x, parts.calibration.x]),
                   np.concatenate([parts.finetune.y, parts.calibration.y]), "pool")
    rng = np.random.default_rng(0)
    seed_set = pool.take(rng.choice(len(pool), len(pool) // 20, replace=False), "seed")
    work = Path(tempfile.mkdtemp(prefix="edgekit-fl-bench-"))
    start = zoo.train(zoo.digits_cnn(), seed_set, epochs=10)
    start.save(work / "start.keras")
    start_acc = float(np.mean(start(parts.evaluation.x).numpy().argmax(1) == parts.evaluation.y) * 100)

    central = zoo.train(zoo.digits_cnn(), pool, epochs=15)  # same architecture, all the data in one place
    central_acc = float(np.mean(central(parts.evaluation.x).numpy().argmax(1) == parts.evaluation.y) * 100)

    runs = {}
    for label, compress in (("FedAvg float32", False), ("FedAvg + int8 deltas", True)):
        config = SimulationConfig(
            clients=args.clients, partition=Partition(PartitionScheme.DIRICHLET, 0.5), batch_size=16,
            rounds=RoundSettings(rounds=args.rounds, local_epochs=args.local_epochs, learning_rate=0.05,
                                 compress_updates=compress))
        result = simulate(work / "start.keras", "digits", work / label.replace(" ", "_").replace("+", ""),
                          config=config, progress=False, log=lambda line: print(line, flush=True))
        runs[label] = result.history

    goal = 0.95 * central_acc
    rows = []
    for label, history in runs.items():
        reached = next((h["round"] for h in history[1:] if h["accuracy"] >= goal), None)
        up = np.mean([h["bytes_up_per_client"] for h in history[1:]])
        secs = np.median([h["seconds"] for h in history[2:]] or [history[1]["seconds"]])
        down = history[1]["bytes_down_per_client"] / 1024
        rows.append(f"| {label} | {reached if reached is not None else f'not in {args.rounds}'} | "
                    f"{history[-1]['accuracy']:.2f} | {up / 1024:.1f} | {down:.1f} | {secs:.1f} |")
    float_up = np.mean([h["bytes_up_per_client"] for h in runs["FedAvg float32"][1:]])
    int8_up = np.mean([h["bytes_up_per_client"] for h in runs["FedAvg + int8 deltas"][1:]])
    cost = runs["FedAvg float32"][-1]["accuracy"] - runs["FedAvg + int8 deltas"][-1]["accuracy"]
    body = "\n".join([
        "## Federated learning (`benchmarks/federated.py`)", "",
        f"Command: `.venv/bin/python benchmarks/federated.py --rounds {args.rounds} --clients {args.clients} "
        f"--local-epochs {args.local_epochs}`. "
        f"Machine: {machine()}.", "",
        f"Targets (issue): {TARGETS}.", "",
        f"Digits CNN, {args.clients} simulated clients (Flower simulation engine, Ray, 2 actors), Dirichlet(0.5) "
        f"label skew, {args.local_epochs} local epochs, batch 16, SGD lr 0.05, each client training the trainable "
        "TFLite artifact in LiteRT. Every run starts from the same model warm-started on a server-side seed set "
        f"(5% of the training data, {start_acc:.2f}% accuracy). Centralized: the same architecture trained with "
        f"Adam on the union of the clients' data (15 epochs): **{central_acc:.2f}%**; 95% of it = {goal:.2f}%.", "",
        "| run | rounds to 95% of centralized | final accuracy % | KiB up per client per round | "
        "KiB down per client per round | seconds per round (median) |",
        "|---|---:|---:|---:|---:|---:|", *rows, "",
        f"Update compression: {float_up / int8_up:.2f}x fewer bytes up than float32 FedAvg, accuracy cost "
        f"{cost:+.2f} points after {args.rounds} rounds.",
    ])
    write_section("federated", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
