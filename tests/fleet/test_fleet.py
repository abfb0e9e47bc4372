"""Signed releases, the device store's refusals, and canary rollouts on a real fleet (SuperLink + 4 SuperNodes)."""

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, ROOT, assert_one_line_error, float_release, nan_on_negative_release, run_cli

from device_agents import ModelStore
from device_agents.errors import InstallError, ReleaseError


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from edgekit.fleet.signing import new_keys

    base = tmp_path_factory.mktemp("keys")
    return new_keys(base / "ours"), new_keys(base / "theirs")


def _signed(source: Path, target: Path, key: Path, version: int, **kwargs) -> Path:
    from edgekit.fleet.signing import sign_release

    shutil.copytree(source, target)
    sign_release(target, key, version=version, **kwargs)
    return target


def _rehash(folder: Path) -> None:
    """What the issue's attacker did: recompute every sha256 and size in manifest.json."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["artifacts"]:
        data = (folder / entry["file"]).read_bytes()
        entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _serves(store: ModelStore, version_id: str) -> None:
    from device_agents.serving.integrity import verified_artifact
    from device_agents.serving.runtime import Model

    assert store.current is not None and store.current.name == version_id
    model = Model.load(verified_artifact(store.current).data)
    assert np.isfinite(model.predict(model.example_input())).all()


def test_keys_are_new_private_and_never_overwritten(tmp_path):
    proc = run_cli("keys", "new", "--out", str(tmp_path / "k"))
    assert proc.returncode == 0, proc.stderr
    assert oct((tmp_path / "k" / "signing.key").stat().st_mode & 0o777) == "0o600"
    assert (tmp_path / "k" / "signing.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    before = (tmp_path / "k" / "signing.key").read_bytes()
    assert_one_line_error(run_cli("keys", "new", "--out", str(tmp_path / "k")), 2, "already exists")
    assert (tmp_path / "k" / "signing.key").read_bytes() == before


def test_a_signed_release_installs_and_the_store_pins_its_key(float_out, keys, tmp_path):
    from device_agents.store.release import load_public_key, verify_release

    (_, ours), _ = keys
    release = _signed(float_out, tmp_path / "r1", keys[0][0], 1)
    store = ModelStore(tmp_path / "store", trust=ours)
    target = store.install(release)
    assert target.name == verify_release(release, load_public_key(ours)).id  # named by the signed metadata's hash
    assert (target / "release.json").read_bytes() == (release / "release.json").read_bytes()
    status = ModelStore(tmp_path / "store").status()
    assert status["current"]["release"] == 1 and status["highest_release"] == 1
    assert status["trusted_key"] == load_public_key(ours).keyid
    _serves(store, target.name)


def test_every_hostile_release_is_refused_and_the_old_model_keeps_serving(float_out, int8_out, keys, tmp_path):
    (private, public), (their_private, their_public) = keys
    store = ModelStore(tmp_path / "store", trust=public)
    serving = store.install(_signed(float_out, tmp_path / "v2", private, 2)).name

    # the attack: a different model.tflite with the manifest's sha256 and size recomputed
    swapped = _signed(int8_out, tmp_path / "swapped", private, 3)
    shutil.copy(float_out / "model.tflite", swapped / "model.tflite")
    _rehash(swapped)
    with pytest.raises(ReleaseError, match="manifest.json is not the one release 3 signed"):
        store.install(swapped)
    # an artifact changed, manifest left alone
    altered = _signed(int8_out, tmp_path / "altered", private, 3)
    data = bytearray((altered / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (altered / "model.tflite").write_bytes(bytes(data))
    with pytest.raises(InstallError, match="does not match its manifest"):
        store.install(altered)
    # the version number edited without re-signing
    bumped = _signed(int8_out, tmp_path / "bumped", private, 3)
    meta = json.loads((bumped / "release.json").read_text())
    meta["signed"]["version"] = 99
    (bumped / "release.json").write_text(json.dumps(meta))
    with pytest.raises(ReleaseError, match="no valid signature by the trusted key"):
        store.install(bumped)
    # signed by another key; unsigned; older; equal; expired
    with pytest.raises(ReleaseError, match="no valid signature by the trusted key"):
        store.install(_signed(int8_out, tmp_path / "theirs", their_private, 3))
    with pytest.raises(ReleaseError, match="not a signed release"):
        store.install(int8_out)
    with pytest.raises(ReleaseError, match="release 1 is not newer than release 2"):
        store.install(_signed(int8_out, tmp_path / "older", private, 1))
    with pytest.raises(ReleaseError, match="release 2 is not newer than release 2"):
        store.install(_signed(int8_out, tmp_path / "equal", private, 2))
    expired = _signed(int8_out, tmp_path / "expired", private, 5, expires=timedelta(minutes=1))
    from device_agents.store.release import load_public_key, verify_release

    with pytest.raises(ReleaseError, match="expired"):
        verify_release(expired, load_public_key(public), now=datetime.now(timezone.utc) + timedelta(minutes=2))
    # a pinned store keeps requiring its key without being told, and refuses another one
    with pytest.raises(ReleaseError, match="not a signed release"):
        ModelStore(tmp_path / "store").install(int8_out)
    with pytest.raises(ReleaseError, match="pinned to signing key"):
        ModelStore(tmp_path / "store", trust=their_public).install(_signed(int8_out, tmp_path / "t2", their_private, 9))
    _serves(store, serving)
    assert not [p for p in (tmp_path / "store" / "versions").iterdir() if p.name.startswith(".")]


def test_hostile_release_metadata_is_refused_in_one_line(int8_out, keys, tmp_path):
    (private, public), _ = keys
    store = ModelStore(tmp_path / "store", trust=public)
    for name, content in [("huge", b"{" + b" " * (2 << 20)), ("garbage", b"\x00\xffnot json"),
                          ("root", b'{"signed": {"_type": "root"}, "signatures": []}')]:
        folder = _signed(int8_out, tmp_path / name, private, 3)
        (folder / "release.json").write_bytes(content)
        with pytest.raises(ReleaseError) as caught:
            store.install(folder)
        assert "\n" not in str(caught.value) and len(str(caught.value)) < 400
    # a signed target outside its folder, or an extra signed file the manifest does not list
    from edgekit.fleet.signing import sign_release

    extra = _signed(int8_out, tmp_path / "extra", private, 3)
    manifest = json.loads((extra / "manifest.json").read_text())
    manifest["artifacts"] = manifest["artifacts"][:1]
    (extra / "manifest.json").write_text(json.dumps(manifest))
    sign_release(extra, private, version=3)
    meta = json.loads((extra / "release.json").read_text())
    assert len(meta["signed"]["targets"]) == 2  # manifest + the one artifact it still lists
    store.install(extra)  # a consistent, smaller release is fine


def test_rollback_is_the_way_back_and_a_rolled_back_release_is_not_reinstalled(float_out, int8_out, keys, tmp_path):
    (private, public), _ = keys
    store = ModelStore(tmp_path / "store", trust=public)
    first = store.install(_signed(float_out, tmp_path / "v1", private, 1)).name
    second_folder = _signed(int8_out, tmp_path / "v2", private, 2)
    second = store.install(second_folder).name
    assert store.rollback().name == first
    with pytest.raises(ReleaseError, match="release 2 is not newer than release 2"):
        store.install(second_folder)
    assert store.install(_signed(int8_out, tmp_path / "v3", private, 3)).name not in (first, second)


def test_cli_install_trust_refusals_are_one_line_and_release_checks_its_folder(float_out, int8_out, keys, tmp_path):
    (private, public), (their_private, _) = keys
    store = str(tmp_path / "store")
    good = _signed(float_out, tmp_path / "v2", private, 2)
    proc = run_cli("install", "--model", str(good), "--store", store, "--trust", str(public), tool="edgekit-agent")
    assert proc.returncode == 0 and "signed release 2" in proc.stdout, proc.stderr
    theirs = _signed(int8_out, tmp_path / "theirs", their_private, 3)
    assert_one_line_error(run_cli("install", "--model", str(theirs), "--store", store, "--trust", str(public),
                                  tool="edgekit-agent"), 1, "no valid signature by the trusted key")
    assert_one_line_error(run_cli("install", "--model", str(int8_out), "--store", store, tool="edgekit-agent"),
                          1, "not a signed release")
    older = _signed(int8_out, tmp_path / "older", private, 1)
    assert_one_line_error(run_cli("install", "--model", str(older), "--store", store, tool="edgekit-agent"),
                          1, "not newer than release 2")
    status = json.loads(run_cli("status", "--store", store, "--json", tool="edgekit-agent").stdout)
    assert status["current"]["release"] == 2
    # edgekit release refuses a folder altered since edgekit wrote it, bad versions and a public key as key
    altered = tmp_path / "altered"
    shutil.copytree(int8_out, altered)
    (altered / "model.tflite").write_bytes(b"x")
    assert_one_line_error(run_cli("release", str(altered), "--key", str(private), "--version", "4"), 2,
                          "cannot release")
    assert_one_line_error(run_cli("release", str(good), "--key", str(private), "--version", "0"), 2, "version")
    assert_one_line_error(run_cli("release", str(good), "--key", str(public), "--version", "4"), 2, "private key")
    # a key that is not there: the command that makes one (it named a Python function to a CLI user)
    assert_one_line_error(run_cli("release", str(good), "--key", str(tmp_path / "none.key"), "--version", "4"), 2,
                          "none.key does not exist; create a key pair with `edgekit keys new`")


# --- a real fleet: `fleet serve`, 4 devices enrolled with their own keys, rollouts and status -------------------

def _device_bin() -> Path:
    """The device environment's scripts (make test builds .venv-device from the device wheel)."""
    device = ROOT / ".venv-device" / "bin"
    return device if (device / "edgekit-agent").exists() else BIN


def _always_seven(folder: Path) -> Path:
    """A valid float TFLite release that answers class 7 for every input."""
    from edgekit import _tf

    keras = _tf.keras()
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    bias = np.full(10, -10.0, np.float32)
    bias[7] = 10.0
    model.layers[-1].set_weights([np.zeros((64, 10), np.float32), bias])
    return float_release(model, folder)


def _versions(tmp_path, count):
    return [ModelStore(tmp_path / f"device{i}" / "store").current.name for i in range(count)]


@pytest.mark.slow
@pytest.mark.xdist_group("fleet-recipe")
def test_the_readme_fleet_recipe_on_real_processes(cnn_path, int8_out, digits, keys, tmp_path):
    """fleet serve; four devices (their own environment, key pair and data) registered and joined; a trainable
    release rolled out; fl run on the devices' data; its final/ released and rolled out; a collapsing and a
    broken release stopped at the canary; tampered and foreign releases refused by every node; fleet status."""
    from device_agents.federated.join import free_port
    from edgekit import TrainableConfig, export_trainable
    from edgekit.errors import RolloutError
    from edgekit.federated.config import RoundSettings
    from edgekit.federated.fleet_run import FleetRunConfig, run_on_fleet
    from edgekit.fleet.rollout import Gates, RolloutConfig, collect, fleet_status, rollout, serving_summary
    from edgekit.fleet.serve import FleetConfig, serve
    from edgekit.fleet.signing import sign_release

    (private, public), _ = keys
    quiet = {"log": lambda _: None}
    fleet = serve(tmp_path / "fleet", FleetConfig(port=free_port()), signing_key=private)
    devices = []
    try:
        devices = _enroll(fleet, digits, tmp_path, public)
        canary = RolloutConfig(canary=0.25, min_nodes=4, wait=90, timeout=120)
        export_trainable(cnn_path, tmp_path / "trainable", data="digits", progress=False,
                         config=TrainableConfig(batch_size=8))
        sign_release(tmp_path / "trainable", private, version=1)
        first = rollout(fleet.folder, tmp_path / "trainable", canary, **quiet)
        assert first["status"] == "complete" and len(first["canary"]) == 1 and len(first["rest"]) == 3
        assert _versions(tmp_path, 4) == [first["release_id"]] * 4
        assert first["canary_summary"]["accuracy"] > 80 and first["canary_summary"]["error_rate"] == 0

        # federated rounds on the devices' own data, with the trainable release they installed
        run = run_on_fleet(cnn_path, "digits", tmp_path / "run", fleet.folder, progress=False,
                           config=FleetRunConfig(clients=4, rounds=RoundSettings(rounds=1, local_epochs=1)), **quiet)
        assert len(run.history) == 2 and run.history[-1]["replied"] == 4 and run.final_accuracy > 80
        # the round counts: at the default rate this converged model diverged on every device, and the server
        # refused the round; the devices now halve the rate when their own loss rises
        assert run.history[-1]["aggregated"], run.history[-1]
        assert 0 < run.history[-1]["train_metrics"]["learning-rate"] <= 0.1
        sign_release(tmp_path / "run" / "final", private, version=2)
        v2 = rollout(fleet.folder, tmp_path / "run" / "final", canary, **quiet)["release_id"]
        assert _versions(tmp_path, 4) == [v2] * 4

        # accuracy collapses on the canary: it stops there and is rolled back (through the command: exit 4)
        seven = _signed(_always_seven(tmp_path / "seven-src"), tmp_path / "v3", private, 3)
        proc = run_cli("fleet", "rollout", "--fleet", str(fleet.folder), "--release", str(seven), "--min-nodes", "4",
                       "--min-accuracy", "80")
        assert_one_line_error(proc, 4, "rollout halted", "accuracy", "< 80%")
        assert "rollout complete" not in proc.stdout and "rolled back on 1 node(s)" in proc.stdout
        assert _versions(tmp_path, 4) == [v2] * 4

        # a release that fails on the device (its smoke test): the canary refuses it, nobody else gets it
        broken = _signed(int8_out, tmp_path / "v4", private, 4)
        (broken / "model.tflite").write_bytes(b"\x00\x00\x00\x00TFL3" + b"\x00" * 64)
        _rehash(broken)
        sign_release(broken, private, version=4)
        with pytest.raises(RolloutError, match="did not install it.*smoke test") as caught:
            rollout(fleet.folder, broken, canary, **quiet)
        assert caught.value.result["rest"] == [] and caught.value.result["rolled_back"] == []
        assert _versions(tmp_path, 4) == [v2] * 4

        # a good new release reaches everyone; then tampered and foreign releases are refused by every node (each
        # refusal of a store, older and unsigned releases among them, is tested on a store above)
        v5 = rollout(fleet.folder, _signed(int8_out, tmp_path / "v5", private, 5), canary, **quiet)["release_id"]
        assert _versions(tmp_path, 4) == [v5] * 4
        everyone = RolloutConfig(canary=1.0, min_nodes=4, wait=90, timeout=120, gates=Gates(max_accuracy_drop=None))
        tampered = _signed(int8_out, tmp_path / "v6", private, 6)
        shutil.copy(tmp_path / "run" / "final" / "model.tflite", tampered / "model.tflite")
        _rehash(tampered)
        for folder, reason in [(tampered, "is not the one release 6 signed"),
                               (_signed(int8_out, tmp_path / "foreign", keys[1][0], 7),
                                "no valid signature by the trusted key")]:
            with pytest.raises(RolloutError) as caught:
                rollout(fleet.folder, folder, everyone, **quiet)
            rows = caught.value.result["canary"]
            assert len(rows) == 4 and all(not r["ok"] and reason in r["reason"] for r in rows), rows
            assert caught.value.result["rolled_back"] == []  # every device answered that it refused it
            assert _versions(tmp_path, 4) == [v5] * 4

        # an application serves through the agent on two devices: fleet status collects what they served
        from device_agents import ModelStore
        from device_agents.serving.spool import Spool
        from device_agents.store.serving import ServedModel

        for i, calls in ((0, 7), (1, 5)):
            with ServedModel.open(ModelStore(tmp_path / f"device{i}" / "store"), flush_calls=3) as served:
                for j in range(calls):
                    served.predict(digits.x[j * 2:j * 2 + 2])
        status = fleet_status(fleet.folder, tmp_path / "status", **quiet)
        served_v5 = ModelStore(tmp_path / "device0" / "store").current.name
        serving = status["serving"][served_v5]
        assert (serving["nodes"], serving["windows"], serving["calls"], serving["samples"]) == (2, 5, 12, 24)
        assert serving["errors"] == 0 and 0 < serving["p50_s"] <= serving["p99_s"] < 10
        collect(fleet.folder, **quiet)  # the next collection: each device drains what the server stored
        assert Spool(tmp_path / "device0" / "store" / "telemetry").files() == []
        assert serving_summary(fleet.folder)[served_v5]["windows"] == 5  # stored once
        assert sorted(r["version_id"] for r in status["nodes"]) == [v5] * 4
        assert all(r["release"] == 5 and r["accuracy"] > 80 for r in status["nodes"])
        assert status["versions"][v5]["nodes"] == 4 and status["versions"][v5]["accuracy"] > 80
        saved = json.loads((tmp_path / "status" / "fleet.json").read_text())["versions"][v5]
        assert saved["nodes"] == 4 and sorted(d["node"] for d in saved["devices"]) == sorted(r["node"] for r in
                                                                                              status["nodes"])
        assert all(d["accuracy"] > 80 and d["samples"] == 90 for d in saved["devices"])
        assert (tmp_path / "status" / "fleet.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        _stop(devices, fleet)
    assert all(proc.returncode == 0 for proc, _ in devices), [p.returncode for p, _ in devices]


def _scrape(url: str) -> dict:
    """/metrics as {(name, labels...): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()  # noqa: S310 (loopback)
    return {(s.name, *sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples}


@contextlib.contextmanager
def _serving_apps(tmp_path, count, digits):
    """An application on each device serving through the agent (following its store) until the block ends:
    batches of digits whose corner pixel is -1."""
    from device_agents.store.serving import ServedModel

    stop, traffic = threading.Event(), digits.x[:20].copy()
    traffic[:, 0, 0, 0] = -1.0

    def app(i):
        with ServedModel.open(ModelStore(tmp_path / f"device{i}" / "store"), flush_seconds=2) as served:
            while not stop.is_set():
                served.predict(traffic)
                time.sleep(0.05)

    apps = [threading.Thread(target=app, args=(i,)) for i in range(count)]
    for thread in apps:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in apps:
            thread.join()


def _until(check, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(1.0)
    raise AssertionError(f"not within {seconds} s: {what}")


@pytest.mark.slow
@pytest.mark.xdist_group("fleet-watch")
def test_a_watched_fleet_collects_serves_metrics_and_converges_a_device_that_joins_later(int8_out, digits, keys,
                                                                                            tmp_path):
    """fleet serve with convergence passes, collections and /metrics (real SuperLink, SuperNodes, prometheus
    HTTP server): an app serves through the agent and its counts and latency histogram reach /metrics under the
    release's version; a device offline at the rollout installs the release when it joins, without another
    command; drift shows when a device serves inputs of another distribution and not for the calibration one."""
    from device_agents.federated.join import free_port
    from device_agents.store.serving import ServedModel
    from edgekit.errors import RolloutError
    from edgekit.fleet.metrics import MetricsAddress
    from edgekit.fleet.rollout import Gates, RolloutConfig, rollout
    from edgekit.fleet.serve import FleetConfig, serve
    from edgekit.fleet.telemetry import DRIFT_THRESHOLD
    from edgekit.fleet.watch import WatchConfig

    (private, public), _ = keys
    watch = WatchConfig(converge_every=5.0, collect_every=5.0, metrics=MetricsAddress(port=free_port()))
    fleet = serve(tmp_path / "fleet", FleetConfig(port=free_port()), signing_key=private, watch=watch)
    url = fleet.watcher.metrics.url
    devices = []
    try:
        devices = _enroll(fleet, digits, tmp_path, public, count=1)
        release = _signed(int8_out, tmp_path / "v1", private, 1)
        everyone = RolloutConfig(canary=1.0, min_nodes=1, wait=90, timeout=120, gates=Gates(max_accuracy_drop=None))
        v1 = rollout(fleet.folder, release, everyone, log=lambda _: None)["release_id"]
        shutil.rmtree(release)  # the fleet keeps its own copy for the devices that converge later
        assert _versions(tmp_path, 1) == [v1]

        # an application serves through the agent on device 0: the calibration distribution, 9 calls of 20
        with ServedModel.open(ModelStore(tmp_path / "device0" / "store"), flush_calls=3) as served:
            for i in range(9):
                served.predict(digits.x[i * 20:(i + 1) * 20])
        metrics = _until(lambda: (m := _scrape(url)).get(("edgekit_inferences_total", ("version", v1))) == 9 and m,
                         90, "device 0's calls in /metrics")
        assert metrics[("edgekit_inference_samples_total", ("version", v1))] == 180
        assert metrics[("edgekit_inference_errors_total", ("version", v1))] == 0
        assert metrics[("edgekit_inference_latency_seconds_count", ("version", v1))] == 9
        assert metrics[("edgekit_inference_latency_seconds_bucket", ("le", "+Inf"), ("version", v1))] == 9
        assert metrics[("edgekit_fleet_devices", ("state", "converged"), ("version", v1))] == 1
        assert metrics[("edgekit_desired_release", ("release_id", v1))] == 1
        assert metrics[("edgekit_release_accuracy", ("version", v1))] > 80  # the rollout's measurement
        # its own calibration distribution: no drift (on 180 samples the index is about 0.1: sampling noise)
        assert metrics[("edgekit_drift_psi", ("version", v1))] < DRIFT_THRESHOLD

        # device 1 was offline at the rollout: it joins now and converges on its own
        devices += _enroll(fleet, digits, tmp_path, public, count=2, first=1)
        _until(lambda: getattr(ModelStore(tmp_path / "device1" / "store").current, "name", None) == v1, 120,
               "device 1 serving the desired release")
        metrics = _until(lambda: (m := _scrape(url)).get(("edgekit_fleet_devices", ("state", "converged"),
                                                          ("version", v1))) == 2 and m, 60, "two converged devices")

        # device 1 serves inverted images: the version's inputs drift from its calibration data
        with ServedModel.open(ModelStore(tmp_path / "device1" / "store"), flush_calls=3) as served:
            for i in range(9):
                served.predict(1.0 - digits.x[i * 60:(i + 1) * 60])
        metrics = _until(lambda: (m := _scrape(url)).get(("edgekit_inferences_total", ("version", v1))) == 18 and m,
                         90, "device 1's calls in /metrics")
        assert metrics[("edgekit_drift_psi", ("version", v1))] > DRIFT_THRESHOLD
        proc = run_cli("fleet", "status", "--fleet", str(fleet.folder), "--out", str(tmp_path / "status"))
        assert proc.returncode == 0, proc.stderr
        assert f"desired: release 1 ({v1})" in proc.stdout and proc.stdout.count(": converged") == 2
        assert "DRIFT" in proc.stdout and f"served {v1}: 18 calls, 720 samples on 2 device(s)" in proc.stdout
        saved = json.loads((tmp_path / "status" / "fleet.json").read_text())
        assert saved["serving"][v1]["drifted"] is True and saved["desired"]["release_id"] == v1
        assert (tmp_path / "status" / "serving.png").read_bytes()[:4] == b"\x89PNG"
        assert "convergence to release 1" in (fleet.folder / "logs" / "watch.log").read_text()

        # a staged rollout whose release answers NaN on the apps' traffic: the served error rate in the bake
        # stops it at the first stage, which is rolled back; the other device never gets it
        nan = _signed(nan_on_negative_release(tmp_path / "nan-src"), tmp_path / "v2", private, 2)
        staged = RolloutConfig(stages=(0.5, 1.0), bake=15, min_nodes=2, wait=90, timeout=120,
                               gates=Gates(max_accuracy_drop=None, max_drift_psi=None))
        with _serving_apps(tmp_path, 2, digits), pytest.raises(RolloutError, match="stage 1: served error rate") \
                as caught:
            rollout(fleet.folder, nan, staged, log=lambda _: None)
        result = caught.value.result
        assert result["halted_at_stage"] == 1 and [len(stage["nodes"]) for stage in result["stages"]] == [1]
        evidence = result["stages"][0]["bake"]
        assert evidence["calls"] > 10 and evidence["error_rate"] == 1.0 and evidence["nodes"] == 1, evidence
        assert [row["ok"] for row in result["rolled_back"]] == [True] and _versions(tmp_path, 2) == [v1, v1]
        saved = json.loads((Path(result["job"]) / "rollout.json").read_text())
        assert saved["stages"][0]["bake"]["failures"] == evidence["failures"]
        assert _scrape(url)[("edgekit_desired_release", ("release_id", v1))] == 1  # the desired release stays
    finally:
        _stop(devices, fleet)
    assert all(proc.returncode == 0 for proc, _ in devices), [p.returncode for p, _ in devices]


HOSTILE_DEVICE = """
# What the owner of a registered device can do to its own agent: lie in its fleet replies, attack its updates.
import device_agents.federated.client_app as app
import device_agents.fleet.agent as fleet

honest_install = fleet.install


def install(files, node):
    metrics, text = honest_install(files, node)
    metrics.update({"accuracy": 100.0, "p99-ms": 0.0, "samples": 1e11})
    return metrics, text


fleet.install = install
honest_telemetry = fleet.telemetry


def telemetry(through, spool_id, node):
    import json
    import time

    from device_agents.serving.stats import ServingStats

    windows, metrics, own = honest_telemetry(through, spool_id, node)
    serving = fleet._store(node).current.name  # the release the fleet rolled out: the claim is about it
    forged = ServingStats(serving, num_classes=10, features=1, start=time.time() - 60, end=time.time() - 1)
    for _ in range(10):
        forged.record_error(seconds=8640.0)  # a day of serving in a one-minute window
    windows["000000000999"] = json.dumps(forged.to_dict()).encode()
    return windows, metrics, own


fleet.telemetry = telemetry
app.deployed_client_app = lambda: app.make_client_app(app.ClientSettings(faults={0: "sign-flip"}))
"""


def _enroll(fleet, digits, tmp_path, public, count=4, hostile=(), first=0):
    """Devices as docs/fleet.md enrolls them: own key pair, registered by the operator, joined with `join`; the
    ``hostile`` ones run an agent their owner changed (:data:`HOSTILE_DEVICE`)."""
    from edgekit.fleet.serve import register_node

    procs = []

    device = _device_bin()
    honest_env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    for i in range(first, count):
        env = honest_env
        if i in hostile:
            (tmp_path / f"hostile{i}").mkdir()
            (tmp_path / f"hostile{i}" / "sitecustomize.py").write_text(HOSTILE_DEVICE)
            env = {**honest_env, "PYTHONPATH": str(tmp_path / f"hostile{i}")}
        home = tmp_path / f"device{i}"
        home.mkdir()
        shutil.copy(public, home / "signing.pub")
        rows = slice(1400 + 90 * i, 1490 + 90 * i)
        np.savez(home / "data.npz", x=digits.x[rows], y=digits.y[rows])
        made = subprocess.run([str(device / "edgekit-agent"), "node-key", "--out", "keys"],
                              capture_output=True, text=True, env=env, cwd=home, timeout=120)
        assert made.returncode == 0, made.stderr
        assert "registered" in register_node(fleet.folder, home / "keys" / "node.pub")
        shutil.copy(fleet.ca, home / "ca.crt")
        log = open(home / "join.log", "w")  # noqa: SIM115 (closed with the process)
        procs.append((subprocess.Popen(
            [str(device / "edgekit-agent"), "join", "--superlink", fleet.gateway, "--ca", "ca.crt", "--key",
             "keys/node.key", "--data", "data.npz", "--store", "store", "--trust", "signing.pub"],
            cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all("joining the fleet" in (tmp_path / f"device{i}" / "join.log")
                                                  .read_text() for i in range(first, count)):
        time.sleep(0.5)
    return procs


def _stop(devices, fleet):
    for proc, _ in devices:
        proc.terminate()
    for proc, log in devices:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    fleet.stop()


HOSTILE_APP = """
import time
from pathlib import Path
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

server_app = ServerApp()
client_app = ClientApp()

@server_app.main()
def main(grid, context):
    deadline = time.monotonic() + 60
    while not list(grid.get_node_ids()) and time.monotonic() < deadline:
        time.sleep(0.5)
    messages = [Message(RecordDict({{"config": ConfigRecord({{}})}}), message_type="query.status", dst_node_id=n)
                for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(messages, timeout=90))
    Path({report!r}).write_text(" ".join(str(r.error.reason if r.has_error() else "ok") for r in replies) or "none")

@client_app.query("status")
def status(message, context):
    Path({marker!r}).write_text("the device ran the outsider's code")
    return Message(RecordDict(), reply_to=message)
"""


def _hostile_app(folder: Path, marker: Path, report: Path) -> Path:
    folder.mkdir()
    (folder / "hostile.py").write_text(HOSTILE_APP.format(marker=str(marker), report=str(report)))
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n[project]\nname = "hostile"\n'
        'version = "1.0.0"\ndependencies = []\n[tool.hatch.build.targets.wheel]\npackages = ["."]\n'
        '[tool.flwr.app]\npublisher = "hostile"\n[tool.flwr.app.components]\nserverapp = "hostile:server_app"\n'
        'clientapp = "hostile:client_app"\n')
    return folder


@pytest.mark.slow  # the device-side check in make test: test_an_app_whose_files_differ_from_its_signature_...
@pytest.mark.xdist_group("fleet-apps")
def test_a_device_runs_no_app_the_fleet_key_did_not_sign(cnn_path, digits, keys, tmp_path):
    """Defence in depth: a stranger who reaches the Control API (here: straight on its loopback port) submits an
    app; the device refuses to install or import it (no marker, an error reply), and still runs the signed jobs.
    An app the stranger signed with their own key, or the signed app with a file added, is refused the same way."""
    from device_agents.federated.join import free_port
    from edgekit.errors import FederationError
    from edgekit.federated.config import RoundSettings
    from edgekit.federated.fleet_run import FleetRunConfig, run_on_fleet
    from edgekit.federated.processes import flower_env
    from edgekit.fleet.rollout import fleet_status
    from edgekit.fleet.serve import FleetConfig, serve
    from edgekit.fleet.signing import sign_app

    (private, public), (their_private, _) = keys
    fleet = serve(tmp_path / "fleet", FleetConfig(port=free_port()), signing_key=private)
    devices = []
    try:
        devices = _enroll(fleet, digits, tmp_path, public, count=2)
        unsigned = _hostile_app(tmp_path / "unsigned", tmp_path / "device0" / "RAN", tmp_path / "unsigned.txt")
        theirs = _hostile_app(tmp_path / "theirs", tmp_path / "device0" / "RAN", tmp_path / "theirs.txt")
        sign_app(theirs, their_private)
        reasons = {}
        for app in (unsigned, theirs):
            proc = subprocess.run([str(BIN / "flwr"), "run", str(app), "fleet", "--stream"],
                                  env=flower_env(fleet.folder / "flwr_home"), cwd=app, capture_output=True, text=True,
                                  timeout=300)
            report = tmp_path / f"{app.name}.txt"
            assert report.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
            reasons[app.name] = report.read_text()
        assert not (tmp_path / "device0" / "RAN").exists()
        # the device's error reply says why (Flower relays the guard's exception)
        assert "the Flower app is not signed" in reasons["unsigned"], reasons
        assert "no valid signature by the trusted key" in reasons["theirs"], reasons
        # the operator's own signed jobs still run on it
        status = fleet_status(fleet.folder, tmp_path / "status", log=lambda _: None)
        assert len(status["nodes"]) == 2 and all(row["ok"] for row in status["nodes"]), status
        # fl run refuses before round 1 when the devices do not hold this model's trainable release
        with pytest.raises(FederationError, match="refused before round 1: 2 of 2 device.*no trainable artifact"):
            run_on_fleet(cnn_path, "digits", tmp_path / "run", fleet.folder, progress=False, log=lambda _: None,
                         config=FleetRunConfig(clients=2, rounds=RoundSettings(rounds=1)))
        assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "history.json").exists()
    finally:
        _stop(devices, fleet)
    assert not (tmp_path / "device0" / "RAN").exists()


@pytest.mark.xdist_group("fleet")
def test_one_hostile_device_of_four_can_neither_pass_a_broken_release_nor_halt_training(cnn_path, digits, keys,
                                                                                       tmp_path):
    """The issue's attacks on real processes: a registered device whose owner changed its agent replies accuracy
    100, p99 0 and 1e11 samples to every install, sends its training updates sign-flipped x4.5 with 100x its
    examples, and its telemetry claims a day of serving in a minute. A broken release (always class 7) is stopped
    at the canary; a good one is rolled out with the liar's vote dropped and named; its telemetry is refused by
    name; federated rounds on the devices commit every round, keep the model's accuracy and name the attacker
    (without the defences, one such update takes the model to chance: test_robust.py)."""
    from device_agents.federated.join import free_port
    from edgekit import TrainableConfig, export_trainable
    from edgekit.errors import RolloutError
    from edgekit.federated.config import RoundSettings
    from edgekit.federated.fleet_run import FleetRunConfig, run_on_fleet
    from edgekit.fleet.rollout import Gates, RolloutConfig, collect, rollout, serving_summary
    from edgekit.fleet.serve import FleetConfig, serve
    from edgekit.fleet.signing import sign_release

    (private, public), _ = keys
    quiet = {"log": lambda _: None}
    fleet = serve(tmp_path / "fleet", FleetConfig(port=free_port()), signing_key=private)
    devices = []
    everyone = RolloutConfig(canary=1.0, min_nodes=4, wait=90, timeout=120, gates=Gates(min_accuracy=50))
    try:
        devices = _enroll(fleet, digits, tmp_path, public, hostile=(3,))
        export_trainable(cnn_path, tmp_path / "trainable", data="digits", progress=False,
                         config=TrainableConfig(batch_size=8))
        sign_release(tmp_path / "trainable", private, version=1)
        first = rollout(fleet.folder, tmp_path / "trainable", everyone, **quiet)
        assert first["status"] == "complete" and len(first["dropped_votes"]) == 1, first["canary_votes"]
        liar = first["dropped_votes"][0]["node"]
        assert "more than the 200 the protocol asks for" in first["dropped_votes"][0]["reason"]
        assert sorted(first["canary_nodes"]) == sorted(r["node"] for r in first["canary"])
        # its telemetry claims what it could not have served: refused by name, nothing of it stored
        rows = {row["node"]: row for row in collect(fleet.folder, **quiet)["nodes"]}
        assert len(rows) == 4 and rows[liar]["stored"] == 0, rows
        assert rows[liar]["refused"] == ["000000000999: 86400.0 s spent serving in a window of 59.0 s (at most 64 "
                                         "calls at once)"], rows[liar]
        assert all(not row["refused"] for node, row in rows.items() if node != liar)
        assert serving_summary(fleet.folder) == {}

        seven = _signed(_always_seven(tmp_path / "seven-src"), tmp_path / "v2", private, 2)
        with pytest.raises(RolloutError, match="accuracy .*% < 80% on 3 of 3 canary device") as caught:
            rollout(fleet.folder, seven, RolloutConfig(canary=1.0, min_nodes=4, wait=90, timeout=120,
                                                       gates=Gates(min_accuracy=80)), **quiet)
        assert caught.value.result["dropped_votes"][0]["node"] == liar
        assert all(ModelStore(tmp_path / f"device{i}" / "store").current.name == first["release_id"]
                   for i in range(3))

        lines = []
        run = run_on_fleet(cnn_path, "digits", tmp_path / "run", fleet.folder, progress=False, log=lines.append,
                           config=FleetRunConfig(clients=4, rounds=RoundSettings(rounds=2, local_epochs=1)))
        history = json.loads((tmp_path / "run" / "history.json").read_text())["rounds"]
        assert all(h["aggregated"] and h["replied"] == 4 for h in history[1:]), history
        assert run.final_accuracy > history[0]["accuracy"] - 2 and run.final_accuracy > 85, history
        assert any(d["node"] == liar for h in history[1:] for d in h["dropped"] + h["rejected"]), history
        assert any(f"node {liar}" in line for line in lines), lines
    finally:
        _stop(devices, fleet)


def test_an_app_whose_files_differ_from_its_signature_is_refused(keys, tmp_path):
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    from device_agents.federated.app_guard import verify_app
    from device_agents.store.release import load_public_key
    from edgekit.federated.processes import write_flower_app
    from edgekit.fleet.signing import sign_app

    (private, public), (their_private, their_public) = keys
    app = tmp_path / "app"
    write_flower_app(app, name="edgekit-fleet", server="edgekit.fleet.jobs:fleet_server_app", config={"job": ""})
    sign_app(app, private)
    key = load_public_key(public)
    signed = build_fab_from_disk(app)
    assert set(verify_app(signed, key)) == {"pyproject.toml", "edgekit_client.py", "edgekit_server.py"}
    with pytest.raises(ReleaseError, match="no valid signature by the trusted key"):
        verify_app(signed, load_public_key(their_public))

    def rebuilt(change):
        buffer = io.BytesIO()
        with zipfile.ZipFile(io.BytesIO(signed)) as source, zipfile.ZipFile(buffer, "w") as target:
            for name in source.namelist():
                data = change(name, source.read(name))
                if data is not None:
                    target.writestr(name, data)
            if change("evil.py", None) is not None:
                target.writestr("evil.py", change("evil.py", None))
        return buffer.getvalue()

    cases = {
        "(size)": lambda n, d: d + b"\nimport os" if n == "edgekit_client.py" else d,
        "(sha256)": lambda n, d: d[:-2] + b"#!" if n == "edgekit_client.py" else d,
        "differ: evil.py": lambda n, d: b"import os" if n == "evil.py" else d,
        "differ: edgekit_server.py": lambda n, d: None if n == "edgekit_server.py" else d,
        "not signed": lambda n, d: None if n == "edgekit-app.json" else d,
    }
    for reason, change in cases.items():
        with pytest.raises(ReleaseError, match=reason):
            verify_app(rebuilt(change), key)
    with pytest.raises(ReleaseError, match="not a valid FAB"):
        verify_app(b"PK\x03\x04 not a zip", key)
    with pytest.raises(ReleaseError, match="more than"):
        verify_app(b"\x00" * ((10 << 20) + 1), key)


def _row(node=1, ok=True, accuracy=95.0, previous=96.0, errors=0.0, p99=1.0, p50=0.5, samples=100.0, reason=""):
    measure = {"inferences": samples, "errors": errors, "p99_ms": p99, "p50_ms": p50, "accuracy": accuracy,
               "samples": samples}
    before = {"inferences": 100.0, "errors": 0.0, "p99_ms": 0.6, "p50_ms": 0.5, "accuracy": previous, "samples": 100.0}
    return {"node": node, "ok": ok, "reason": reason, **measure, **{f"previous_{k}": v for k, v in before.items()}}


def test_each_canary_device_votes_once_on_every_gate_with_the_numbers():
    from edgekit.errors import InputError
    from edgekit.fleet.rollout import Gates, canary_verdict

    def failures(gates, *rows):
        return canary_verdict(list(rows), gates)["failures"]

    assert failures(Gates(min_accuracy=90, max_p99_ms=2), _row(1), _row(2, accuracy=97.0)) == []
    # every device must pass: one at 95% fails a 96% gate, whatever the other shows
    assert failures(Gates(min_accuracy=96), _row(1), _row(2, accuracy=99.0)) == [
        "accuracy 95.0% < 96% on 1 of 2 canary device(s)"]
    assert failures(Gates(max_p99_ms=0.5), _row(1)) == ["p99 latency 1.00 ms > 0.5 ms on 1 of 1 canary device(s)"]
    assert failures(Gates(), _row(1, errors=3)) == ["error rate 0.030 > 0 on 1 of 1 canary device(s)"]
    assert failures(Gates(), _row(1, accuracy=90.0)) == [
        "accuracy fell 6.0 points (96.0% -> 90.0%) > 2 on 1 of 1 canary device(s)"]
    assert failures(Gates(max_accuracy_drop=None), _row(1, accuracy=90.0)) == []  # a new model family
    assert failures(Gates(), _row(1), _row(2, ok=False, reason="bad signature")) == [
        "1 of 2 canary node(s) did not install it (bad signature)"]
    assert failures(Gates(min_accuracy=50), _row(1, accuracy=-1.0, previous=-1.0)) == [
        "no canary device has labeled data to measure accuracy on"]
    # a documented quorum: 2 of 3 pass is enough at 0.6, not at 1
    rows = [_row(1), _row(2), _row(3, accuracy=50.0)]
    assert failures(Gates(min_accuracy=90, quorum=0.6), *rows) == []
    assert failures(Gates(min_accuracy=90), *rows) == ["accuracy 50.0% < 90% on 1 of 3 canary device(s)",
                                                       "accuracy fell 46.0 points (96.0% -> 50.0%) > 2 on 1 of 3 "
                                                       "canary device(s)"]
    for bad in ({"max_error_rate": -0.1}, {"min_accuracy": 101}, {"max_p99_ms": float("nan")},
                {"max_accuracy_drop": True}, {"quorum": 0.4}):
        with pytest.raises(InputError, match="must be a number"):
            Gates(**bad)


def test_a_lying_canary_device_cannot_pass_a_broken_release():
    """The issue's attack: two honest canary devices measure 46.5% and 47.5%; a third replies accuracy 100, p99 0
    and 1e11 samples. Sample-weighted, the release passed a 90% gate; now the liar's vote is dropped (its numbers
    are impossible) and the honest devices fail it. A liar whose numbers are possible still has only one vote."""
    from edgekit.fleet.jobs import gate_summary
    from edgekit.fleet.rollout import Gates, canary_verdict, implausible

    honest = [_row(1, accuracy=46.5, previous=47.0), _row(2, accuracy=47.5, previous=47.0)]
    liar = _row(3, accuracy=100.0, p99=0.0, p50=0.4, samples=1e11)
    verdict = canary_verdict([*honest, liar], Gates(min_accuracy=90))
    assert verdict["failures"] == ["accuracy 46.5% < 90% on 2 of 2 canary device(s)"]
    assert verdict["dropped"] == [{"node": 3, "reason": "measurement: 1e+11 samples, more than the 200 the protocol "
                                                        "asks for"}]
    assert gate_summary([*honest, liar], verdict)["accuracy"] == pytest.approx(47.0)  # each device once
    plausible = _row(3, accuracy=100.0, samples=200.0)
    assert canary_verdict([*honest, plausible], Gates(min_accuracy=90))["failures"] == [
        "accuracy 46.5% < 90% on 2 of 3 canary device(s)"]
    for lie, reason in [(_row(p99=0.1, p50=0.5), "p99 0.1 ms below p50 0.5 ms"),
                        (_row(errors=60.0, accuracy=50.0), "accuracy 50% is more than 100 inferences with 60 errors"),
                        (_row(errors=101.0), "101 errors in 100 inferences"),
                        (_row(samples=250.0), "250 samples, more than the 200"),
                        (_row(accuracy=101.0), "accuracy 101%"),
                        (_row(p99=-1.0, p50=-1.0), "100 inferences without a latency")]:
        assert reason in (implausible(lie) or ""), (lie, implausible(lie))
    assert implausible(_row()) is None
    # every device dropped: the canary fails
    assert canary_verdict([liar], Gates())["failures"] == [
        "no canary device reported a credible measurement (1 dropped)"]


def test_lying_or_malformed_device_replies_count_as_failures():
    from flwr.app import ConfigRecord, Message, Metadata, MetricRecord, RecordDict

    from device_agents.protocol import FLEET_METRICS as METRICS
    from edgekit.fleet.jobs import node_row

    honest = dict.fromkeys(METRICS, 1.0)

    def reply(metrics, text=None):
        metadata = Metadata(run_id=1, message_id="m7", src_node_id=7, dst_node_id=0, reply_to_message_id="q7",
                            group_id="1", created_at=time.time(), ttl=60.0, message_type="query.install")
        return Message(RecordDict({"metrics": MetricRecord(metrics), "text": ConfigRecord(text or {"reason": ""})}),
                       metadata=metadata)

    assert node_row(7, reply(honest))["ok"] is True and node_row(7, reply(honest))["answered"] is True
    assert node_row(7, None)["reason"] == "no reply" and node_row(7, None)["answered"] is False
    for metrics in ({**honest, "extra": 1.0}, {k: v for k, v in honest.items() if k != "ok"},
                    {**honest, "accuracy": float("nan")}, {**honest, "p99-ms": 1e30}):
        row = node_row(7, reply(metrics))
        assert row["ok"] is False and "malformed reply" in row["reason"], metrics
    long = node_row(7, reply(honest, {"reason": "x" * 10_000, "version-id": "y" * 500}))
    assert len(long["reason"]) == 300 and len(long["version_id"]) == 32


def test_fleet_commands_refuse_bad_input_in_one_line(int8_out, keys, tmp_path):
    (private, public), _ = keys
    # serve: a folder that is not a fleet's; register / rollout / status / fl run: no served fleet
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("keep me")
    assert_one_line_error(run_cli("fleet", "serve", "--out", str(tmp_path / "mine"), "--key", str(private)), 2,
                          "not a fleet folder")
    assert_one_line_error(run_cli("fleet", "serve", "--out", str(tmp_path / "new"), "--key", str(public)), 2,
                          "not an unencrypted PEM private key")
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "keep me"
    assert_one_line_error(run_cli("fleet", "register", str(public), "--fleet", str(tmp_path / "none")), 2,
                          "not a served fleet")
    signed = _signed(int8_out, tmp_path / "signed", private, 1)
    assert_one_line_error(run_cli("fleet", "rollout", "--fleet", str(tmp_path / "none"), "--release",
                                  str(signed)), 2, "not a served fleet")
    assert_one_line_error(run_cli("fleet", "rollout", "--fleet", str(tmp_path / "none"), "--release",
                                  str(int8_out)), 2, "not a signed release")
    assert_one_line_error(run_cli("fleet", "rollout", "--fleet", str(tmp_path / "none"), "--release",
                                  str(signed), "--canary", "1.5"), 2, "canary fraction")
    # join: a world-readable device key, a CA that is not a certificate, no trusted key for a new store
    made = run_cli("node-key", "--out", str(tmp_path / "keys"), tool="edgekit-agent")
    assert made.returncode == 0 and oct((tmp_path / "keys" / "node.key").stat().st_mode & 0o777) == "0o600"
    assert_one_line_error(run_cli("node-key", "--out", str(tmp_path / "keys"), tool="edgekit-agent"), 2,
                          "never replaced")
    common = ["join", "--superlink", "127.0.0.1:1", "--key", str(tmp_path / "keys" / "node.key"),
              "--store", str(tmp_path / "store")]
    assert_one_line_error(run_cli(*common, "--ca", str(public), "--trust", str(public), tool="edgekit-agent"), 2,
                          "not a PEM certificate")
    assert_one_line_error(run_cli(*common, "--ca", str(public), tool="edgekit-agent"), 2, "trusts no release key")
    (tmp_path / "keys" / "node.key").chmod(0o644)
    ca = tmp_path / "ca.crt"
    from edgekit.federated.tls import make_certificates

    shutil.copy(make_certificates(tmp_path / "certs")["ca"], ca)
    assert_one_line_error(run_cli(*common, "--ca", str(ca), "--trust", str(public), tool="edgekit-agent"), 2,
                          "readable by other users")


def test_every_device_answer_carries_exactly_the_protocol_metrics(int8_out, keys, tmp_path):
    """install (refused and accepted), rollback and status replies all pass the server's reply check."""
    from device_agents.fleet import agent as fleet
    from device_agents.protocol import FLEET_METRICS as METRICS
    from edgekit.fleet.jobs import release_files

    (private, public), _ = keys
    np.savez(tmp_path / "data.npz", x=np.zeros((20, 8, 8, 1), np.float32), y=np.zeros(20, np.int64))
    node = {"store": str(tmp_path / "store"), "trust": str(public), "data-file": str(tmp_path / "data.npz")}
    release = _signed(int8_out, tmp_path / "v1", private, 1)
    answers = [fleet.install({"release.json": b"{}", "manifest.json": b"{}"}, node),
               fleet.install(release_files(release), node), fleet.install(release_files(release), node),
               fleet.status(node), fleet.rollback("someone-else", node)]
    assert [a[0]["ok"] for a in answers] == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert answers[2][1]["reason"] == "already serving this release"
    assert answers[3][0]["release"] == 1 and answers[3][0]["samples"] == 20 and answers[3][0]["errors"] == 0
    for metrics, text in answers:
        assert set(metrics) == set(METRICS) and all(isinstance(v, float) for v in metrics.values())
        assert set(text) <= {"version-id", "previous-id", "reason"}


def test_the_status_picture_and_json_show_a_broken_release(tmp_path):
    """fleet.json keeps each device's accuracy and sample count per version; fleet.png's device axis is whole
    numbers and it has an accuracy panel (the issue: every device serving a 47% release looked healthy)."""
    from edgekit.fleet.plots import plot_status
    from edgekit.fleet.rollout import _by_version

    rows = [{**_row(node=n, accuracy=47.0 + n), "version_id": "broken0123456789", "release": 3.0} for n in range(3)]
    rows.append({**_row(node=9, accuracy=96.5), "version_id": "good000011112222", "release": 2.0})
    versions = _by_version(rows)
    assert versions["broken0123456789"]["accuracy"] == pytest.approx(48.0)
    assert versions["broken0123456789"]["min_accuracy"] == 47.0 and versions["good000011112222"]["nodes"] == 1
    assert [d["samples"] for d in versions["broken0123456789"]["devices"]] == [100.0] * 3
    import matplotlib.pyplot as plt

    captured = {}
    original = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        captured["fig"] = fig
        return original(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        plot_status({"nodes": rows, "versions": versions}, tmp_path / "fleet.png")
    finally:
        plt.Figure.savefig = original
    axes = captured["fig"].axes
    titles = [ax.get_title() for ax in axes]
    assert "accuracy on the devices' data (%)" in titles
    accuracy = axes[titles.index("accuracy on the devices' data (%)")]
    assert [round(p.get_height(), 1) for p in accuracy.patches] == [48.0, 96.5]
    assert all(float(t).is_integer() for t in axes[0].get_yticks())
    assert (tmp_path / "fleet.png").read_bytes()[:4] == b"\x89PNG"
