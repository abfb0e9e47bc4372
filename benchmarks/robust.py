"""Robust aggregation: attack x defence, side by side in one run (Flower simulation, digits, the devices'
real trainer in LiteRT).

3 rounds from a weak start (the test CNN after 2 epochs on 300 samples). Attacks, rehearsed by the device's
own ClientApp (``device_agents.protocol.Fault``): ``sign-flip`` (the update reversed and scaled x4.5,
claiming 100x its examples) and ``label-flip`` (honest training on permuted labels). Setups: 1 attacker of
4 devices, 2 of 10. Defences: none (FedAvg, every server filter off), the norm bound alone, Flower's
FedMedian, FedTrimmedAvg and Multi-Krum (filters off), edgekit's defences (norm bound, screening on the
evaluation data, leave-one-out after a refused round) on FedAvg, and edgekit's default (those on FedAvgM).

Target (issue): with an attack, the default gains >= 80% of what the clean run gains.

    .venv/bin/python benchmarks/robust.py [--setups 4:1,10:2] [--partition iid]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})

from _report import machine, write_section  # noqa: E402

OFF = {"update_norm_bound": None, "screen_loss_ratio": None, "max_update_norm_ratio": 1e12,
       "max_examples_ratio": 1e12, "max_round_accuracy_drop": 100.0}
"""Every server-side filter off: what a plain Flower strategy does with the replies."""


def defences(attackers: int, clients: int) -> dict[str, dict]:
    beta = max(attackers / clients, 1 / clients) + 1e-6
    return {
        "none (FedAvg)": {**OFF, "strategy": "fedavg"},
        "norm bound (FedAvg)": {**OFF, "strategy": "fedavg", "update_norm_bound": 1.0},
        "median (FedMedian)": {**OFF, "strategy": "median"},
        f"trimmed mean (beta {beta:.2f})": {**OFF, "strategy": "trimmed", "trim_beta": beta},
        f"Multi-Krum (f={attackers})": {**OFF, "strategy": "multikrum", "byzantine": attackers},
        "edgekit defences on FedAvg": {"strategy": "fedavg"},
        "edgekit default (FedAvgM)": {},
    }


ATTACKS = ("clean", "sign-flip", "label-flip")


def run(model: Path, out: Path, clients: int, attackers: int, attack: str, settings: dict, partition: str,
        rounds: int) -> dict:
    from edgekit.federated.config import Partition, RoundSettings, SimulationConfig
    from edgekit.federated.simulate import simulate

    faults = {} if attack == "clean" else {i: attack for i in range(attackers)}
    config = SimulationConfig(clients=clients, partition=Partition(partition), faults=faults,
                              rounds=RoundSettings(rounds=rounds, **settings))
    result = simulate(model, "digits", out, config=config, progress=False, log=lambda _: None)
    history = result.history
    dropped = sorted({d["node"] for h in history[1:] for d in h.get("dropped", [])})
    return {"start": history[0]["accuracy"], "final": history[-1]["accuracy"],
            "refused": sum(not h.get("aggregated") for h in history[1:]), "dropped_nodes": len(dropped)}


def weak_model(folder: Path) -> Path:
    import numpy as np

    from edgekit import _tf
    from edgekit.loading import zoo
    from edgekit.loading.data import load_digits

    _tf.set_seed(0)
    keras = _tf.keras()
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((8, 8, 1)), layers.Conv2D(16, 3, padding="same", use_bias=False),
        layers.BatchNormalization(), layers.ReLU(), layers.MaxPooling2D(),
        layers.Conv2D(32, 3, padding="same", activation="relu"), layers.Flatten(),
        layers.Dense(32, activation="relu"), layers.Dense(10, activation="softmax")])
    model = zoo.train(model, load_digits().take(np.arange(300)), epochs=2, learning_rate=1e-3)
    path = folder / "weak.keras"
    model.save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", default="4:1,10:2", help="CLIENTS:ATTACKERS pairs (default %(default)s)")
    parser.add_argument("--partition", default="dirichlet", choices=("iid", "dirichlet"),
                        help="how the devices' data is split (default %(default)s: label skew, Dirichlet 0.5)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgekit-robust-"))
    model = weak_model(work)
    sections = []
    for setup in args.setups.split(","):
        clients, attackers = (int(v) for v in setup.split(":"))
        rows = {}
        for name, settings in defences(attackers, clients).items():
            for attack in ATTACKS:
                start = time.perf_counter()
                rows[(name, attack)] = run(model, work / f"{clients}-{name[:8]}-{attack}".replace(" ", "_"), clients,
                                           attackers, attack, settings, args.partition, args.rounds)
                print(f"{clients}:{attackers} {name:28s} {attack:10s} {rows[(name, attack)]} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
        sections.append(_table(rows, clients, attackers))
    command = f"`.venv/bin/python benchmarks/robust.py --setups {args.setups} --partition {args.partition}`"
    write_section("robust", "\n\n".join([
        "## Robust aggregation: attack x defence",
        f"Machine: {machine()}. Command: {command}. {args.rounds} rounds from a weak start, digits, "
        f"{args.partition} partitions, held-out accuracy (%) of the final global model; in brackets the gain over "
        "the start; 'of clean' is the attacked gain over the clean run's gain under the same defence. Target: "
        "with either attack the default gains >= 80% of what the clean run gains.", *sections]))


def _table(rows: dict, clients: int, attackers: int) -> str:
    lines = [f"**{attackers} attacker(s) of {clients} devices**", "",
             "| defence | clean | sign-flip x4.5 | of clean | label-flip | of clean | devices dropped (clean / sign / "
             "label) |", "|---|---|---|---|---|---|---|"]
    names = list(dict.fromkeys(name for name, _ in rows))
    for name in names:
        clean = rows[(name, "clean")]
        gain = clean["final"] - clean["start"]
        cells = [name, f"{clean['final']:.2f} (+{gain:.2f})"]
        for attack in ATTACKS[1:]:
            row = rows[(name, attack)]
            attacked = row["final"] - row["start"]
            cells += [f"{row['final']:.2f} ({attacked:+.2f})", f"{100 * attacked / gain:.0f}%" if gain > 0 else "n/a"]
        cells.append(" / ".join(str(rows[(name, attack)]["dropped_nodes"]) for attack in ATTACKS))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
