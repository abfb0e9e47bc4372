"""Enrollment on a device: its own SuperNode key pair, and a SuperNode joined to a fleet.

The device makes its key pair (:func:`make_node_key`; the private key never leaves it) and gives the
operator ``node.pub``; the operator registers it on the server, where the Control API is loopback-only.
:func:`supernode_command` then builds the ``flower-supernode`` command that connects to the fleet's
gateway with TLS (the fleet's ``ca.crt``) and the device key, with this device's store, trusted release
key and data in its node config, and an environment with Flower's telemetry and update checks off,
``FLWR_HOME`` inside the store, and :mod:`device_agents.federated.app_guard` first on ``PATH``: the device runs only
Flower apps signed by the key it trusts.

>>> private, public = make_node_key(Path("keys"), "node")                     # doctest: +SKIP
"""

from __future__ import annotations

import os
import socket
import stat
import sys
from pathlib import Path

from device_agents.errors import InputMismatchError
from device_agents.files import read_bounded, write_atomic
from device_agents.protocol import FLOWER_ENV


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA (P-256) key pair in OpenSSH format, for SuperNode authentication: (private 0600, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    write_atomic(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                            serialization.NoEncryption()), mode=0o600)
    write_atomic(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                       serialization.PublicFormat.OpenSSH))
    return private, public


def _plain(path: Path, what: str) -> str:
    text = str(path.absolute())
    if '"' in text or "\n" in text:
        raise InputMismatchError(f"the {what} path {text!r} has a quote or newline; move it to a plain path")
    return text


def _check_inputs(ca: Path, key: Path, data: Path | None, trust: Path | None) -> None:
    from device_agents.files import UnsafeFileError
    from device_agents.training.samples import read_labelled

    if not ca.is_file() or not read_bounded(ca, max_bytes=1 << 16, what="CA certificate").startswith(
            b"-----BEGIN CERTIFICATE-----"):
        raise InputMismatchError(f"{ca} is not a PEM certificate; give the fleet's ca.crt")
    if not key.is_file():
        raise InputMismatchError(f"{key} does not exist; create the device key pair first (node-key)")
    if stat.S_IMODE(key.stat().st_mode) & 0o077:
        raise InputMismatchError(f"{key} is readable by other users; chmod 600 {key}")
    if data is not None:
        try:
            read_labelled(data)  # what each round would refuse, refused before joining
        except (UnsafeFileError, OSError) as exc:
            raise InputMismatchError(f"data {data}: {exc}") from None
    if trust is not None:
        from device_agents.store.release import load_public_key

        try:
            load_public_key(trust)
        except Exception as exc:  # noqa: BLE001 (ReleaseError: a one-line reason)
            raise InputMismatchError(str(exc)) from None


def supernode_command(superlink: str, ca: Path, key: Path, store: Path, *, data: Path | None = None,
                      trust: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """The ``flower-supernode`` command and environment that join this device to the fleet at ``superlink``."""
    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputMismatchError(f"superlink address {superlink!r} is not HOST:PORT")
    _check_inputs(ca, key, data, trust)
    binary = Path(sys.executable).parent / "flower-supernode"
    if not binary.is_file():
        raise InputMismatchError("flower-supernode is not installed next to this Python; install "
                                 "edgekit-device-agent[fl]")
    store.mkdir(parents=True, exist_ok=True)
    from device_agents.federated.app_guard import TRUST_ENV, install_shims
    from device_agents.store.model_store import TRUSTED_KEY

    app_key = (trust if trust is not None else store / TRUSTED_KEY).absolute()
    shims = install_shims(store.absolute() / ".flwr" / "guard")
    config = [f'store="{_plain(store, "store")}"']
    if data is not None:
        config.append(f'data-file="{_plain(data, "data")}"')
    if trust is not None:
        config.append(f'trust="{_plain(trust, "trusted key")}"')
    command = [str(binary), "--root-certificates", str(ca.absolute()), "--superlink", superlink,
               "--auth-supernode-private-key", str(key.absolute()), "--node-config", " ".join(config),
               "--host", "127.0.0.1", "--port", str(free_port())]
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(store.absolute() / ".flwr"), TRUST_ENV: str(app_key),
           "PATH": f"{shims}{os.pathsep}{binary.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return command, env
