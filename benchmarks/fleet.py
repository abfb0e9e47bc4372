"""Fleet rollout: how long a signed release takes to reach N devices, and the bytes each device receives.

One served fleet (`edgekit fleet serve` in-process: SuperLink + TLS gateway), N devices enrolled as the
README enrolls them (own key pair, registered, `edgekit-agent join` with a store and data). For each N,
releases of two sizes are rolled out alternately (canary 0.25, then the rest), `repeats` times each; a
status job (no payload) is the baseline of what one Flower run costs. All processes share this machine.

    python benchmarks/fleet.py [--nodes 2,4,8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_section  # noqa: E402


def _models(work: Path) -> dict[str, Path]:
    """Two releases: the test CNN as int8 (small) and a float32 MLP of about 1.3 MB (large)."""
    from edgekit import CompressConfig, Recipe, _tf, compress
    from edgekit.loading import zoo
    from edgekit.loading.data import load_digits

    keras = _tf.keras()
    digits = load_digits()
    cnn = zoo.train(keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(16, 3, activation="relu"),
                                      keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")]),
                    digits, epochs=5, seed=0)
    mlp = zoo.train(keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                      keras.layers.Dense(1024, activation="relu"),
                                      keras.layers.Dense(256, activation="relu"),
                                      keras.layers.Dense(10, activation="softmax")]), digits, epochs=3, seed=0)
    out = {}
    for name, model, quantize in (("int8 CNN", cnn, "int8"), ("float32 MLP", mlp, "none")):
        path = work / f"{name.replace(' ', '_')}.keras"
        model.save(path)
        folder = work / f"src_{name.replace(' ', '_')}"
        compress(path, "digits", folder, progress=False,
                 config=CompressConfig(recipe=Recipe(quantize=quantize), formats=("tflite",)))
        out[name] = folder
    return out


def _join(fleet, home: Path, public: Path, rows: slice) -> subprocess.Popen:
    from edgekit.fleet.serve import register_node
    from edgekit.loading.data import load_digits

    agent = Path(sys.executable).parent / "edgekit-agent"
    home.mkdir(parents=True)
    digits = load_digits()
    np.savez(home / "data.npz", x=digits.x[rows], y=digits.y[rows])
    subprocess.run([str(agent), "node-key", "--out", str(home / "keys")], check=True, capture_output=True)
    register_node(fleet.folder, home / "keys" / "node.pub")
    log = open(home / "join.log", "w")  # noqa: SIM115 (lives as long as the device)
    return subprocess.Popen([str(agent), "join", "--superlink", fleet.gateway, "--ca", str(fleet.ca), "--key",
                             str(home / "keys" / "node.key"), "--data", str(home / "data.npz"), "--store",
                             str(home / "store"), "--trust", str(public)], stdout=log, stderr=subprocess.STDOUT)


def _device_work(sources: dict[str, Path], work: Path, private: Path, public: Path, repeats: int) -> dict[str, float]:
    """The device's own work for one release, in this process: verify, install, smoke test, two measurements."""
    from device_agents.fleet import agent as device_fleet
    from edgekit.fleet.jobs import release_files
    from edgekit.fleet.signing import sign_release
    from edgekit.loading.data import load_digits

    digits = load_digits()
    np.savez(work / "local.npz", x=digits.x[:50], y=digits.y[:50])
    node = {"store": str(work / "local_store"), "trust": str(public), "data-file": str(work / "local.npz")}
    times: dict[str, list[float]] = {name: [] for name in sources}
    version = 1000
    for _ in range(repeats):
        for name, source in sources.items():
            version += 1
            folder = work / f"local{version}"
            shutil.copytree(source, folder)
            sign_release(folder, private, version=version)
            files = release_files(folder)  # what a rollout sends
            start = time.perf_counter()
            metrics, text = device_fleet.install(files, node)
            times[name].append(time.perf_counter() - start)
            assert metrics["ok"] == 1.0, text
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="2,4,8")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    counts = sorted(int(n) for n in args.nodes.split(","))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the fleet and the devices on SIGTERM too
    os.environ.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})

    from device_agents.federated.join import free_port
    from edgekit.fleet.rollout import RolloutConfig, fleet_status, rollout
    from edgekit.fleet.serve import FleetConfig, serve
    from edgekit.fleet.signing import new_keys, sign_release

    work = Path(tempfile.mkdtemp(prefix="edgekit-fleet-bench-"))
    sources = _models(work)
    private, public = new_keys(work / "keys")
    local = _device_work(sources, work, private, public, args.repeats)
    fleet = serve(work / "fleet", FleetConfig(port=free_port()), signing_key=private)
    devices: list[subprocess.Popen] = []
    rows, version = [], 0
    try:
        for count in counts:
            while len(devices) < count:
                i = len(devices)
                devices.append(_join(fleet, work / f"device{i}", public, slice(1000 + 50 * i, 1050 + 50 * i)))
            config = RolloutConfig(canary=0.25, min_nodes=count, wait=180, timeout=300)
            start = time.monotonic()
            fleet_status(fleet.folder, work / "status", log=lambda _: None)  # also waits for the devices
            results: dict[str, list[dict]] = {name: [] for name in sources}
            status_s = []
            for _ in range(args.repeats):
                start = time.monotonic()
                fleet_status(fleet.folder, work / "status", log=lambda _: None)
                status_s.append(time.monotonic() - start)
                for name, source in sources.items():  # alternating: drift hits both sizes alike
                    version += 1
                    folder = work / f"release{version}"
                    shutil.copytree(source, folder)
                    sign_release(folder, private, version=version)
                    start = time.monotonic()
                    result = rollout(fleet.folder, folder, config, log=lambda _: None)
                    result["total"] = time.monotonic() - start
                    assert result["status"] == "complete" and len(result["canary"]) + len(result["rest"]) == count
                    results[name].append(result)
            for name, runs in results.items():
                rows.append((count, name, runs[0]["payload_bytes_per_node"],
                             statistics.median(r["total"] for r in runs),
                             statistics.median(r["seconds"]["canary"] for r in runs),
                             statistics.median(r["seconds"]["rest"] for r in runs),
                             statistics.median(status_s), len(runs[0]["canary"])))
            print(rows[-2:], flush=True)
    finally:
        for proc in devices:
            proc.terminate()
        for proc in devices:
            proc.wait(timeout=30)
        fleet.stop()
        shutil.rmtree(work, ignore_errors=True)
    table = ["| devices | release | payload per device | release to all (median) | canary step | rest step | "
             "empty job (status) | canary devices | device's own work |", "|---|---|---|---|---|---|---|---|---|"]
    for count, name, size, total, canary, rest, status, canary_n in rows:
        table.append(f"| {count} | {name} | {size:,} B | {total:.1f} s | {canary:.2f} s | {rest:.2f} s | "
                     f"{status:.1f} s | {canary_n} | {local[name]:.2f} s |")
    body = (f"## Fleet rollout (`benchmarks/fleet.py`)\n\n`python benchmarks/fleet.py --nodes {args.nodes} "
            f"--repeats {args.repeats}` on {machine()}: one served fleet, every device a real SuperNode process "
            f"joined with `edgekit-agent join` on this machine, TLS and node keys. Medians of {args.repeats} "
            "rollouts per row, the two release sizes alternating. \"Release to all\" is the operator's wall time "
            "of `rollout()` (submitting the Flower run, canary, gate, rest, result); the steps are the ServerApp's "
            "send-and-receive times, which include each device's verify, install, smoke test and two "
            "measurements on 50 samples. \"Payload\" is the release files inside the message (Flower's envelope "
            "and TLS are not counted). The empty job is a status collection: the fixed cost of one Flower run. "
            "\"Device's own work\" is the same install handler called in-process (verify, install, smoke test, "
            "measure before and after), without Flower: the rest of each step is Flower's delivery. An idle "
            "Flower 1.41 SuperNode asks for messages every 3 s (a fixed `time.sleep(3)` in "
            "`flwr/supernode/start_client_internal.py`), so steps take multiples of about 3 s whatever the "
            "payload; with 8 devices on 2 cores the later step needs one more poll.\n\n"
            + "\n".join(table))
    write_section("fleet", body)
    print(body)


if __name__ == "__main__":
    main()
