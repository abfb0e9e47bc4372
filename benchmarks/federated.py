"""Federated benchmark on digits: 100 clients, Dirichlet(0.5), compared in one run with centralized
training on the union of the clients' data.

Two modes, each writing its own section of BENCHMARKS.md:

- ``--sweep``: the settings sweep the defaults were chosen from (strategy, server and client learning
  rates, local epochs, batch size), from scratch and from a warm start, 30 rounds each. Each run is
  appended to a JSON-lines file as it ends (``--jsonl``), so an interrupted sweep resumes.
- default: the defaults side by side with the previous defaults (plain FedAvg), from scratch and from
  the warm start; update compression (int8, int4) against float32; a text classifier federated on
  token ids; differential privacy at three noise levels against non-private FedAvg.

Every federated run starts from the same model as its centralized twin and all are evaluated on the
same held-out split.

    .venv/bin/python benchmarks/federated.py [--rounds 30] [--clients 100]
    .venv/bin/python benchmarks/federated.py --sweep [--jsonl sweep.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from _report import machine, write_section  # noqa: E402

TARGETS = ("final accuracy within 1 point of centralized in <= 30 rounds; 95% of centralized in <= 10 rounds "
           "(from scratch and from the warm start); int4 updates >= 7x fewer bytes up than float32 FedAvg with "
           "<= 0.5 point accuracy cost")

PREVIOUS = {"strategy": "fedavg", "learning_rate": 0.05, "local_epochs": 5, "batch": 16}
"""The settings BENCHMARKS.md measured before the sweep (the old benchmark's)."""

SWEEP = {
    "fedavg lr 0.05 e5 b16": PREVIOUS,
    "fedavg lr 0.1 e5 b8": {"strategy": "fedavg", "learning_rate": 0.1, "local_epochs": 5, "batch": 8},
    "fedavgm lr 0.05 e5 b16": {"strategy": "fedavgm", "learning_rate": 0.05, "local_epochs": 5, "batch": 16},
    "fedavgm lr 0.05 e5 b8": {"strategy": "fedavgm", "learning_rate": 0.05, "local_epochs": 5, "batch": 8},
    "fedadam 0.01 lr 0.05 e5 b8": {"strategy": "fedadam", "learning_rate": 0.05, "local_epochs": 5, "batch": 8},
    "fedyogi 0.01 lr 0.05 e5 b8": {"strategy": "fedyogi", "learning_rate": 0.05, "local_epochs": 5, "batch": 8},
    "fedadagrad 0.01 lr 0.05 e5 b8": {"strategy": "fedadagrad", "learning_rate": 0.05, "local_epochs": 5,
                                      "batch": 8},
    "fedavgm lr 0.05 e10 b8": {"strategy": "fedavgm", "learning_rate": 0.05, "local_epochs": 10, "batch": 8},
    "fedavg lr 0.1 e10 b8": {"strategy": "fedavg", "learning_rate": 0.1, "local_epochs": 10, "batch": 8},
    "fedavgm lr 0.1 e10 b8": {"strategy": "fedavgm", "learning_rate": 0.1, "local_epochs": 10, "batch": 8},
}
"""Sweep label -> settings (``batch`` is the on-device batch; the rest are RoundSettings fields)."""
SCRATCH_ONLY = ("fedyogi", "fedadagrad")
"""Strategies the sweep runs from scratch only (the harder start), to keep it within an hour here."""


@dataclass
class Setup:
    """The shared start of every run: models, data, and the centralized reference."""

    work: Path
    starts: dict[str, Path]      # "scratch" / "warm" -> model file
    start_accuracy: dict[str, float]
    central: float               # centralized accuracy on the held-out split
    evaluation: Any


def setup(work: Path) -> Setup:
    from edgekit import _tf
    from edgekit.loading import zoo
    from edgekit.loading.data import Dataset, load_digits, split

    parts = split(load_digits(), seed=0)  # the seeded split `fl simulate` makes: evaluation is held out
    pool = Dataset(np.concatenate([parts.finetune.x, parts.calibration.x]),
                   np.concatenate([parts.finetune.y, parts.calibration.y]), "pool")
    rng = np.random.default_rng(0)
    seed_set = pool.take(rng.choice(len(pool), len(pool) // 20, replace=False), "seed")
    _tf.set_seed(0)  # the initial weights too: every run of this script starts from the same two models
    warm = zoo.train(zoo.digits_cnn(), seed_set, epochs=10, seed=0)
    _tf.set_seed(0)
    scratch = zoo.digits_cnn()
    starts = {"scratch": work / "scratch.keras", "warm": work / "warm.keras"}
    scratch.save(starts["scratch"])
    warm.save(starts["warm"])
    central = zoo.train(zoo.digits_cnn(), pool, epochs=15, seed=0)  # same architecture, all the data in one place
    return Setup(work, starts, {"scratch": _accuracy(scratch, parts.evaluation),
                                "warm": _accuracy(warm, parts.evaluation)},
                 _accuracy(central, parts.evaluation), parts.evaluation)


def _accuracy(model: Any, data: Any) -> float:
    return float(np.mean(np.asarray(model(data.x)).argmax(1) == data.y) * 100)


def federate(model: Path, data: Any, out: Path, *, clients: int, rounds: int, batch: int | None = None,
             personalize: int = 0, **settings: Any) -> list[dict[str, Any]]:
    """One simulated run; its history (round 0 is the starting model)."""
    from edgekit.federated.config import Partition, PartitionScheme, RoundSettings
    from edgekit.federated.simulate import SimulationConfig, simulate

    extra = {} if batch is None else {"batch_size": batch}
    config = SimulationConfig(clients=clients, partition=Partition(PartitionScheme.DIRICHLET, 0.5),
                              rounds=RoundSettings(rounds=rounds, **settings), personalize_epochs=personalize, **extra)
    return simulate(model, data, out, config=config, progress=False, log=lambda line: print(line, flush=True)).history


def reached(history: list[dict[str, Any]], goal: float) -> int | None:
    return next((h["round"] for h in history[1:] if h["accuracy"] >= goal), None)


def rounds_to(history: list[dict[str, Any]], goal: float) -> str:
    """The table cell of :func:`reached`: the round, or "> N" when the run's N rounds never reached ``goal``."""
    hit = reached(history, goal)
    return str(hit) if hit else f"> {len(history) - 1}"


# -- the sweep -------------------------------------------------------------------------------------
def sweep(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="edgekit-fl-sweep-"))
    base = setup(work)
    path = Path(args.jsonl)
    lines = path.read_text().splitlines() if path.exists() else []
    done = {(r["config"], r["start"]) for r in map(json.loads, lines)}
    for label, settings in SWEEP.items():
        for start in ("scratch",) if settings["strategy"] in SCRATCH_ONLY else ("scratch", "warm"):
            if (label, start) in done:
                continue
            began = time.perf_counter()
            history = federate(base.starts[start], "digits", work / f"{label}-{start}".replace(" ", "_"),
                               clients=args.clients, rounds=args.rounds, **settings)
            with path.open("a") as f:
                f.write(json.dumps({"config": label, "start": start, "acc": [h["accuracy"] for h in history],
                                    "seconds": time.perf_counter() - began}) + "\n")
    runs = {(r["config"], r["start"]): r["acc"] for r in map(json.loads, path.read_text().splitlines())}
    goal = 0.95 * base.central
    rows = []
    for label in SWEEP:
        cells = []
        for start in ("scratch", "warm"):
            acc = runs.get((label, start))
            if acc is None:
                cells += ["-"] * (3 if start == "scratch" else 4)
                continue
            first = [] if start == "scratch" else [f"{acc[0]:.2f}"]
            cells += first + [f"{acc[min(10, len(acc) - 1)]:.2f}", f"{acc[-1]:.2f}",
                              rounds_to([{"round": i, "accuracy": a} for i, a in enumerate(acc)], goal)]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    body = "\n".join([
        "## Federated settings sweep (`benchmarks/federated.py --sweep`)", "",
        f"Command: `.venv/bin/python benchmarks/federated.py --sweep --rounds {args.rounds} --clients "
        f"{args.clients}`. Machine: {machine()}.", "",
        f"Digits CNN, {args.clients} simulated clients, Dirichlet(0.5), {args.rounds} rounds, every client "
        "training the trainable TFLite artifact in LiteRT (SGD). `lr` is the on-device learning rate, `e` the "
        "local epochs, `b` the on-device batch; the number after an adaptive strategy is its server learning "
        "rate. From scratch: a never-trained model; warm: trained on a 5% server-side seed set. Centralized "
        f"(Adam, 15 epochs, all the clients' data in one place): **{base.central:.2f}%**; 95% of it = {goal:.2f}%. "
        "The runs are in `benchmarks/federated_sweep.jsonl` (one line a run, every round's accuracy); a run "
        "already there is not run again. The runs of this table were made by a first copy of this loop (the same "
        "settings and `simulate` calls, outside the repository while this script was written), interrupted and "
        "resumed twice; each of its three processes trained its own warm-start model with unseeded initial weights, "
        "so the warm start differs between rows: compare warm rows by their start. (This script now seeds them.) "
        "The chosen defaults: " + _defaults() + ".",
        "", "| settings | scratch r10 % | scratch r30 % | scratch rounds to 95% | warm start % | warm r10 % | "
        "warm r30 % | warm rounds to 95% |", "|---|---:|---:|---:|---:|---:|---:|---:|", *rows])
    write_section("federated-sweep", body)
    print(body)
    return 0


# -- oversized updates: rejected or norm-bounded ----------------------------------------------------
OVERSIZED = {
    "reject (the default)": {},
    "bound": {"oversized_updates": "bound"},
    "bound, reject over 1000x": {"oversized_updates": "bound", "bound_reject_ratio": 1000.0},
}
"""Label -> RoundSettings overrides of the norm filter (everything else at the defaults)."""


def compare(args: argparse.Namespace, variants: dict[str, dict[str, Any]], *, flag: str, section: str,
            title: str, column: str, text: str) -> int:
    """The defaults with each of ``variants``' overrides, from scratch and from the warm start, the variants
    alternating within a start (drift hits them alike); writes ``section`` of BENCHMARKS.md."""
    work = Path(tempfile.mkdtemp(prefix=f"edgekit-fl-{flag}-"))
    base = setup(work)
    goal = 0.95 * base.central
    rows = []
    if args.only:
        variants = {label: variants[label] for label in args.only}
    for start in ("scratch", "warm"):
        for label, settings in variants.items():
            history = federate(base.starts[start], "digits", work / f"{start}-{len(rows)}", clients=args.clients,
                               rounds=args.rounds, seed=args.seed, **settings)
            acc = [h["accuracy"] for h in history]
            rejected = sum(len(h.get("rejected", [])) for h in history[1:])
            bounded = sum(len(h.get("bounded", [])) for h in history[1:])
            rows.append(f"| {start} | {label} | {acc[0]:.2f} | {acc[min(10, len(acc) - 1)]:.2f} | {acc[-1]:.2f} | "
                        f"{np.mean(acc[-5:]):.2f} | {acc[-1] - base.central:+.2f} | "
                        f"{rounds_to(history, goal)} | {rejected} | {bounded} |")
            print(rows[-1], flush=True)
    again = f" --seed {args.seed}" + "".join(f" --only '{label}'" for label in args.only) if args.seed else ""
    body = "\n".join([
        f"## {title}{f', round seed {args.seed}' if args.seed else ''} (`benchmarks/federated.py --{flag}`)", "",
        f"Command: `.venv/bin/python benchmarks/federated.py --{flag} --rounds {args.rounds} --clients "
        f"{args.clients}{again}`. Machine: {machine()}.", "",
        f"Digits CNN, {args.clients} clients, Dirichlet(0.5), {args.rounds} rounds, the defaults except {text} "
        f"Centralized (Adam): **{base.central:.2f}%**; 95% of it = {goal:.2f}%. One run per row; the rejected and "
        "bounded columns count updates over all rounds.", "",
        f"| start | {column} | start % | r10 % | r{args.rounds} % | mean of the last 5 rounds % | "
        f"r{args.rounds} - centralized | rounds to 95% | rejected | bounded |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", *rows])
    write_section(section + (f"-seed{args.seed}" if args.seed else ""), body)
    print(body)
    return 0


OVERSIZED_TEXT = ("the norm filter: an update over 5x the round's median update norm (and over 0.1x the model's "
                  "norm) is rejected, or scaled down to that norm keeping its direction (norm bounding), or bounded "
                  "unless it is over 1000x the median.")

SCHEDULES = {
    "constant 0.1 (the default)": {},
    "cosine 0.1": {"lr_schedule": "cosine"},
    "cosine 0.2": {"lr_schedule": "cosine", "learning_rate": 0.2},
}
"""Label -> RoundSettings overrides of the on-device learning rate and its schedule over the rounds."""
SCHEDULES_TEXT = ("the on-device learning rate: constant, or decayed over the rounds by a cosine from the rate "
                  "given at round 1 to a tenth of it at the last round (`--lr-schedule cosine`).")

MOMENTUM = {
    "none, lr 0.1 (the default)": {},
    "0.5, lr 0.05": {"client_momentum": 0.5, "learning_rate": 0.05},
    "0.9, lr 0.01": {"client_momentum": 0.9, "learning_rate": 0.01},
    "0.9, lr 0.02": {"client_momentum": 0.9, "learning_rate": 0.02},
}
"""Label -> RoundSettings overrides of the on-device optimizer: heavy-ball momentum (lr / (1 - momentum) is the
step a long run of equal gradients settles to, so 0.5/0.05 and 0.9/0.01 match the default's 0.1)."""
MOMENTUM_TEXT = ("the on-device optimizer: plain SGD, or SGD with heavy-ball momentum (`--client-momentum`, zeroed "
                 "at each round's start) at a learning rate scaled so that lr / (1 - momentum) is at or near the "
                 "default's 0.1.")


DEFENCES = {
    "norm bound 1 + screening (the defaults)": {},
    "norm bound 2 + screening": {"update_norm_bound": 2.0},
    "norm bound 3 + screening": {"update_norm_bound": 3.0},
    "screening only": {"update_norm_bound": None},
    "norm bound 1 only": {"screen_loss_ratio": None},
    "neither": {"update_norm_bound": None, "screen_loss_ratio": None},
}
"""Label -> RoundSettings overrides of the Byzantine defences (edgekit.federated.robust): what each costs honest
devices over a long run (benchmarks/robust.py measures what each keeps under attack)."""
DEFENCES_TEXT = ("the Byzantine defences: every update's norm bounded to 1, 2 or 3 times the round's median, "
                 "screening on the evaluation data (2.5x the round's median loss), both or neither (the oversized "
                 "filter, the example cap and the last-good-model guard stay on).")

# -- the defaults, side by side --------------------------------------------------------------------
def side_by_side(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="edgekit-fl-bench-"))
    base = setup(work)
    goal = 0.95 * base.central
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    variants = {"FedAvg, previous defaults": PREVIOUS, "defaults": {"personalize": 5}, "defaults + int8 updates":
                {"compress_updates": "int8"}, "defaults + int4 updates": {"compress_updates": "int4"}}
    for start in ("scratch", "warm"):
        for label, settings in variants.items():
            runs[(label, start)] = federate(base.starts[start], "digits", work / f"{start}-{label}".replace(" ", "_"),
                                            clients=args.clients, rounds=args.rounds, **settings)
    sgd = centralized_sgd(base, epochs=args.rounds)
    rows, float_up = [], np.mean([h["bytes_up_per_client"] for h in runs[("defaults", "warm")][1:]])
    for (label, start), history in runs.items():
        up = np.mean([h["bytes_up_per_client"] for h in history[1:]])
        rows.append(f"| {label} | {start} ({history[0]['accuracy']:.2f}) | {rounds_to(history, goal)} | "
                    f"{history[min(10, len(history) - 1)]['accuracy']:.2f} | {history[-1]['accuracy']:.2f} | "
                    f"{history[-1]['accuracy'] - base.central:+.2f} | {up / 1024:.1f} | {float_up / up:.2f}x | "
                    f"{np.median([h['seconds'] for h in history[1:]]):.1f} |")
    personal = json.loads((work / "warm-defaults" / "history.json").read_text())["personalization"]
    text = text_row(work, args)
    privacy = privacy_rows(base, args)
    body = "\n".join([
        "## Federated learning (`benchmarks/federated.py`)", "",
        f"Command: `.venv/bin/python benchmarks/federated.py --rounds {args.rounds} --clients {args.clients}`. "
        f"Machine: {machine()}.", "", f"Targets (issue): {TARGETS}.", "",
        f"Digits CNN, {args.clients} simulated clients (Flower simulation engine, Ray, 2 actors), Dirichlet(0.5) "
        "label skew, every client training the trainable TFLite artifact in LiteRT. The defaults are "
        f"{_defaults()}; the previous defaults were FedAvg, on-device SGD lr 0.05, 5 local epochs, batch 16. "
        f"Centralized: the same architecture trained with Adam on the union of the clients' data (15 epochs): "
        f"**{base.central:.2f}%**; 95% of it = {goal:.2f}%. Start accuracy in brackets. The ceiling of on-device "
        f"SGD itself: the same trainable artifact trained centrally in LiteRT (one client holding all the data, the "
        f"defaults' learning rate and batch, {args.rounds} epochs, from scratch): {sgd[-1]:.2f}% (best epoch "
        f"{max(sgd):.2f}%).", "",
        "| run | start | rounds to 95% of centralized | round 10 % | final % | vs centralized | KiB up per client "
        "per round | fewer bytes up than float32 | seconds per round (median) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
        f"Bytes down: float32 in round 1, then int8 deltas to every device that holds the last model "
        f"(defaults + int4, round {args.rounds}: "
        f"{runs[('defaults + int4 updates', 'warm')][-1]['bytes_down_per_client'] / 1024:.1f} KiB per client against "
        f"{runs[('defaults', 'warm')][-1]['bytes_down_per_client'] / 1024:.1f} KiB in float32).", "",
        f"Personalisation after the warm-start defaults run ({personal['epochs']} epochs, head only, each device's "
        f"own 20% held out): accuracy on the devices' own data {personal['accuracy_before']:.1f}% with the global "
        f"model, {personal['accuracy_fine_tuned']:.1f}% fine-tuned, {personal['accuracy_after']:.1f}% as served "
        f"({personal['devices_kept_their_head']} of {personal['devices']} devices kept their head, the others the "
        "global one; coarse 5-point accuracies, weighted by count).", "",
        *text, "", *privacy])
    write_section("federated", body)
    print(body)
    return 0


def centralized_sgd(base: Setup, *, epochs: int) -> list[float]:
    """Held-out accuracy per epoch of the trainable artifact trained on all the clients' data in LiteRT."""
    from device_agents.training.trainer import Trainer
    from edgekit import TrainableConfig, export_trainable
    from edgekit.federated.config import FederationConfig, RoundSettings
    from edgekit.loading.data import load_digits, split

    parts = split(load_digits(), seed=0)
    x = np.concatenate([parts.finetune.x, parts.calibration.x])
    y = np.concatenate([parts.finetune.y, parts.calibration.y])
    export_trainable(base.starts["scratch"], base.work / "central-sgd", progress=False,
                     config=TrainableConfig(batch_size=FederationConfig().batch_size))
    trainer, accuracy = Trainer.load(base.work / "central-sgd"), []
    for epoch in range(epochs):
        trainer.fit(x, y, epochs=1, learning_rate=RoundSettings().learning_rate, seed=epoch)
        accuracy.append(trainer.evaluate(base.evaluation.x, base.evaluation.y)[1])
    return accuracy


def _defaults() -> str:
    from edgekit.federated.config import FederationConfig, RoundSettings
    from edgekit.federated.strategies import server_learning_rate

    s = RoundSettings()
    server = server_learning_rate(s)
    optimizer = f" (server learning rate {server:g}, momentum {s.server_momentum:g})" if server is not None else ""
    return (f"{s.aggregation.value}{optimizer}, on-device SGD lr {s.learning_rate:g}, {s.local_epochs} local epochs, "
            f"batch {FederationConfig().batch_size}")


def text_row(work: Path, args: argparse.Namespace) -> list[str]:
    """A token-id text classifier (Embedding, Conv1D, global max pooling) federated from scratch."""
    from edgekit import _tf
    from edgekit.loading import zoo
    from edgekit.loading.data import split

    data = zoo.token_dataset(n=60 * args.clients, seed=1)
    np.savez(work / "tokens.npz", x=data.x, y=data.y)
    parts = split(data, seed=0)
    _tf.set_seed(0)
    zoo.text_cnn().save(work / "text.keras")
    central = zoo.train(zoo.text_cnn(), parts.finetune, epochs=15, seed=0)
    central_acc = _accuracy(central, parts.evaluation)
    history = federate(work / "text.keras", work / "tokens.npz", work / "text", clients=args.clients,
                       rounds=args.rounds)
    return ["Text: the same run on a token-id classifier (Embedding 30x16, Conv1D 32, global max pooling, Dense; "
            f"{len(data)} synthetic sequences of 16 tokens, 3 classes) from scratch, with the defaults. Centralized "
            f"(Adam, 15 epochs on the training part): {central_acc:.2f}%.", "",
            "| run | start % | rounds to 95% of centralized | round 10 % | final % | vs centralized |",
            "|---|---:|---:|---:|---:|---:|",
            f"| text, defaults | {history[0]['accuracy']:.2f} | {rounds_to(history, 0.95 * central_acc)} | "
            f"{history[min(10, len(history) - 1)]['accuracy']:.2f} | {history[-1]['accuracy']:.2f} | "
            f"{history[-1]['accuracy'] - central_acc:+.2f} |"]


def privacy_rows(base: Setup, args: argparse.Namespace) -> list[str]:
    """DP-FedAvg at three noise multipliers (the noise guard set to warn) from the warm start."""
    from edgekit.federated.privacy import plan_noise
    from edgekit.loading import zoo

    weights = int(sum(np.prod(w.shape) for w in zoo.digits_cnn().trainable_weights))
    rows = []
    for sigma, clipping in ((0.3, "fixed"), (0.7, "fixed"), (1.0, "fixed"), (0.7, "adaptive")):
        history = federate(base.starts["warm"], "digits", base.work / f"dp-{sigma}-{clipping}", clients=args.clients,
                           rounds=args.rounds, dp_noise_multiplier=sigma, dp_clipping_norm=1.0, dp_noise_guard="warn",
                           dp_clipping=clipping)
        plan = plan_noise(noise_multiplier=sigma, clipping_norm=1.0, clients_per_round=args.clients,
                          parameters=weights, rounds=args.rounds, population=args.clients, delta=1e-5)
        committed = sum(1 for h in history[1:] if h.get("aggregated"))
        rows.append(f"| {sigma:g} | {clipping} | {history[-1]['privacy']['epsilon']:.2f} | {plan.ratio:.2f} | "
                    f"{plan.verdict()} | {history[-1]['accuracy']:.2f} | "
                    f"{committed}/{args.rounds} |")
    return ["Differential privacy (DP-FedAvg: client-side clipping 1.0, Gaussian noise on the aggregate, "
            f"{args.clients} clients per round, delta 1e-5, no amplification by sampling claimed), from the warm "
            f"start ({base.start_accuracy['warm']:.2f}%), with the noise guard set to warn so that every run "
            "goes ahead; the guard's verdict is in its own column. Non-private runs: the table above.", "",
            "| noise multiplier | clipping | epsilon | noise / update norm | guard | final % | rounds committed |",
            "|---:|---|---:|---:|---|---:|---:|", *rows]


# -- the defaults over several round seeds ----------------------------------------------------------------------
SEEDS = (0, 1, 2)


def seeds(args: argparse.Namespace) -> int:
    """The defaults from scratch and from the warm start at each of :data:`SEEDS` (client sampling, batch orders),
    against centralized training measured in the same run: issue 11's targets, with their spread."""
    work = Path(tempfile.mkdtemp(prefix="edgekit-fl-seeds-"))
    base = setup(work)
    goal = 0.95 * base.central
    rows, finals = [], {"scratch": [], "warm": []}
    for start in ("scratch", "warm"):
        for seed in SEEDS:
            history = federate(base.starts[start], "digits", work / f"{start}-{seed}", clients=args.clients,
                               rounds=args.rounds, seed=seed)
            acc = [h["accuracy"] for h in history]
            finals[start].append(acc[-1])
            rows.append(f"| {start} | {seed} | {acc[0]:.2f} | {acc[min(10, len(acc) - 1)]:.2f} | {acc[-1]:.2f} | "
                        f"{acc[-1] - base.central:+.2f} | {rounds_to(history, goal)} |")
            print(rows[-1], flush=True)
    means = "; ".join(f"{start} mean {np.mean(v):.2f}% ({np.mean(v) - base.central:+.2f})"
                      for start, v in finals.items())
    body = "\n".join([
        "## The defaults over round seeds (`benchmarks/federated.py --seeds`)", "",
        f"Command: `.venv/bin/python benchmarks/federated.py --seeds --rounds {args.rounds} --clients {args.clients}`. "
        f"Machine: {machine()}.", "",
        f"Targets (issue): {TARGETS}.", "",
        f"Digits CNN, {args.clients} clients, Dirichlet(0.5), {args.rounds} rounds, the defaults ({_defaults()}), "
        f"round seeds {', '.join(map(str, SEEDS))}. Centralized (Adam), same run: **{base.central:.2f}%**; 95% of it = "
        f"{goal:.2f}%. {means}.", "",
        f"| start | round seed | start % | r10 % | r{args.rounds} % | r{args.rounds} - centralized | rounds to 95% |",
        "|---|---:|---:|---:|---:|---:|---:|", *rows])
    write_section("federated-seeds", body)
    print(body)
    return 0


# -- the server learning rate: early rounds of many small clients, and a small federation -----------------
SERVER_RATES = (1.0, 2.0)
SERVER_LR_CASES = (("100 clients, from scratch", 100, ("scratch",), 12), ("10 clients", 10, ("scratch", "warm"), 8))
"""(label, clients, starts, rounds): issue 11's benchmark over its first rounds (how fast 95% of centralized is
reached), and the issue's new-user case (10 clients, 8 rounds)."""


def server_rates(args: argparse.Namespace) -> int:
    """FedAvgM at each of :data:`SERVER_RATES` (the rest the defaults) in each of :data:`SERVER_LR_CASES`, at round
    seeds :data:`SEEDS`, the rates alternating within a seed and start."""
    work = Path(tempfile.mkdtemp(prefix="edgekit-fl-server-lr-"))
    base = setup(work)
    goal = 0.95 * base.central
    rows = []
    for label, clients, starts, rounds in SERVER_LR_CASES:
        for start in starts:
            for seed in SEEDS:
                for rate in SERVER_RATES:
                    history = federate(base.starts[start], "digits", work / f"{clients}-{start}-{seed}-{rate:g}",
                                       clients=clients, rounds=rounds, seed=seed, server_learning_rate=rate)
                    acc = [h["accuracy"] for h in history]
                    refused = sum(1 for h in history[1:] if not h.get("aggregated", True))
                    rows.append(f"| {label} | {start} | {seed} | {rate:g} | {acc[0]:.2f} | "
                                f"{' / '.join(f'{a:.1f}' for a in acc[1:])} | {acc[-1]:.2f} | "
                                f"{rounds_to(history, goal)} | {refused} |")
                    print(rows[-1], flush=True)
    body = "\n".join([
        "## FedAvgM's server learning rate (`benchmarks/federated.py --server-lr`)", "",
        f"Command: `.venv/bin/python benchmarks/federated.py --server-lr`. Machine: {machine()}.", "",
        f"Digits CNN, Dirichlet(0.5), the defaults except FedAvgM's server learning rate (1 is the default), round "
        f"seeds {', '.join(map(str, SEEDS))}, the rates alternating within a seed. Centralized (Adam), same run: "
        f"**{base.central:.2f}%**; 95% of it = {goal:.2f}%. \"refused\": rounds whose aggregate the last-good-model "
        "guard did not commit (over 20 points below the last good model).", "",
        "| case | start | round seed | server lr | start % | accuracy by round % | last % | rounds to 95% | refused |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|", *rows])
    write_section("federated-server-lr", body)
    print(body)
    return 0


# -- centralized training with the device's own trainer --------------------------------------------------------
DEVICE_CENTRAL_EPOCHS = (5, 10, 15, 20, 30)
DEVICE_CENTRAL_RATES = (0.1, 0.05)
DEVICE_CENTRAL_REPEATS = 3  # runs with dropout, each with its own seeds (its masks and batch orders); without it one


def device_central(args: argparse.Namespace) -> int:
    """The federated runs' reference with the devices' constraints: the trainable artifact trained in LiteRT on all
    the pooled data in one place (plain SGD, BatchNormalization statistics frozen), against Keras/Adam
    centralized. Splits the gap of federated learning into what on-device training costs by itself and what
    federating costs on top. Each start trains with its Dropout layer (Keras's training mode, what a device runs)
    and without it (the layer removed), side by side."""
    from device_agents.training.trainer import Trainer
    from edgekit import _tf
    from edgekit.loading.data import load_digits, split
    from edgekit.loading.models import load_model
    from edgekit.trainable.export import TrainableConfig, export_trainable

    work = Path(tempfile.mkdtemp(prefix="edgekit-fl-device-central-"))
    base = setup(work)
    parts = split(load_digits(), seed=0)
    x = np.concatenate([parts.finetune.x, parts.calibration.x])
    y = np.concatenate([parts.finetune.y, parts.calibration.y])
    keras = _tf.keras()
    rows = []
    for start in ("scratch", "warm"):
        model = load_model(base.starts[start]).model
        kept = [layer for layer in model.layers if layer.__class__.__name__ != "Dropout"]
        variants = {"on (0.2)": model, "off": keras.Sequential([keras.Input(model.inputs[0].shape[1:]), *kept])}
        for label, variant in variants.items():
            export_trainable(variant, work / f"trainable-{start}-{label}", progress=False,
                             config=TrainableConfig(batch_size=8))  # the federated runs' on-device batch
        for rate in DEVICE_CENTRAL_RATES:
            for label in variants:
                for repeat in range(DEVICE_CENTRAL_REPEATS if label != "off" else 1):
                    trainer = Trainer.load(work / f"trainable-{start}-{label}")
                    cells = []
                    for epoch in range(1, max(DEVICE_CENTRAL_EPOCHS) + 1):
                        trainer.fit(x, y, epochs=1, learning_rate=rate, seed=repeat * 1000 + epoch)
                        if epoch in DEVICE_CENTRAL_EPOCHS:
                            cells.append(trainer.evaluate(base.evaluation.x, base.evaluation.y)[1])
                    run = f", run {repeat + 1}" if label != "off" else ""
                    rows.append(f"| {start} | {base.start_accuracy[start]:.2f} | {rate:g} | {label}{run} | "
                                + " | ".join(f"{a:.2f}" for a in cells) + f" | {cells[-1] - base.central:+.2f} |")
                    print(rows[-1], flush=True)
    body = "\n".join([
        "## Centralized training with the device's trainer (`benchmarks/federated.py --device-central`)", "",
        f"Command: `.venv/bin/python benchmarks/federated.py --device-central`. Machine: {machine()}.", "",
        f"The federated benchmark's digits CNN and starts, its {len(x)} pooled training samples in one place, trained "
        "by the device's own code: the trainable artifact in LiteRT (`Trainer.fit`, batch 8, plain SGD, "
        "BatchNormalization's statistics frozen at the start's), with the model's Dropout(0.2) training as in Keras "
        f"(a fresh mask every step: {DEVICE_CENTRAL_REPEATS} runs, each with its own seeds) or with that layer removed "
        "(one run), side by side. Accuracy on the same held-out split. "
        f"Keras centralized (Adam, BatchNormalization and dropout training): **{base.central:.2f}%**.", "",
        "| start | start % | learning rate | dropout | " + " | ".join(f"epoch {e} %" for e in DEVICE_CENTRAL_EPOCHS)
        + " | last - Keras centralized |",
        "|---|---:|---:|---|" + "---:|" * (len(DEVICE_CENTRAL_EPOCHS) + 1), *rows])
    write_section("federated-device-central", body)
    print(body)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--sweep", action="store_true", help="run (or resume) the settings sweep")
    parser.add_argument("--schedules", action="store_true",
                        help="the defaults with a constant or a cosine-decayed on-device learning rate")
    parser.add_argument("--momentum", action="store_true",
                        help="the defaults with plain on-device SGD or with on-device momentum")
    parser.add_argument("--defences", action="store_true",
                        help="the defaults with the Byzantine defences' norm bound at 1, 2, 3 or off, screening on or "
                             "off: their cost to honest devices")
    parser.add_argument("--oversized", action="store_true",
                        help="compare what the server does with oversized updates: reject, bound, bound + reject")
    parser.add_argument("--seeds", action="store_true",
                        help=f"the defaults from scratch and warm at round seeds {', '.join(map(str, SEEDS))}")
    parser.add_argument("--server-lr", action="store_true",
                        help="FedAvgM's server learning rate 1 against 2: 100 clients' first rounds, and 10 clients")
    parser.add_argument("--device-central", action="store_true",
                        help="the reference with the devices' constraints: the trainable artifact trained on all the "
                             "data in one place")
    parser.add_argument("--seed", type=int, default=0,
                        help="the rounds' seed (client sampling, batch orders) of a comparison: a repeat with another "
                             "seed writes a section of its own")
    parser.add_argument("--only", action="append", default=[], metavar="LABEL",
                        help="a comparison's variant to run (repeatable; default: all)")
    parser.add_argument("--jsonl", default=str(Path(__file__).with_name("federated_sweep.jsonl")),
                        help="the sweep's results, one run a line (runs already there are not run again)")
    args = parser.parse_args()
    if args.oversized:
        return compare(args, OVERSIZED, flag="oversized", section="federated-oversized", column="oversized updates",
                       title="Oversized updates: rejected or norm-bounded", text=OVERSIZED_TEXT)
    if args.schedules:
        return compare(args, SCHEDULES, flag="schedules", section="federated-schedules",
                       column="on-device learning rate", title="On-device learning-rate schedules",
                       text=SCHEDULES_TEXT)
    if args.device_central:
        return device_central(args)
    if args.server_lr:
        return server_rates(args)
    if args.seeds:
        return seeds(args)
    if args.defences:
        return compare(args, DEFENCES, flag="defences", section="federated-defences", column="defences",
                       title="Byzantine defences without attackers", text=DEFENCES_TEXT)
    if args.momentum:
        return compare(args, MOMENTUM, flag="momentum", section="federated-momentum", column="on-device momentum",
                       title="On-device momentum", text=MOMENTUM_TEXT)
    return sweep(args) if args.sweep else side_by_side(args)


if __name__ == "__main__":
    sys.exit(main())
