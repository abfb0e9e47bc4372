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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_agents.files import write_atomic
from edgekit.errors import InputError
from edgekit.federated.processes import flower_env, register_supernode
from edgekit.federated.submit import FEDERATION, SERVE_STATE, answers, served

if TYPE_CHECKING:
    from edgekit.fleet.watch import WatchConfig


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


class Fleet:
    """A served fleet: its folder, the gateway devices dial, the loopback control port, what it does on its own
    (``watcher``, :class:`~edgekit.fleet.watch.Watcher`); :meth:`stop` ends it."""

    def __init__(self, folder: Path, procs: Any, gateway: str, control: int, watcher: Any = None) -> None:
        self.folder, self.procs, self.gateway, self.control = folder, procs, gateway, control
        self.watcher = watcher

    @property
    def ca(self) -> Path:
        return self.folder / "certs" / "ca.crt"

    def check(self) -> None:
        """Raise :class:`FederationError` when the SuperLink or the gateway has exited."""
        self.procs.check()

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.halt()  # no new job; the one in progress ends with the SuperLink
        self.procs.stop()
        if self.watcher is not None:
            self.watcher.stop()
        (self.folder / SERVE_STATE).unlink(missing_ok=True)


def _check_folder(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file; give a folder for the fleet")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "certs" / "ca.crt").is_file():
        raise InputError(f"{folder} is not empty and is not a fleet folder; give a new or empty folder")


def _check_can_serve(folder: Path, signing_key: Path) -> None:
    """Refuse, before anything is written: a folder that is not a fleet's, a missing or wrong key, no Flower, a
    fleet already served."""
    from edgekit.federated.processes import BIN
    from edgekit.fleet.signing import load_private_key

    _check_folder(folder)
    load_private_key(signing_key)
    if shutil.which("flower-superlink", path=str(BIN)) is None:
        raise InputError("flower-superlink is not installed next to this Python; install edgekit-sdk")
    state = folder / SERVE_STATE
    if state.is_file() and answers(json.loads(state.read_text())["control"]):
        raise InputError(f"the fleet in {folder} is already being served; stop that server first")


def _certificates(certs_dir: Path, config: FleetConfig) -> dict[str, Path]:
    """The fleet's CA (kept across restarts, made the first time) and a server certificate for its hosts."""
    from edgekit.federated.tls import make_certificates, make_server_certificate

    if (certs_dir / "ca.crt").is_file():
        return {"ca": certs_dir / "ca.crt", **make_server_certificate(certs_dir, hosts=config.certificate_hosts)}
    return make_certificates(certs_dir, hosts=config.certificate_hosts)


def serve(out: str | Path, config: FleetConfig | None = None, *, signing_key: str | Path,
          watch: WatchConfig | None = None, log: Callable[[str], Any] | None = None) -> Fleet:
    """Start (or restart) the fleet in ``out``: SuperLink on loopback, Fleet gateway on ``host:port``.

    The CA and the registered node keys are kept across restarts; the server certificate is reissued for
    ``config.certificate_hosts`` each time. The jobs' Flower app is signed with ``signing_key`` (the fleet's
    release key, :func:`edgekit.fleet.signing.sign_app`): devices run only apps their trusted key signed.
    ``watch`` (:class:`~edgekit.fleet.watch.WatchConfig`): the convergence passes, telemetry collections and
    ``/metrics`` the fleet runs on its own until stopped (None: none; their lines go to ``log`` and
    ``logs/watch.log``). Returns once both listen.

    >>> fleet = serve("fleet", signing_key="keys/signing.key")            # doctest: +SKIP
    >>> fleet.stop()                      # doctest: +SKIP
    """
    from device_agents.federated.join import free_port
    from edgekit.federated.processes import (
        BIN,
        Processes,
        start_gateway,
        start_superlink,
        write_flower_app,
        write_flower_config,
    )
    from edgekit.fleet.signing import sign_app

    config = config or FleetConfig()
    folder = Path(out).absolute()
    _check_can_serve(folder, Path(signing_key))
    state = folder / SERVE_STATE
    certs = _certificates(folder / "certs", config)
    control = free_port()
    write_flower_config(folder / "flwr_home", FEDERATION, control, certs["ca"])
    write_flower_app(folder / "app", name="edgekit-fleet", server="edgekit.fleet.jobs:fleet_server_app",
                     config={"job": ""})
    sign_app(folder / "app", signing_key)
    (folder / "logs").mkdir(exist_ok=True)
    procs = Processes(folder / "logs", flower_env(folder / "flwr_home"))
    try:
        start_superlink(procs, BIN, folder, control, certs, node_auth=True)
        start_gateway(procs, config.port, control, certs, host=config.host)
    except BaseException:
        procs.stop()
        raise
    gateway = f"{config.host}:{config.port}"
    write_atomic(state, json.dumps({"gateway": gateway, "control": f"127.0.0.1:{control}", "ca": str(certs["ca"]),
                                    "pid": os.getpid()}).encode())
    watcher = None
    if watch is not None:
        from edgekit.fleet.watch import Watcher

        try:
            watcher = Watcher(folder, watch, log=log).start()
        except BaseException:
            procs.stop()
            state.unlink(missing_ok=True)
            raise
    return Fleet(folder, procs, gateway, control, watcher)


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
    return register_supernode(key.absolute(), FEDERATION, flower_env(info["folder"] / "flwr_home"))
