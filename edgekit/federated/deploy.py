"""``edgekit fl up``: a real federation on this machine — a SuperLink and N SuperNodes, TLS by default.

edgekit writes a run folder (partitions, the trainable artifact, held-out data, settings), a CA and a
SuperLink certificate (``cryptography``), a small Flower app (``app/``) whose ServerApp and ClientApp
are edgekit's, and a Flower configuration (``flwr_home/config.toml``). It then starts
``flower-superlink`` on 127.0.0.1 (its Control API, where nodes are registered and runs submitted,
never leaves loopback), the Fleet-only TLS gateway (:mod:`edgekit.federated.gateway`) that SuperNodes
connect to, and one ``flower-supernode`` per client; submits the run with ``flwr run`` and stops every
process at the end (each started by :mod:`edgekit.federated.processes`). docs/federated.md shows the same layout
with a real address for the gateway.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.federated.join import free_port
from edgekit.errors import FederationError, InputError
from edgekit.federated.config import DeployConfig
from edgekit.federated.processes import (
    BIN,
    Processes,
    flower_env,
    flwr_run,
    register_supernode,
    start_gateway,
    start_superlink,
    start_supernode,
    write_flower_app,
    write_flower_config,
)
from edgekit.federated.run import FederatedResult, RunSpec
from edgekit.federated.tls import make_certificates, make_node_key

FEDERATION = "edgekit"


def up(model: Any, data: Any, out: str | Path, *, config: DeployConfig | None = None, progress: bool = True,
       log: Any = print) -> FederatedResult:
    """Run a real federation on this machine (SuperLink + one SuperNode per client, TLS by default).

    >>> up("cnn.keras", "digits", "fl_up", config=DeployConfig(clients=2))   # doctest: +SKIP
    """
    from edgekit._io import check_output_dir
    from edgekit.federated.run import prepare_run

    config = config or DeployConfig()
    out = Path(out).absolute()
    check_output_dir(out)
    if shutil.which("flower-superlink", path=str(BIN)) is None:
        raise InputError("flower-superlink is not installed next to this Python; install edgekit-sdk")
    run = prepare_run(model, data, out, config, progress=progress)
    RunSpec(clients=config.clients, rounds=config.rounds, personalize_epochs=config.personalize_epochs,
            partition=config.partition, insecure=config.insecure).write(out)
    write_flower_app(out / "app", name="edgekit-fl", server="edgekit.federated.server_apps:deployed_server_app",
                     config={"run-dir": str(out)})
    certs = None if config.insecure else make_certificates(out / "certs")
    port = free_port()  # Flower 1.41 serves the Fleet, Control and Runtime APIs on one HTTP port
    write_flower_config(out / "flwr_home", FEDERATION, port, certs["ca"] if certs else None)
    env = flower_env(out / "flwr_home")
    (out / "logs").mkdir(exist_ok=True)
    procs = Processes(out / "logs", env)
    node_auth = config.node_auth and certs is not None
    gateway = free_port()
    try:
        start_superlink(procs, BIN, out, port, certs, node_auth=node_auth)
        start_gateway(procs, gateway, port, certs)
        for i in range(config.clients):
            node_config = (f'partition-id={i} num-partitions={config.clients} '
                           f'data-dir="{out / "partitions"}" artifact-dir="{out / "trainable"}"')
            key = None
            if node_auth:
                key, public = make_node_key(out / "node_keys", f"supernode-{i}")
                register_supernode(public, FEDERATION, env)
            start_supernode(procs, f"supernode-{i}", gateway, certs, node_config, private_key=key)
        mode = ("TLS, SuperNode key auth" if node_auth else "TLS") if certs else "insecure"
        log(f"SuperLink on 127.0.0.1:{port} (loopback only: control), Fleet gateway on 127.0.0.1:{gateway} "
            f"({mode}), {config.clients} SuperNodes; submitting the run with flwr run")
        _submit(procs, out, env, config.timeout, log)
    except subprocess.TimeoutExpired:
        raise FederationError(f"the federated run did not finish in {config.timeout:.0f} s "
                              f"(logs in {out / 'logs'})") from None
    finally:
        procs.stop()
    return finish_deployed_run(run, out, config, progress=progress, log=log)


def finish_deployed_run(run: Any, out: Path, config: Any, *, progress: bool, log: Any) -> Any:
    """:func:`~edgekit.federated.run.finish_run` for a run whose ServerApp wrote ``history.json`` and
    ``final_weights.npz`` into ``out`` (``fl up``, ``fl run``)."""
    from edgekit.federated.run import finish_run

    written = json.loads((out / "history.json").read_text())
    with np.load(out / "final_weights.npz") as npz:
        weights = {k: npz[k] for k in npz.files}
    personalization = written.get("personalization")
    return finish_run(run, out, config, written["rounds"], weights, progress=progress, log=log,
                      extra={"personalization": personalization} if personalization else None)


def _submit(procs: Processes, out: Path, env: dict[str, str], timeout: float, log: Any) -> None:
    run = flwr_run(out / "app", FEDERATION, env, timeout=timeout)
    (out / "logs" / "flwr-run.log").write_text(run.stdout + run.stderr)
    for line in run.stdout.splitlines():
        if line.startswith("round "):
            log(line)
    procs.check()
    if run.returncode != 0 or not (out / "history.json").exists():
        tail = (run.stdout + run.stderr).strip().splitlines()[-3:]
        raise FederationError(f"flwr run failed (code {run.returncode}): {' | '.join(tail)[:400]} "
                              f"(logs in {out / 'logs'})")
