"""Fleet rollout: how long a signed release takes to reach N devices, and the bytes each device receives.

One served fleet (`edgekit fleet serve` in-process: SuperLink + TLS gateway), N devices enrolled as the
README enrolls them (own key pair, registered, `edgekit-agent join` with a store and data). For each N,
releases of two sizes are rolled out alternately (canary 0.25, then the rest), `repeats` times each; `fleet
status` (no payload: a telemetry collection, then a status job, two Flower runs since 6ff3e6a) is the baseline of
what Flower runs cost. All processes share this machine.

    python benchmarks/fleet.py [--nodes 2,4,8] [--repeats 3]
    python benchmarks/fleet.py --scale 2,8,32

``--scale``: the fleet at 2, 8 and 32 devices (real SuperNodes on this machine): time for every device to
converge to a new release (one convergence pass), a canary rollout to all, a telemetry collection, the server's
resident memory and idle CPU per device, the release bytes per device, and a scrape of /metrics over 100,000
stored windows; then a projection for 10,000 devices behind one SuperLink, computed from these figures (section
"fleet-scale").
"""

from __future__ import annotations

import argparse
import json
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


def _converge_all(fleet_folder: Path, work: Path, count: int, wanted: str, passes: int = 4) -> dict:
    """Convergence passes (as ``fleet serve`` runs them) until every device serves ``wanted``: the time and the
    passes it took, the devices converged after the first pass, and the SuperLink's "database is locked" errors
    meanwhile (its SQLite state under contention)."""
    from device_agents import ModelStore
    from edgekit.errors import EdgeKitError
    from edgekit.fleet.rollout import converge

    log = fleet_folder / "logs" / "superlink.log"
    locked_before = log.read_text(errors="replace").count("database is locked")
    start, out = time.monotonic(), {"first_pass_converged": 0}
    for done in range(1, passes + 1):
        try:
            converge(fleet_folder, timeout=120, log=lambda _: None)
        except EdgeKitError as exc:  # the pass failed as a whole: the next one tries again, as fleet serve does
            print(f"convergence pass failed: {exc}", flush=True)
        serving = sum(getattr(ModelStore(work / f"device{i}" / "store").current, "name", "") == wanted
                      for i in range(count))
        if done == 1:
            out["first_pass_s"], out["first_pass_converged"] = time.monotonic() - start, serving
        if serving == count:
            break
    out.update(converge_s=time.monotonic() - start, converge_passes=done, converged=serving,
               locked_errors=log.read_text(errors="replace").count("database is locked") - locked_before)
    return out


def _stop(devices: list[subprocess.Popen], fleet) -> None:
    for proc in devices:
        proc.terminate()
    for proc in devices:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    fleet.stop()


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def _rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def _scrape_seconds(work: Path, windows: int) -> float:
    """One /metrics scrape (FleetCollector) over ``windows`` stored windows of 4 versions from 1,000 nodes."""
    from prometheus_client import CollectorRegistry, generate_latest

    from device_agents.serving.stats import ServingStats
    from edgekit.fleet.metrics import FleetCollector
    from edgekit.fleet.telemetry import TelemetryStore

    store = TelemetryStore(work / "scrape.sqlite")
    now = time.time()
    stats = {}
    for version in range(4):
        window = ServingStats(f"v{version}", num_classes=10, features=1, start=now - 120, end=now - 60)
        window.record(np.zeros((8, 1)), np.eye(10)[np.arange(8)], seconds=0.002)
        stats[version] = window
    for i in range(windows):
        store.add(i % 1000, i // 1000 + 1, stats[i % 4], now=now)
    store.close()
    registry = CollectorRegistry()
    registry.register(FleetCollector(work / "scrape.sqlite"))
    start = time.perf_counter()
    generate_latest(registry)
    return time.perf_counter() - start


def _desire(fleet_folder: Path, release: Path) -> str:
    """Make ``release`` the fleet's desired release without a rollout (as if devices were offline for it)."""
    import hashlib

    from device_agents.store.release import RELEASE
    from edgekit.fleet.rollout import database, keep_release
    from edgekit.fleet.telemetry import TelemetryStore

    kept = keep_release(fleet_folder, release)
    release_id = hashlib.sha256((kept / RELEASE).read_bytes()).hexdigest()[:16]
    store = TelemetryStore(database(fleet_folder))
    store.record_release(release_id, 0, kept, None, now=time.time())
    store.set_desired(release_id)
    store.close()
    return release_id


def scale(counts: list[int], idle_seconds: float) -> None:
    from device_agents import ModelStore
    from device_agents.federated.join import free_port
    from device_agents.store.serving import ServedModel
    from edgekit.errors import EdgeKitError, RolloutError
    from edgekit.fleet.rollout import RolloutConfig, collect, rollout
    from edgekit.fleet.serve import FleetConfig, serve
    from edgekit.fleet.signing import new_keys, sign_release
    from edgekit.loading.data import load_digits

    work = Path(tempfile.mkdtemp(prefix="edgekit-fleet-scale-"))
    source = _models(work)["int8 CNN"]
    private, public = new_keys(work / "keys")
    fleet = serve(work / "fleet", FleetConfig(port=free_port()), signing_key=private)
    server = [proc.pid for _, proc, _ in fleet.procs.procs]
    base_rss = _rss_mib(server)
    devices: list[subprocess.Popen] = []
    rows, version, digits = [], 0, load_digits()
    try:
        for count in counts:
            while len(devices) < count:
                i = len(devices)
                devices.append(_join(fleet, work / f"device{i}", public, slice(1000 + 20 * i, 1020 + 20 * i)))
            row: dict = {"devices": count}
            version += 1
            folder = work / f"release{version}"
            shutil.copytree(source, folder)
            sign_release(folder, private, version=version)
            start = time.monotonic()
            try:
                result = rollout(fleet.folder, folder, RolloutConfig(canary=0.25, min_nodes=count, wait=600,
                                                                     timeout=300), log=lambda _: None)
            except RolloutError as exc:  # a device that did not answer in time: recorded, not hidden
                result = exc.result
            row["rollout_s"], row["rollout_status"] = time.monotonic() - start, result["status"]
            row["payload"] = result["payload_bytes_per_node"]
            version += 1
            folder = work / f"release{version}"
            shutil.copytree(source, folder)
            sign_release(folder, private, version=version)
            wanted = _desire(fleet.folder, folder)
            row.update(_converge_all(fleet.folder, work, count, wanted))
            for i in range(count):  # each device's application served one window
                with ServedModel.open(ModelStore(work / f"device{i}" / "store")) as served:
                    served.predict(digits.x[:16])
            start = time.monotonic()
            try:
                collect(fleet.folder, timeout=120, log=lambda _: None)
            except EdgeKitError as exc:
                print(f"collection failed: {exc}", flush=True)
            row["collect_s"] = time.monotonic() - start
            time.sleep(5)
            cpu_before, start = _cpu_seconds(server), time.monotonic()
            time.sleep(idle_seconds)
            row["idle_cpu_per_device"] = (_cpu_seconds(server) - cpu_before) / (time.monotonic() - start) / count
            row["server_rss_per_device"] = (_rss_mib(server) - base_rss) / count
            row["server_rss"] = _rss_mib(server)
            row["device_rss"] = sum(_rss_mib(_tree(p.pid)) for p in devices) / count
            rows.append(row)
            print(row, flush=True)
    finally:
        _stop(devices, fleet)
    scrape = _scrape_seconds(work, 100_000)
    shutil.rmtree(work, ignore_errors=True)
    (Path(__file__).parent / "results" / "fleet-scale.json").write_text(
        json.dumps({"rows": rows, "scrape_s": scrape, "idle_seconds": idle_seconds}, indent=2) + "\n")
    write_section("fleet-scale", _scale_report(rows, scrape, counts, idle_seconds))


def _scale_report(rows: list[dict], scrape: float, counts: list[int], idle_seconds: float) -> str:
    table = ["| devices | all converged | passes | converged after one pass | canary rollout to all | "
             "telemetry collection | SuperLink 'database is locked' errors | server RSS | server RSS per device | "
             "server idle CPU per device | device RSS (agent + SuperNode) | release bytes per device |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        converged = (f"{r['converge_s']:.1f} s" if r["converged"] == r["devices"] else
                     f"not within {r['converge_s']:.0f} s ({r['converged']} of {r['devices']})")
        table.append(f"| {r['devices']} | {converged} | {r['converge_passes']} | {r['first_pass_converged']} in "
                     f"{r['first_pass_s']:.1f} s | {r['rollout_s']:.1f} s ({r['rollout_status']}) | "
                     f"{r['collect_s']:.1f} s | {r['locked_errors']} | {r['server_rss']:.0f} MiB | "
                     f"{r['server_rss_per_device']:.2f} MiB | {100 * r['idle_cpu_per_device']:.2f}% of a core | "
                     f"{r['device_rss']:.0f} MiB | {r['payload']:,} B |")
    big = rows[-1]
    n = 10_000
    polls = n / 3.0
    cores = big["idle_cpu_per_device"] * n
    locked = sum(r["locked_errors"] for r in rows)
    projection = (
        f"**Projection for {n:,} devices behind one SuperLink** (arithmetic on the figures above, not a "
        f"measurement):\n\n"
        f"- *The 3 s poll.* Every idle SuperNode asks the SuperLink for messages every 3 s: {polls:,.0f} "
        f"requests/s at {n:,} devices, each through the TLS gateway. Idle, the SuperLink and gateway used "
        f"{100 * big['idle_cpu_per_device']:.2f}% of a core per device here ({big['devices']} devices, "
        f"{idle_seconds:g} s): about {cores:,.1f} cores for {n:,} idle devices, before any job. That is the "
        "first limit: past a few thousand devices the poll needs a push channel instead of polling, a longer "
        "poll interval, or several SuperLinks by region with the fleet's jobs fanned out over them.\n"
        f"- *Lost replies.* At {big['devices']} devices the first convergence pass brought "
        f"{big['first_pass_converged']} of {big['devices']} devices to the release in {big['first_pass_s']:.0f} s; "
        f"all took {big['converge_passes']} pass(es), {big['converge_s']:.0f} s (a pass waits out its timeout for "
        f"a device that does not answer), and the collection {big['collect_s']:.0f} s. The SuperLink logged "
        f"{big['locked_errors']} SQLite \"database is locked\" error(s) meanwhile ({locked} over all rows). Every "
        "device's ClientApp (a new Python process per message: import, LiteRT load, verify, smoke test, two "
        "measurements) runs on the same 2 cores as the SuperLink here, so this run does not separate CPU "
        "contention from the SuperLink's single SQLite writer. On a real fleet the ClientApp work is spread over "
        f"the devices, but {n:,} devices' polls, heartbeats and replies all go through that one writer "
        "(SQLAlchemy over SQLite): a SuperLink on a server database, or one SuperLink per few thousand devices. "
        "Passes are idempotent, so a lost reply costs a pass, not a device.\n"
        "- *Flower's state database.* The SuperLink keeps each message's serialized content in its SQL state "
        "until the device pulls it (`flwr/server/superlink/linkstate/sql_linkstate.py`), through one writer: a "
        f"rollout to {n:,} devices puts {n:,} copies of the release through it ({big['payload']:,} bytes here: "
        f"{big['payload'] * n / 2**20:,.0f} MiB; a 1.3 MB release: {1.33e6 * n / 2**30:,.0f} GiB). Past a few "
        "thousand devices releases should "
        "travel by reference (a signed URL or a content-addressed cache the device fetches and verifies "
        "against the signed digest) instead of inside the message.\n"
        f"- *edgekit's telemetry database.* One /metrics scrape over 100,000 stored windows took {scrape:.2f} s "
        f"(it sums every window at each scrape). {n:,} devices flushing a window every 5 minutes write "
        f"{n / 300:,.0f} rows/s and {n * 288:,} rows a day; after one day a scrape at the measured rate would "
        f"take about {scrape * n * 288 / 100_000:,.0f} s. At that scale the store needs per-version rollups "
        "updated on insert, retention of raw windows, and a server database (PostgreSQL) when several servers "
        "share it.\n"
        f"- *Memory.* The SuperLink and gateway grew by {big['server_rss_per_device']:.2f} MiB per connected "
        f"device here: about {big['server_rss_per_device'] * n / 1024:,.1f} GiB at {n:,} if it stays linear.")
    return (f"## Fleet at scale (`benchmarks/fleet.py --scale`)\n\n`python benchmarks/fleet.py --scale "
            f"{','.join(map(str, counts))}` on {machine()}: one served fleet, every device a real SuperNode "
            "joined with `edgekit-agent join` on this machine (so the devices' work competes with the server's "
            "for the same 2 cores). Per row, one run of each: a canary rollout (0.25, then the rest); convergence "
            "passes (at most 4, a 120 s timeout each) until every device serves a new desired release; a "
            "collection after each device's "
            "application served one window. Server RSS and CPU are the SuperLink's and the TLS gateway's "
            f"processes (RSS over the fleet's RSS before any device joined; CPU over {idle_seconds:g} s idle). "
            "Device RSS is each device's process tree (`edgekit-agent join` and its SuperNode) at rest.\n\n"
            + "\n".join(table) + "\n\n" + projection)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="2,4,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", help="device counts for the scale run, e.g. 2,8,32")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    args = parser.parse_args()
    if args.scale:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        os.environ.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})
        scale(sorted(int(n) for n in args.scale.split(",")), args.idle_seconds)
        return
    counts = sorted(int(n) for n in args.nodes.split(","))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the fleet and the devices on SIGTERM too
    os.environ.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"})

    from device_agents.federated.join import free_port
    from edgekit.fleet.rollout import Gates, RolloutConfig, fleet_status, rollout
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
            # the two releases are different models rolled out in turn: a device's accuracy before and after
            # compares one with the other, which the drop gate is not for (its "new model family" case); this
            # benchmark times delivery. A 92% MLP after a 96% CNN on a canary's 50 samples halted a rollout.
            config = RolloutConfig(canary=0.25, gates=Gates(max_accuracy_drop=None), min_nodes=count, wait=180,
                                   timeout=300)
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
        _stop(devices, fleet)
        shutil.rmtree(work, ignore_errors=True)
    table = ["| devices | release | payload per device | release to all (median) | canary step | rest step | "
             "fleet status (2 runs) | canary devices | device's own work |", "|---|---|---|---|---|---|---|---|---|"]
    for count, name, size, total, canary, rest, status, canary_n in rows:
        table.append(f"| {count} | {name} | {size:,} B | {total:.1f} s | {canary:.2f} s | {rest:.2f} s | "
                     f"{status:.1f} s | {canary_n} | {local[name]:.2f} s |")
    body = (f"## Fleet rollout (`benchmarks/fleet.py`)\n\n`python benchmarks/fleet.py --nodes {args.nodes} "
            f"--repeats {args.repeats}` on {machine()}: one served fleet, every device a real SuperNode process "
            f"joined with `edgekit-agent join` on this machine, TLS and node keys. Medians of {args.repeats} "
            "rollouts per row, the two release sizes alternating (two different models, so the accuracy-drop gate "
            "is off; every other gate runs). \"Release to all\" is the operator's wall time "
            "of `rollout()` (submitting the Flower run, canary, gate, rest, result); the steps are the ServerApp's "
            "send-and-receive times, which include each device's verify, install, smoke test and two "
            "measurements on 50 samples. \"Payload\" is the release files inside the message (Flower's envelope "
            "and TLS are not counted). \"Fleet status\" is `fleet_status()` with no payload: a telemetry collection "
            "then a status job, the fixed cost of two Flower runs. "
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
