"""``edgekit fleet serve``: a long-lived SuperLink that devices enroll with, and the jobs run on it.

A fleet folder holds everything the server keeps between restarts::

    certs/ca.crt, ca.key, server.pem, server.key   the CA devices trust, and the SuperLink certificate
    superlink.db                                   Flower's state: the registered node keys survive restarts
    flwr_home/config.toml                          the Control API connection (127.0.0.1 only)
    app/                                           the Flower app of every job (ServerApp: edgekit, ClientApp:
                                                   device_agents), parameterised per run with ``job``
    serve.json                                     the addresses while it is served
    jobs/<time>-<action>/job.json, result.json     each rollout, status collection or federated run
    logs/

The SuperLink binds to 127.0.0.1 (its Control API registers nodes and starts runs) and requires node
authentication; devices reach only the Fleet-only TLS gateway (:mod:`edgekit.federated.gateway`) on
``host:port``. Registering a device's public key is therefore something only the operator, on this
machine, can do (:func:`register_node`).

>>> config = FleetConfig(host="0.0.0.0", addresses=("10.0.0.5",))
>>> fleet = serve("fleet", config, signing_key="keys/signing.key")     # doctest: +SKIP
>>> register_node("fleet", "node.pub")                                 # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agents.files import write_atomic
from edgekit.errors import FederationError, InputError

SERVE_STATE = "serve.json"
FEDERATION = "fleet"


@dataclass(frozen=True)
class FleetConfig:
    """Where devices reach the fleet: the gateway listens on ``host:port``; the server certificate names
    ``addresses`` (the names or IPs devices dial) besides 127.0.0.1 and localhost."""

    host: str = "127.0.0.1"
    port: int = 9093
    addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise InputError(f"fleet port {self.port} is not a TCP port (1-65535)")
        if not self.host:
            raise InputError("the fleet host is empty; give an address to listen on, e.g. 0.0.0.0")

    @property
    def certificate_hosts(self) -> tuple[str, ...]:
        names = ["127.0.0.1", "localhost", *self.addresses]
        if self.host not in ("0.0.0.0", "::"):
            names.append(self.host)
        return tuple(dict.fromkeys(names))


def flower_env(folder: Path) -> dict[str, str]:
    """The environment of every Flower command edgekit runs for this fleet (no telemetry, its own FLWR_HOME,
    this Python's scripts first on PATH)."""
    from edgekit.federated.run import FLOWER_ENV

    bin_dir = Path(sys.executable).parent
    return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(folder / "flwr_home"),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "TF_CPP_MIN_LOG_LEVEL": "3"}


class Fleet:
    """A served fleet: its folder, the gateway devices dial, the loopback control port; :meth:`stop` ends it."""

    def __init__(self, folder: Path, procs: Any, gateway: str, control: int) -> None:
        self.folder, self.procs, self.gateway, self.control = folder, procs, gateway, control

    @property
    def ca(self) -> Path:
        return self.folder / "certs" / "ca.crt"

    def check(self) -> None:
        """Raise :class:`FederationError` when the SuperLink or the gateway has exited."""
        self.procs.check()

    def stop(self) -> None:
        self.procs.stop()
        (self.folder / SERVE_STATE).unlink(missing_ok=True)


def _check_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file; give a folder for the fleet")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "certs" / "ca.crt").is_file():
        raise InputError(f"{folder} is not empty and is not a fleet folder; give a new or empty folder")


def serve(out: str | Path, config: FleetConfig | None = None, *, signing_key: str | Path) -> Fleet:
    """Start (or restart) the fleet in ``out``: SuperLink on loopback, Fleet gateway on ``host:port``.

    The CA and the registered node keys are kept across restarts; the server certificate is reissued for
    ``config.certificate_hosts`` each time. The jobs' Flower app is signed with ``signing_key`` (the fleet's
    release key, :func:`edgekit.fleet.signing.sign_app`): devices run only apps their trusted key signed.
    Returns once both listen.

    >>> fleet = serve("fleet", signing_key="keys/signing.key")            # doctest: +SKIP
    >>> fleet.stop()                      # doctest: +SKIP
    """
    from edgekit.federated._tls import make_certificates, make_server_certificate
    from edgekit.federated.deploy import Processes, free_port, start_gateway, start_superlink, write_flower_app
    from edgekit.fleet.signing import load_private_key, sign_app

    config = config or FleetConfig()
    folder = Path(out).absolute()
    _check_folder(folder)
    load_private_key(Path(signing_key))  # a missing or wrong key is refused before anything is written
    if shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None:
        raise InputError("flower-superlink is not installed next to this Python; install edgekit-sdk")
    state = folder / SERVE_STATE
    if state.is_file() and _answers(json.loads(state.read_text())["control"]):
        raise InputError(f"the fleet in {folder} is already being served; stop that server first")
    certs_dir = folder / "certs"
    if (certs_dir / "ca.crt").is_file():
        certs = {"ca": certs_dir / "ca.crt", **make_server_certificate(certs_dir, hosts=config.certificate_hosts)}
    else:
        certs = make_certificates(certs_dir, hosts=config.certificate_hosts)
    control = free_port()
    (folder / "flwr_home").mkdir(exist_ok=True)
    write_atomic(folder / "flwr_home" / "config.toml", (
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\naddress = "127.0.0.1:{control}"\n'
        f'root-certificates = "{certs["ca"]}"\n').encode())
    write_flower_app(folder / "app", name="edgekit-fleet", server="edgekit.fleet.jobs:fleet_server_app",
                     config={"job": ""})
    sign_app(folder / "app", signing_key)
    (folder / "logs").mkdir(exist_ok=True)
    procs = Processes(folder / "logs", flower_env(folder))
    try:
        start_superlink(procs, Path(sys.executable).parent, folder, control, certs, node_auth=True)
        start_gateway(procs, config.port, control, certs, host=config.host)
    except BaseException:
        procs.stop()
        raise
    gateway = f"{config.host}:{config.port}"
    write_atomic(state, json.dumps({"gateway": gateway, "control": f"127.0.0.1:{control}", "ca": str(certs["ca"]),
                                    "pid": os.getpid()}).encode())
    return Fleet(folder, procs, gateway, control)


def _answers(address: str) -> bool:
    import socket

    host, _, port = address.rpartition(":")
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, int(port))) == 0


def served(fleet: str | Path) -> dict[str, Any]:
    """The serve state of the fleet folder ``fleet``, or :class:`InputError` when it is not being served."""
    folder = Path(fleet).absolute()
    state = folder / SERVE_STATE
    if not state.is_file():
        raise InputError(f"{folder} is not a served fleet (no {SERVE_STATE}); serve it first")
    info = json.loads(state.read_text())
    if not _answers(info["control"]):
        raise InputError(f"the fleet in {folder} is not being served (nothing answers on {info['control']}); "
                         "serve it first")
    return {**info, "folder": folder}


def register_node(fleet: str | Path, public_key: str | Path) -> str:
    """Register a device's SuperNode public key (OpenSSH format) with the fleet; return Flower's answer.

    Only possible on the server: the Control API listens on 127.0.0.1.
    """
    info = served(fleet)
    key = Path(public_key)
    if not key.is_file() or key.stat().st_size > 16_384:
        raise InputError(f"{key} is not a node public key file (node.pub of the device)")
    text = key.read_text(errors="replace").strip()
    if not text.startswith("ecdsa-sha2-nistp256 "):
        raise InputError(f"{key} is not an OpenSSH ECDSA P-256 public key (node.pub written on the device)")
    proc = subprocess.run([str(Path(sys.executable).parent / "flwr"), "supernode", "register", str(key.absolute()),
                           FEDERATION], env=flower_env(info["folder"]), capture_output=True, text=True, timeout=120)
    answer = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        last = answer.splitlines()[-1][:300] if answer else f"code {proc.returncode}"
        raise FederationError(f"registering {key} failed: {last}")
    return answer.splitlines()[-1][:300] if answer else "registered"


def submit_job(fleet: str | Path, action: str, spec: dict[str, Any], *, timeout: float, log: Any = print) -> dict:
    """Run one job (``action`` of :data:`edgekit.fleet.jobs.ACTIONS`) on the served fleet; return its result."""
    info = served(fleet)
    folder = info["folder"] / "jobs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{action}-{os.getpid()}"
    folder.mkdir(parents=True)
    job = folder / "job.json"
    write_atomic(job, json.dumps({"action": action, **spec}).encode())
    try:
        proc = subprocess.run([str(Path(sys.executable).parent / "flwr"), "run", str(info["folder"] / "app"),
                               FEDERATION, "--stream", "--run-config", f'job="{job}"'],
                              env=flower_env(info["folder"]), cwd=info["folder"] / "app", capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FederationError(f"the {action} job did not finish in {timeout:.0f} s (job folder {folder})") from None
    (folder / "flwr-run.log").write_text(proc.stdout + proc.stderr)
    for line in proc.stdout.splitlines():
        if "edgekit: " in line:  # what the job's ServerApp reports (Flower prefixes its log lines)
            log(line.split("edgekit: ", 1)[1])
    result = folder / "result.json"
    if not result.is_file():
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])[:400]
        raise FederationError(f"the {action} job wrote no result (flwr run code {proc.returncode}): {tail} "
                              f"(log: {folder / 'flwr-run.log'})")
    return {**json.loads(result.read_text()), "job": str(folder)}
