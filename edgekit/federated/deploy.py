"""``edgekit fl up``: a real federation on this machine — a SuperLink and N SuperNodes, TLS by default.

edgekit writes a run folder (partitions, the trainable artifact, held-out data, settings), a CA and a
SuperLink certificate (``cryptography``), a small Flower app (``app/``) whose ServerApp and ClientApp
are edgekit's, and a Flower configuration (``flwr_home/config.toml``). It then starts
``flower-superlink`` and one ``flower-supernode`` per client, all bound to 127.0.0.1, submits the run
with ``flwr run`` and stops every process at the end. The same commands, with real addresses, run a
SuperNode on a device against a SuperLink on a server (README).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgeKitError, InputError
from edgekit.federated.server_app import RoundSettings

APP_MODULE = "edgekit_fl_app"


@dataclass(frozen=True)
class DeployConfig:
    clients: int = 2
    partition: str = "iid"
    rounds: RoundSettings = field(default_factory=RoundSettings)
    batch_size: int = 16
    insecure: bool = False
    node_auth: bool = True  # SuperNode key pairs registered with the SuperLink (needs TLS)
    timeout: float = 900.0

    def __post_init__(self) -> None:
        from edgekit.federated.simulate import SimulationConfig

        SimulationConfig(clients=self.clients, partition=self.partition, rounds=self.rounds)  # same checks


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_certificates(folder: Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> dict[str, Path]:
    """A CA and a SuperLink certificate signed by it (SAN: ``hosts``), with the ``cryptography`` package."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgekit federation CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "superlink")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    os.chmod(paths["key"], 0o600)
    return paths


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA (P-256) key pair in OpenSSH format, for SuperNode authentication."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    os.chmod(private, 0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


def deployed_server_app() -> Any:
    """The ServerApp of ``edgekit fl up``: everything it needs is in the run folder (``run-dir``)."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        from device_agents.training import Trainer
        from edgekit.federated.server_app import run_rounds
        from edgekit.federated.simulate import plot_history

        run_dir = Path(str(context.run_config["run-dir"]))
        spec = json.loads((run_dir / "run.json").read_text())
        settings = RoundSettings(**spec["rounds"])
        evaluator = Trainer.load(run_dir / "trainable")
        with np.load(run_dir / "evaluation.npz") as npz:
            eval_x, eval_y = npz["x"], npz["y"]
        weights, state = run_rounds(grid, settings=settings, initial=evaluator.get_weights(), evaluator=evaluator,
                                    eval_x=eval_x, eval_y=eval_y, checkpoint_dir=run_dir / "checkpoints",
                                    resume=False, expected_nodes=spec["clients"], log=print)
        np.savez(run_dir / "final_weights.npz", **weights)
        (run_dir / "history.json").write_text(json.dumps({"config": spec, "rounds": state.history}, indent=2))
        plot_history(state.history, run_dir / "accuracy.png")

    return app


def _write_app(folder: Path, run_dir: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgekit-fl"
version = "1.0.0"
description = "edgekit federated run (ServerApp: edgekit, ClientApp: device_agents)"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "edgekit"

[tool.flwr.app.components]
serverapp = "{APP_MODULE}:server_app"
clientapp = "{APP_MODULE}:client_app"

[tool.flwr.app.config]
run-dir = "{run_dir}"
""")
    (folder / f"{APP_MODULE}.py").write_text(
        '"""Generated by edgekit fl up: the apps come from the installed edgekit and device_agents."""\n'
        "from device_agents.client_app import deployed_client_app\n"
        "from edgekit.federated.deploy import deployed_server_app\n\n"
        "server_app = deployed_server_app()\nclient_app = deployed_client_app()\n")


class _Processes:
    """Started processes, stopped (TERM, then KILL) however the run ends."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env, self.procs = logs, env, []

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append((name, proc, log))
        return proc

    def check(self) -> None:
        for name, proc, _ in self.procs:
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text()[-400:].strip().splitlines()
                raise EdgeKitError(f"{name} exited with code {proc.returncode}: {tail[-1] if tail else ''} "
                                   f"(log: {self.logs / (name + '.log')})")

    def stop(self) -> None:
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc, log in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()


def up(model: Any, data: Any, out: str | Path, *, config: DeployConfig | None = None, progress: bool = True,
       log: Any = print) -> Any:
    """Run a real federation on this machine; return the :class:`FederatedResult`."""
    from edgekit._output import check_output_dir
    from edgekit.federated.simulate import (
        FLOWER_ENV,
        FederatedResult,
        SimulationConfig,
        close_the_loop,
        plot_history,
        prepare_run,
    )

    config = config or DeployConfig()
    out = Path(out).absolute()
    check_output_dir(out)
    if shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None:
        raise InputError("flower-superlink is not installed next to this Python; install edgekit[server]")
    sim = SimulationConfig(clients=config.clients, partition=config.partition, rounds=config.rounds,
                           batch_size=config.batch_size)
    run = prepare_run(model, data, out, clients=config.clients, partition_spec=sim.scheme(),
                      seed=config.rounds.seed, batch_size=config.batch_size,
                      learning_rate=config.rounds.learning_rate, progress=progress)
    loaded, dataset = run.loaded, run.dataset
    (out / "run.json").write_text(json.dumps({"clients": config.clients, "partition": config.partition,
                                              "rounds": asdict(config.rounds), "insecure": config.insecure}))
    _write_app(out / "app", out)
    certs = None if config.insecure else make_certificates(out / "certs")
    port = free_port()  # Flower 1.41 serves the Fleet, Control and Runtime APIs on one HTTP port
    flwr_home = out / "flwr_home"
    flwr_home.mkdir(exist_ok=True)
    tls = f'root-certificates = "{certs["ca"]}"' if certs else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "edgekit"\n\n[superlink.edgekit]\naddress = "127.0.0.1:{port}"\n{tls}\n')
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "TF_CPP_MIN_LOG_LEVEL": "3"}
    (out / "logs").mkdir(exist_ok=True)
    procs = _Processes(out / "logs", env)
    security = (["--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]),
                 "--ssl-keyfile", str(certs["key"])] if certs else ["--insecure"])
    node_auth = config.node_auth and certs is not None
    if node_auth:
        security.append("--enable-supernode-auth")
    try:
        procs.start("superlink", [str(bin_dir / "flower-superlink"), *security,
                                  "--host", "127.0.0.1", "--port", str(port),
                                  "--disable-runtime-dependency-installation",
                                  "--database", str(out / "superlink.db")])
        _wait_port(port, procs)
        for i in range(config.clients):
            node_config = f'partition-id={i} num-partitions={config.clients} ' \
                          f'data-dir="{out / "partitions"}" artifact-dir="{out / "trainable"}"'
            node_security = ["--root-certificates", str(certs["ca"])] if certs else ["--insecure"]
            if node_auth:
                private, public = make_node_key(out / "node_keys", f"supernode-{i}")
                reg = subprocess.run([str(bin_dir / "flwr"), "supernode", "register", str(public), "edgekit"],
                                     env=env, capture_output=True, text=True, timeout=120)
                if reg.returncode != 0:
                    raise EdgeKitError(f"flwr supernode register failed: {(reg.stdout + reg.stderr)[-300:]}")
                node_security += ["--auth-supernode-private-key", str(private)]
            procs.start(f"supernode-{i}", [str(bin_dir / "flower-supernode"), *node_security,
                                           "--superlink", f"127.0.0.1:{port}", "--node-config", node_config,
                                           "--host", "127.0.0.1", "--port", str(free_port())])
        mode = ("TLS, SuperNode key auth" if node_auth else "TLS") if certs else "insecure"
        log(f"SuperLink on 127.0.0.1:{port} ({mode}), {config.clients} SuperNodes; submitting the run with flwr run")
        run = subprocess.run([str(bin_dir / "flwr"), "run", str(out / "app"), "edgekit", "--stream"],
                             env=env, cwd=out / "app", capture_output=True, text=True, timeout=config.timeout)
        (out / "logs" / "flwr-run.log").write_text(run.stdout + run.stderr)
        for line in run.stdout.splitlines():
            if line.startswith("round "):
                log(line)
        procs.check()
        if run.returncode != 0 or not (out / "history.json").exists():
            tail = (run.stdout + run.stderr).strip().splitlines()[-3:]
            raise EdgeKitError(f"flwr run failed (code {run.returncode}): {' | '.join(tail)[:400]} "
                               f"(logs in {out / 'logs'})")
    except subprocess.TimeoutExpired:
        raise EdgeKitError(f"the federated run did not finish in {config.timeout:.0f} s (logs in {out / 'logs'})") \
            from None
    finally:
        procs.stop()
    history = json.loads((out / "history.json").read_text())["rounds"]
    with np.load(out / "final_weights.npz") as npz:
        weights = {k: npz[k] for k in npz.files}
    plot_history(history, out / "accuracy.png")
    final = close_the_loop(loaded.model, weights, dataset, out / "final", progress=progress)
    log(f"final global model: int8 TFLite {final['bytes']:,} bytes, accuracy {final['accuracy']:.2f}% "
        f"-> {out / 'final'}")
    return FederatedResult(out, history, history[-1]["accuracy"], weights)


def _wait_port(port: int, procs: _Processes, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check()
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise EdgeKitError(f"the SuperLink did not open 127.0.0.1:{port} within {timeout:.0f} s")
