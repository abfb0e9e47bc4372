"""Real SuperLink and SuperNode processes: TLS, the gateway against strangers, a killed server, private keys."""

import json
from pathlib import Path

import pytest
from conftest import run_cli

SECOND = pytest.mark.xdist_group("federated-2")  # the real processes, the CLI and the server optimizers




@pytest.mark.slow
@SECOND
def test_real_superlink_and_supernodes_with_tls(fl_model, tmp_path):
    """flower-superlink + 2 flower-supernode processes on 127.0.0.1, TLS from a generated CA, flwr run; central
    differential privacy with adaptive clipping, the devices clipping as the round asks (a reply without
    Flower's adaptive-clipping bit would be rejected, so every valid reply was clipped on its device)."""
    out = tmp_path / "up"
    proc = run_cli("fl", "up", "--model", str(fl_model), "--clients", "2", "--rounds", "2", "--out", str(out),
                   "--dp-noise", "0.001", "--dp-clip", "5", "--dp-clipping", "adaptive", "--personalize-epochs", "1",
                   "--timeout", "400", "--quiet", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(TLS, SuperNode key auth)" in proc.stdout and "round 2/2" in proc.stdout
    history = json.loads((out / "history.json").read_text())["rounds"]
    assert [h["round"] for h in history] == [0, 1, 2] and all(h["valid"] == 2 for h in history[1:])
    assert history[-1]["accuracy"] > history[0]["accuracy"]
    assert all(h["privacy"]["clipping"] == "adaptive" and h["privacy"]["epsilon"] > 0 for h in history[1:])
    assert history[2]["privacy"]["epsilon"] > history[1]["privacy"]["epsilon"]
    personal = json.loads((out / "history.json").read_text())["personalization"]  # each device kept a head
    assert personal["devices"] == 2 and personal["failed_or_rejected"] == 0, personal
    assert personal["accuracy_after"] >= personal["accuracy_before"]  # a head that got worse is not kept
    superlink_log = (out / "logs" / "superlink.log").read_text()
    assert "https://127.0.0.1:" in superlink_log  # served over TLS, on loopback only
    final = json.loads((out / "final" / "manifest.json").read_text())
    assert final["artifacts"][0]["quantization"] == "int8"
    # every process was stopped
    import subprocess

    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert left == []


OUTSIDER_APP = """
from pathlib import Path
from flwr.serverapp import ServerApp
from flwr.clientapp import ClientApp

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def main(grid, context):
    Path({marker!r}).write_text("server ran the outsider's code")
"""


def _flwr_home(folder, port, ca):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(f'[superlink]\ndefault = "target"\n\n[superlink.target]\n'
                                        f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n')
    return folder


@SECOND
def test_strangers_cannot_join_register_or_run_code_through_the_gateway(tmp_path):
    """An outsider holding only the public ca.crt and the devices' address: refused at every door."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    from edgekit.federated.processes import FLOWER_ENV, Processes, free_port, start_gateway, wait_port
    from edgekit.federated.tls import make_certificates, make_node_key

    good, other = make_certificates(tmp_path / "good"), make_certificates(tmp_path / "other")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **FLOWER_ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    procs = Processes(tmp_path, env)
    port, gateway = free_port(), free_port()
    marker = tmp_path / "OUTSIDER_RAN"
    app = tmp_path / "outsider_app"
    app.mkdir()
    (app / "outsider.py").write_text(OUTSIDER_APP.format(marker=str(marker)))
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n[project]\nname = "outsider"\n'
        'version = "1.0.0"\ndependencies = []\n[tool.hatch.build.targets.wheel]\npackages = ["."]\n'
        '[tool.flwr.app]\npublisher = "outsider"\n[tool.flwr.app.components]\nserverapp = "outsider:server_app"\n'
        'clientapp = "outsider:client_app"\n')
    try:
        procs.start("superlink", [str(bin_dir / "flower-superlink"), "--ssl-ca-certfile", str(good["ca"]),
                                  "--ssl-certfile", str(good["cert"]), "--ssl-keyfile", str(good["key"]),
                                  "--host", "127.0.0.1", "--port", str(port), "--database", ":flwr-in-memory:",
                                  "--enable-supernode-auth", "--disable-runtime-dependency-installation"])
        wait_port(port, procs)
        start_gateway(procs, gateway, port, good)
        private, public = make_node_key(tmp_path / "keys", "outsider")
        outside = {**env, "FLWR_HOME": str(_flwr_home(tmp_path / "outside", gateway, good["ca"]))}
        register = subprocess.run([str(bin_dir / "flwr"), "supernode", "register", str(public), "target"],
                                  env=outside, capture_output=True, text=True, timeout=120)
        assert register.returncode != 0 and "only the Fleet API is served here" in register.stdout + register.stderr
        run = subprocess.run([str(bin_dir / "flwr"), "run", str(app), "target"], env=outside, cwd=app,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and "only the Fleet API is served here" in run.stdout + run.stderr
        for path in ("/v1/control/start-run", "/v1/runtime/pull-task-input", "/docs"):
            response = httpx.post(f"https://127.0.0.1:{gateway}{path}", verify=str(good["ca"]), content=b"x")
            assert response.status_code == 404, path
        common = ["--superlink", f"127.0.0.1:{gateway}", "--max-retries", "1", "--max-wait-time", "5"]
        wrong_ca = procs.start("wrong-ca", [str(bin_dir / "flower-supernode"), "--root-certificates",
                                            str(other["ca"]), *common, "--port", str(free_port()),
                                            "--auth-supernode-private-key", str(private)])
        no_key = procs.start("unregistered", [str(bin_dir / "flower-supernode"), "--root-certificates",
                                              str(good["ca"]), *common, "--port", str(free_port()),
                                              "--auth-supernode-private-key", str(private)])
        deadline = time.monotonic() + 90
        while (wrong_ca.poll() is None or no_key.poll() is None) and time.monotonic() < deadline:
            time.sleep(0.5)
        log = (tmp_path / "wrong-ca.log").read_text()
        assert "SuperNode ID" not in log  # it never registered
        assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate verify failed" in log.lower(), log[-1500:]
        log = (tmp_path / "unregistered.log").read_text()
        assert "SuperNode ID" not in log and no_key.returncode not in (None, 0), log[-1500:]
        # the same registration from the server's own loopback (the operator) is what works
        inside = {**env, "FLWR_HOME": str(_flwr_home(tmp_path / "inside", port, good["ca"]))}
        operator = subprocess.run([str(bin_dir / "flwr"), "supernode", "register", str(public), "target"],
                                  env=inside, capture_output=True, text=True, timeout=120)
        assert operator.returncode == 0, operator.stdout + operator.stderr
    finally:
        procs.stop()
    assert not marker.exists() and not list(tmp_path.rglob("OUTSIDER_RAN"))


@pytest.mark.slow
@SECOND
def test_a_killed_server_resumes_without_losing_a_round_and_cleans_up(fl_model, tmp_path):
    """SIGKILL of the server's process group once round 1 is checkpointed; the first --resume killed between a
    round's weights and its state (the window where a crash could lose a round); the second --resume reruns
    that round from the last committed one, finishes, and leaves no stale Ray folder."""
    import os
    import signal
    import subprocess
    import tempfile
    import time

    from conftest import BIN, ROOT

    out = tmp_path / "crash"
    args = ["fl", "simulate", "--model", str(fl_model), "--clients", "3", "--rounds", "3", "--out", str(out),
            "--quiet"]
    proc = subprocess.Popen([str(BIN / "edgekit"), *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    state = out / "checkpoints" / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["round"] >= 1:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(state.read_text())["round"]
    assert 1 <= done < 3 and not (out / "history.json").exists()

    killed = run_cli(*args, "--resume", env={"EDGEKIT_CRASH_AT": f"checkpoint-weights-r{done + 1}"})
    assert killed.returncode == -9
    committed = json.loads(state.read_text())
    assert committed["round"] == done and committed["weights"] == f"global-r{done}.npz"
    assert (out / "checkpoints" / f"global-r{done + 1}.npz").exists()  # written, never committed

    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0 and f"resuming after round {done}" in resumed.stdout, resumed.stderr[-800:]
    history = json.loads((out / "history.json").read_text())["rounds"]
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    assert (out / "final" / "model.tflite").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["global-r3.npz", "state.json"]
    stale = []  # the killed runs' Ray folders were removed by the next run, which removed its own too
    for folder in Path(tempfile.gettempdir()).glob("edgekit-ray-*-*"):
        try:
            os.kill(int(folder.name.split("-")[2]), 0)
        except ProcessLookupError:
            stale.append(folder)
        except (ValueError, OSError):
            pass
    assert stale == []


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children started in their own sessions included)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@SECOND
def test_a_terminated_fl_up_stops_every_flower_process_it_started(fl_model, tmp_path):
    """SIGTERM (kill, timeout, a service manager) ended `fl up` at once: its SuperLink, SuperNodes and their
    SuperExec processes, each in a session of its own, ran on (9 of them, holding their ports)."""
    import os
    import signal
    import subprocess
    import time

    from conftest import BIN, ROOT

    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    proc = subprocess.Popen([str(BIN / "edgekit"), "fl", "up", "--model", str(fl_model), "--clients", "2",
                             "--rounds", "50", "--out", str(tmp_path / "up"), "--quiet"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    line = ""
    while "submitting the run" not in line and time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
    time.sleep(3)
    started = _descendants(proc.pid)
    assert len(started) >= 4, (line, proc.poll())  # SuperLink, gateway, 2 SuperNodes (and what they start)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in started):
        time.sleep(0.5)
    left = [pid for pid in started if Path(f"/proc/{pid}/cmdline").exists()
            and (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z")]
    for pid in left:  # do not leave them to the next test
        os.kill(pid, signal.SIGKILL)
    assert left == []
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "edgekit: interrupted", err[-500:]


def test_federation_keys_are_private_from_the_start_and_certificates_say_their_use(tmp_path):
    import stat

    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from edgekit.federated.tls import make_certificates, make_node_key, make_server_certificate

    paths = make_certificates(tmp_path / "certs")
    private, public = make_node_key(tmp_path / "keys", "node")
    for key in (paths["key"], paths["ca_key"], private):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    leaf = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert ExtendedKeyUsageOID.SERVER_AUTH in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    renewed = make_server_certificate(tmp_path / "certs", hosts=("127.0.0.1", "edge.example"))  # the kept CA key
    again = x509.load_pem_x509_certificate(renewed["cert"].read_bytes())
    assert again.issuer == ca.subject and again.serial_number != leaf.serial_number
    again.verify_directly_issued_by(ca)
